"""The GPU engine: persistent Triton kernels for the LSTM recurrence, forward and backward.

Shape legend: ``T`` steps, ``B`` batch, ``I`` input features, ``H`` hidden size, ``D`` directions,
``G = 4H`` gate rows in the order ``i, f, g, o``; ``HB`` hidden units and ``BB`` batch rows owned
by one program.

Design (see docs/equations.md for the math):

* ``x_t W_ih^T`` of every step and both directions is one GEMM (cuBLAS), outside the recurrence.
* The forward kernel is *persistent*: program ``(i_h, i_b, d)`` owns hidden units
  ``[i_h HB, (i_h + 1) HB)`` with all four of their gates, for batch rows ``[i_b BB, (i_b + 1) BB)``
  of direction ``d``. It loads its ``[H, 4 HB]`` slice of ``weight_hh`` (gate-interleaved columns,
  so a single ``tl.dot`` gives all four gates) once, keeps ``c`` in registers, and runs the whole
  time loop: each step it reads ``h_{t-1}`` of its rows, computes its gates, publishes its slice of
  ``h_t`` and meets the other programs of its ``(i_b, d)`` group at a grid barrier. Batch blocks and
  directions never wait for each other, so both directions run concurrently.
* The backward kernel runs the same way in reverse. A program owns the columns of ``weight_hh`` of
  its hidden units (``[4H, HB]``): it computes its slice of ``dgates_t``, publishes it, meets its
  group at the barrier, and takes ``dh_{t-1} = dgates_t W_hh`` for its units.
* Then cuBLAS computes ``dx``, ``dW_ih`` and ``dW_hh`` (``K = T B``) and a reduction the biases.
* A PackedSequence's rows ``[N, F]`` are used as they are: the kernels address step ``t``'s rows as
  ``offsets[t] + b`` (``PACKED``) instead of ``t B + b``, so nothing is padded.
* The projection (``proj_size``): each program publishes its units of ``m_t`` and, after the barrier,
  computes its units of ``h_t = m_t W_hr^T`` (the backward exchanges ``d(m_t W_hr^T)`` the same way).
* Layer norm: ``LN(x W_ih^T)`` is computed with the input GEMM; ``LN(h W_hh^T)`` and ``LN(c_t)``
  combine every program's moments of its share of the row (forward) or its two gradient sums
  (backward), exchanged at two more barriers per step (docs/equations.md, section 10.5).

The barrier only works when every program of a group is resident at once. The launcher asks for at
most one program per SM; when that cannot hold (too many programs, a slice too large to keep on
chip, or a kernel that does not fit an SM) the same kernels run one launch per step, where the end
of a launch is the barrier. A barrier that waits far longer than any step can take gives up and
sets an error flag, so a misconfigured launch raises instead of hanging.

Under ``TRITON_INTERPRET=1`` (CPU tests) programs run one after another, so a persistent launch
there must be one program per group (the "one-program mode"); the per-step mode covers several.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from functools import partial
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import DirectionMasks
from .ops import PlainContext
from ..options import LSTMOptions
from ..reference import LAYER_NORM_EPS
from ..weights import DirectionWeights, accumulation_dtype

try:
    import triton
    import triton.language as tl
    try:
        from triton.runtime.errors import OutOfResources as _OutOfResources
    except ImportError:  # pragma: no cover - older layouts of triton
        _OutOfResources = None
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_ACTIVATION_CODES = {"sigmoid": 0, "hard_sigmoid": 1, "tanh": 2, "softsign": 3, "relu": 4}
_ZONEOUT_OFF, _ZONEOUT_MASK, _ZONEOUT_CONSTANT = 0, 1, 2

if triton is not None:
    # Spin iterations before a barrier gives up (about a second on an H100, against microseconds per step).
    _BARRIER_SPIN_LIMIT = tl.constexpr(1 << 22)

    # -- kernels -------------------------------------------------------------------------------------

    @triton.jit
    def _activate(x, CODE: tl.constexpr):
        if CODE == 0:
            y = 1.0 / (1.0 + tl.exp(-x))
        elif CODE == 1:
            y = tl.minimum(tl.maximum(0.2 * x + 0.5, 0.0), 1.0)
        elif CODE == 2:
            y = 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0
        elif CODE == 3:
            y = x / (1.0 + tl.abs(x))
        else:
            y = tl.maximum(x, 0.0)
        return y

    @triton.jit
    def _activation_grad(y, CODE: tl.constexpr):
        """The derivative of activation ``CODE``, written with its output ``y``."""
        if CODE == 0:
            g = y * (1.0 - y)
        elif CODE == 1:
            g = ((y > 0.0) & (y < 1.0)).to(y.dtype) * 0.2  # the constant in y's precision
        elif CODE == 2:
            g = 1.0 - y * y
        elif CODE == 3:
            s = 1.0 - tl.abs(y)
            g = s * s
        else:
            g = (y > 0.0).to(y.dtype)
        return g

    @triton.jit
    def _product(a, b, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """``a @ b`` accumulated in ``ACC``. ``DOT_IN_FP32`` widens bfloat16 operands first (exact), for
        Triton's interpreter, whose bfloat16 ``tl.dot`` returns garbage (Triton 3.9)."""
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)

    @triton.jit
    def _row_chunk(base, o_b64, m_b, k0, H, K_CHUNK: tl.constexpr, TRANSPOSED: tl.constexpr):
        """Columns ``[k0, k0 + K_CHUNK)`` of rows ``o_b`` of a ``[B, H]`` matrix that other programs
        write (read through L2): ``[BB, K]``, or ``[K, BB]`` when ``TRANSPOSED``."""
        o_k = k0 + tl.arange(0, K_CHUNK)
        m_k = o_k < H
        if TRANSPOSED:
            chunk = tl.load(base + o_b64[None, :] * H + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0,
                            cache_modifier=".cg")
        else:
            chunk = tl.load(base + o_b64[:, None] * H + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0,
                            cache_modifier=".cg")
        return chunk

    @triton.jit
    def _weight_row_chunk(w, w_row, m_row, k0, H, K_CHUNK: tl.constexpr, AS_A: tl.constexpr):
        """Columns ``[k0, k0 + K_CHUNK)`` of rows ``w_row`` of ``weight_hh [4H, H]``: the product's A
        operand ``[R, K]``, or its B operand ``[K, R]``."""
        o_k = k0 + tl.arange(0, K_CHUNK)
        m_k = o_k < H
        if AS_A:
            chunk = tl.load(w + w_row[:, None] * H + o_k[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
        else:
            chunk = tl.load(w + w_row[None, :] * H + o_k[:, None], mask=m_k[:, None] & m_row[None, :], other=0.0)
        return chunk

    @triton.jit
    def _clipped(a, bound, HAS_CLIP: tl.constexpr):
        if HAS_CLIP:
            a = tl.minimum(tl.maximum(a, -bound), bound)
        return a

    @triton.jit
    def _grid_barrier(p_counter, target, p_error):
        """Wait until ``target`` arrivals at ``p_counter`` (this program's included).

        The CTA barrier orders every thread's stores before thread 0's release (cumulativity, as in
        CUTLASS's grid barrier), and the acquire plus the CTA barrier after it order the loads that
        follow. A wait far past any step's length flags ``p_error`` and returns; once any barrier
        of the launch has given up, the others stop waiting at once, so a launch whose programs
        are not all resident ends in about one spin limit instead of one per step.
        """
        tl.debug_barrier()
        tl.atomic_add(p_counter, 1, sem="release", scope="gpu")
        arrived = tl.atomic_add(p_counter, 0, sem="acquire", scope="gpu")
        failed = tl.atomic_add(p_error, 0, sem="relaxed", scope="gpu")
        spins = 0
        while (arrived < target) & (spins < _BARRIER_SPIN_LIMIT) & (failed == 0):
            arrived = tl.atomic_add(p_counter, 0, sem="acquire", scope="gpu")
            failed = tl.atomic_add(p_error, 0, sem="relaxed", scope="gpu")
            spins += 1
        if arrived < target:
            tl.atomic_max(p_error, 1)
        tl.debug_barrier()

    @triton.jit
    def _step_range(lengths, o_b, m_b, T, i_d, reverse_first, HAS_LENGTHS: tl.constexpr):
        """The steps ``[lo, hi)`` of a processing order that hold real work for this batch block:
        steps past every sequence's end of the block are skipped, not computed. Direction ``i_d``
        processes the real steps first unless it is ``reverse_first`` (the forward kernel's
        reverse direction, or the backward's forward one), which starts with the padding."""
        lo = T * 0
        hi = T + 0
        if HAS_LENGTHS:
            longest = tl.max(tl.load(lengths + o_b, mask=m_b, other=0)).to(tl.int32)
            starts_late = i_d == reverse_first
            lo = tl.where(starts_late, T - longest, 0)
            hi = tl.where(starts_late, T, longest)
        return lo, hi

    @triton.jit
    def _time_index(s, T, i_d):
        """Direction ``i_d``'s ``s``-th processed step: ``s`` forward, ``T - 1 - s`` in reverse."""
        return tl.where(i_d == 1, T - 1 - s, s)

    @triton.jit
    def _rows_at(offsets, t, B, o_b64, PACKED: tl.constexpr):
        """The rows of step ``t``'s batch rows ``o_b`` in a per-token tensor: ``t B + b`` of a padded
        ``[T, B, F]`` one, or ``offsets[t] + b`` of a PackedSequence's ``[N, F]`` rows. ``[BB]`` int64."""
        if PACKED:
            first = tl.load(offsets + t).to(tl.int64)
        else:
            first = t.to(tl.int64) * B
        return first + o_b64

    @triton.jit
    def _live(m_b, t, b_len, PACKED: tl.constexpr):
        """Which batch rows have a row at step ``t``: packed input has none past a sequence's end
        (padded input keeps its padding rows, which the kernels fill with zeros)."""
        if PACKED:
            m_b = m_b & (t < b_len)
        return m_b

    @triton.jit
    def _lengths_of(lengths, o_b, m_b, BB: tl.constexpr, HAS_LENGTHS: tl.constexpr):
        if HAS_LENGTHS:
            b_len = tl.load(lengths + o_b, mask=m_b, other=0)
        else:
            b_len = tl.zeros((BB,), dtype=tl.int64)  # unread: every row runs every step
        return b_len

    @triton.jit
    def _sync(p_counter, arrivals, error, USE_BARRIER: tl.constexpr):
        """The end of a phase: the group's grid barrier, or for a one-program group (or a launch
        that runs one phase) a CTA barrier, since the program's own warps exchange through memory."""
        if USE_BARRIER:
            _grid_barrier(p_counter, arrivals, error)
        else:
            tl.debug_barrier()

    # The `phase` argument that runs every phase of a step (one launch for all steps).
    _ALL_PHASES_C = tl.constexpr(7)

    @triton.jit
    def _runs(phase, k):
        """Whether a launch given ``phase`` runs phase ``k`` of its steps (publishes its results)."""
        return (phase == k) | (phase == _ALL_PHASES_C)

    @triton.jit
    def _finishes(phase, BARRIERS: tl.constexpr):
        """Whether a launch given ``phase`` finishes its steps. Only layer norm and the projection split
        a step into phases; without them the answer is a constant, which costs no registers."""
        if BARRIERS > 1:
            done = _runs(phase, BARRIERS - 1)
        else:
            done = True
        return done

    @triton.jit
    def _partial_moments(v, m, count):
        """Each row's mean and sum of squared deviations (M2) over the entries ``m`` of ``v [BB, K]``,
        ``count`` of them: this program's share of a layer-norm statistic."""
        mean = tl.sum(tl.where(m, v, 0.0), axis=1) / count
        dev = tl.where(m, v - mean[:, None], 0.0)
        return mean, tl.sum(dev * dev, axis=1)

    @triton.jit
    def _publish_moments(p_rows, i_h, mean, m2, m_b, on):
        """Store this program's ``(mean, M2)`` of each row in slot ``i_h`` of ``[B, LN_SLOTS, 2]`` if ``on``."""
        m = tl.where(on, m_b, False)  # (a scalar and a block in `&` fail in the interpreter)
        tl.store(p_rows + i_h * 2, mean, mask=m)
        tl.store(p_rows + i_h * 2 + 1, m2, mask=m)

    @triton.jit
    def _publish_sums(p_rows, i_h, a, b, m_b, on):
        """Store this program's two row sums in slot ``i_h`` of ``[B, LN_SLOTS, 2]`` if ``on``."""
        _publish_moments(p_rows, i_h, a, b, m_b, on)

    @triton.jit
    def _combined_sums(p_rows, m_b, n_programs, NP_PAD: tl.constexpr):
        """Each row's two sums over every program's share (see :func:`_publish_sums`)."""
        o_p = tl.arange(0, NP_PAD)
        m = m_b[:, None] & (o_p < n_programs)[None, :]
        first = tl.load(p_rows[:, None] + o_p[None, :] * 2, mask=m, other=0.0, cache_modifier=".cg")
        second = tl.load(p_rows[:, None] + o_p[None, :] * 2 + 1, mask=m, other=0.0, cache_modifier=".cg")
        return tl.sum(first, axis=1), tl.sum(second, axis=1)

    @triton.jit
    def _combined_moments(p_rows, m_b, n_programs, H, HB: tl.constexpr, PER_UNIT: tl.constexpr,
                          NP_PAD: tl.constexpr, eps):
        """Each row's mean and ``1 / sqrt(var + eps)`` over all ``PER_UNIT * H`` entries, from every
        program's ``(mean, M2)`` (Chan et al.'s pairwise combination: no cancellation of E[x^2] - mean^2).
        ``p_rows [BB]`` points at the rows of a ``[B, LN_SLOTS, 2]`` table that other programs write;
        ``NP_PAD`` covers the group's programs."""
        o_p = tl.arange(0, NP_PAD)
        m_p = o_p < n_programs
        m = m_b[:, None] & m_p[None, :]
        means = tl.load(p_rows[:, None] + o_p[None, :] * 2, mask=m, other=0.0, cache_modifier=".cg")
        m2s = tl.load(p_rows[:, None] + o_p[None, :] * 2 + 1, mask=m, other=0.0, cache_modifier=".cg")
        counts = tl.where(m_p, PER_UNIT * tl.minimum(HB, H - o_p * HB), 0).to(means.dtype)[None, :]
        total = PER_UNIT * H
        mean = tl.sum(counts * means, axis=1) / total
        dev = means - mean[:, None]
        m2 = tl.sum(m2s + counts * dev * dev, axis=1)
        return mean, 1.0 / tl.sqrt(m2 / total + eps)

    @triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end", "phase"])
    def _forward_kernel(
        xg,  # [T, B, D*4H] (or packed, [N, D*4H])  x_t W_ih^T of every direction, storage dtype
        bias,  # [D, 4H]  b_ih + b_hh, accumulation dtype
        w_hh,  # [D, 4H, H]  weight_hh (DropConnect mask applied), storage dtype
        peephole,  # [D, 3H]  (p_i, p_f, p_o), accumulation dtype
        lengths,  # [B] int64
        offsets,  # [T] int64: with PACKED, the first row of each step in the per-token tensors
        rec_mask,  # [D, B, H]  recurrent-dropout mask on h_{t-1}
        zh_mask,  # [D, T, B, H]  zoneout keep masks (training)
        zc_mask,  # [D, T, B, H]
        h_buf,  # [2, D, B, H]  ping-pong h state: step s reads slot s % 2, writes the other
        c_state,  # [D, B, H]  c_0 in, c_n out, accumulation dtype
        y,  # [T, B, D*H]
        gates_out,  # [T, B, D*4H]  saved activations i, f, g, o
        c_fresh_out,  # [T, B, D*H]  saved c_t before zoneout, accumulation dtype
        c_carried_out,  # [T, B, D*H]  saved carried c_t (zoneout on c only)
        clip_out,  # [T, B, D*4H] int8: 1 where the gate pre-activation was inside the clip
        cell_clip_out,  # [T, B, D*H] int8: 1 where c_t was inside the cell clip
        ln_hh,  # [D, 4H]  layer norm of h_{t-1} W_hh^T: its weight, accumulation dtype
        ln_cell_w,  # [D, H]  layer norm of c_t: weight
        ln_cell_b,  # [D, H]  and bias
        ln_stats,  # [2, D, B, LN_SLOTS, 2]  each program's (mean, M2) of its rows: gates, then cell
        hh_hat_out,  # [T, B, D*4H]  saved (h_{t-1} W_hh^T - mean) * rstd, accumulation dtype
        ln_rows_out,  # [T, B, D*3]  saved per row: rstd of h_{t-1} W_hh^T, mean and rstd of c_t
        w_hr,  # [D, P, H]  the projection (PROJ)
        m_buf,  # [D, B, H]  m_t = o_t * act(c_t), exchanged between the programs (PROJ)
        m_out,  # [T, B, D*H]  saved m_t (PROJ)
        proj_clip_out,  # [T, B, D*P] int8: 1 where m_t W_hr^T was inside the projection clip
        counters,  # [D, NB] int32 barrier arrivals
        error,  # [1] int32
        T,
        B,
        step_begin,
        step_end,
        phase,
        clip,
        cell_clip,
        z_h,
        z_c,
        ln_eps,
        proj_clip,
        H: tl.constexpr,
        D: tl.constexpr,
        H_PAD: tl.constexpr,
        HB: tl.constexpr,
        BB: tl.constexpr,
        ACC: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        ACT_GATE: tl.constexpr,
        ACT_IN: tl.constexpr,
        ACT_OUT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PEEPHOLE: tl.constexpr,
        HAS_CLIP: tl.constexpr,
        COUPLED: tl.constexpr,
        HAS_CELL_CLIP: tl.constexpr,
        ZONEOUT_H: tl.constexpr,
        ZONEOUT_C: tl.constexpr,
        HAS_REC_MASK: tl.constexpr,
        HAS_LENGTHS: tl.constexpr,
        PACKED: tl.constexpr,
        W_AS_A: tl.constexpr,
        K_CHUNK: tl.constexpr,
        NEEDS_H_PREV: tl.constexpr,
        SAVE: tl.constexpr,
        LAYER_NORM: tl.constexpr,
        NP_PAD: tl.constexpr,
        LN_SLOTS: tl.constexpr,
        PROJ: tl.constexpr,
        P: tl.constexpr,
        P_PAD: tl.constexpr,
        PB: tl.constexpr,
        PROJ_K: tl.constexpr,
        HAS_PROJ_CLIP: tl.constexpr,
        USE_BARRIER: tl.constexpr,
    ):
        """Steps ``[step_begin, step_end)`` of the recurrence (docs/equations.md, sections 1-7):
        ``a_t = x_t W_ih^T + b + h_{t-1} W_hh^T``, the gates, ``c_t``, ``h_t``, per program slice.
        ``h`` has ``P`` units (the projection's size, else ``P = H``); a program owns ``PB`` of them
        (``PB = HB`` without projection).

        A step is a sequence of phases, each ended by the group's barrier: with ``LAYER_NORM``
        (``xg`` then holds ``LN(x_t W_ih^T)``) one publishes each program's moments of its share of
        ``h_{t-1} W_hh^T``, the next the moments of its share of ``c_t``; with ``PROJ`` one publishes
        the program's ``m_t`` for every program's slice of ``h_t = m_t W_hr^T``; the last publishes
        ``h_t``. ``phase`` ``_ALL_PHASES`` runs them all (persistent); one launch per step runs each
        phase as a launch that recomputes the step up to its phase and stores only that phase's
        results."""
        i_h, i_b, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        G: tl.constexpr = 4 * H
        o_j = i_h * HB + tl.arange(0, HB)  # hidden (cell) units owned
        o_q = i_h * PB + tl.arange(0, PB)  # units of h owned (the same without projection)
        o_b = i_b * BB + tl.arange(0, BB)  # batch rows owned
        m_j, m_q, m_b = o_j < H, o_q < P, o_b < B
        m_bj = m_b[:, None] & m_j[None, :]
        m_bq = m_b[:, None] & m_q[None, :]
        o_b64 = o_b.to(tl.int64)
        d64 = i_d.to(tl.int64)

        # weight_hh rows of the owned units, gate-interleaved (entry 4 u + gate), as the product's
        # A operand [4 HB, P] (it can stay in registers) or its B operand [P, 4 HB]. With one K chunk
        # the slice is loaded once, before the time loop; with several it is streamed from L2 each step.
        o_col = tl.arange(0, 4 * HB)
        col_unit, col_gate = i_h * HB + o_col // 4, o_col % 4
        w_row = (col_gate * H + col_unit).to(tl.int64)
        m_col = col_unit < H
        w_dir = w_hh + d64 * G * P
        rec_dir = rec_mask + d64 * B * P
        RESIDENT: tl.constexpr = K_CHUNK == P_PAD
        if RESIDENT:
            b_w = _weight_row_chunk(w_dir, w_row, m_col, 0, P, K_CHUNK, W_AS_A)

        if HAS_BIAS:
            p_bias = bias + i_d * G + o_j
            b_bi = tl.load(p_bias, mask=m_j, other=0.0)[None, :]
            b_bf = tl.load(p_bias + H, mask=m_j, other=0.0)[None, :]
            b_bg = tl.load(p_bias + 2 * H, mask=m_j, other=0.0)[None, :]
            b_bo = tl.load(p_bias + 3 * H, mask=m_j, other=0.0)[None, :]
        if PEEPHOLE:
            p_peep = peephole + i_d * 3 * H + o_j
            b_pi = tl.load(p_peep, mask=m_j, other=0.0)[None, :]
            b_pf = tl.load(p_peep + H, mask=m_j, other=0.0)[None, :]
            b_po = tl.load(p_peep + 2 * H, mask=m_j, other=0.0)[None, :]
        if HAS_REC_MASK and RESIDENT:
            b_rec = _row_chunk(rec_dir, o_b64, m_b, 0, P, K_CHUNK, W_AS_A)
        b_len = _lengths_of(lengths, o_b, m_b, BB, HAS_LENGTHS)

        p_state = (d64 * B + o_b64[:, None]) * H + o_j[None, :]  # [BB, HB] in a [D, B, H] tensor
        b_c = tl.load(c_state + p_state, mask=m_bj, other=0.0)
        p_counter = counters + i_d * tl.num_programs(1) + i_b
        n_group = tl.num_programs(0)
        # barriers (phases) per step: layer norm's two exchanges, the projection's, then h_t's
        BARRIERS: tl.constexpr = 1 + (2 if LAYER_NORM else 0) + (1 if PROJ else 0)
        PH_PROJ: tl.constexpr = 2 if LAYER_NORM else 0
        if LAYER_NORM:
            b_ln_hh = tl.load(ln_hh + d64 * G + col_gate * H + col_unit, mask=m_col, other=0.0)[None, :]  # [1, 4 HB]
            b_ln_cw = tl.load(ln_cell_w + d64 * H + o_j, mask=m_j, other=0.0)[None, :]
            b_ln_cb = tl.load(ln_cell_b + d64 * H + o_j, mask=m_j, other=0.0)[None, :]
            p_ln_gates = ln_stats + ((0 * D + d64) * B + o_b64) * LN_SLOTS * 2  # [BB]
            p_ln_cell = ln_stats + ((1 * D + d64) * B + o_b64) * LN_SLOTS * 2

        lo, hi = _step_range(lengths, o_b, m_b, T, i_d, 1, HAS_LENGTHS)
        s_lo = tl.maximum(step_begin, lo)
        # num_stages=1: a step's loads of h_{t-1} must not be prefetched before the step that writes it
        for s in tl.range(s_lo, tl.minimum(step_end, hi), num_stages=1):
            t = _time_index(s, T, i_d)
            t64 = t.to(tl.int64)
            r64 = _rows_at(offsets, t, B, o_b64, PACKED)
            m_live = _live(m_b, t, b_len, PACKED)
            m_rj = m_live[:, None] & m_j[None, :]  # the [BB, HB] entries that have a row
            m_rq = m_live[:, None] & m_q[None, :]  # the same for the [BB, PB] units of h
            p_h_prev = h_buf + ((s % 2) * D + d64) * B * P
            # h_{t-1} [BB, P] (or its transpose [P, BB] against W as A) times the weight slice
            if RESIDENT:
                b_h = _row_chunk(p_h_prev, o_b64, m_b, 0, P, K_CHUNK, W_AS_A)
                if HAS_REC_MASK:
                    b_h = (b_h.to(ACC) * b_rec).to(b_h.dtype)
                if W_AS_A:
                    acc = _product(b_w, b_h, PRECISION, ACC, DOT_IN_FP32)
                else:
                    acc = _product(b_h, b_w, PRECISION, ACC, DOT_IN_FP32)
            else:
                if W_AS_A:
                    acc = tl.zeros((4 * HB, BB), dtype=ACC)
                else:
                    acc = tl.zeros((BB, 4 * HB), dtype=ACC)
                for k0 in range(0, P_PAD, K_CHUNK):
                    b_h = _row_chunk(p_h_prev, o_b64, m_b, k0, P, K_CHUNK, W_AS_A)
                    if HAS_REC_MASK:
                        b_h = (b_h.to(ACC) * _row_chunk(rec_dir, o_b64, m_b, k0, P, K_CHUNK, W_AS_A)).to(b_h.dtype)
                    w_chunk = _weight_row_chunk(w_dir, w_row, m_col, k0, P, K_CHUNK, W_AS_A)
                    if W_AS_A:
                        acc += _product(w_chunk, b_h, PRECISION, ACC, DOT_IN_FP32)
                    else:
                        acc += _product(b_h, w_chunk, PRECISION, ACC, DOT_IN_FP32)
            if W_AS_A:
                acc = tl.trans(acc)  # [BB, 4 HB]
            if LAYER_NORM:  # LN(h_{t-1} W_hh^T) over all 4H gates of a row: every program's share
                mean_p, m2_p = _partial_moments(acc, m_col[None, :], 4 * tl.minimum(HB, H - i_h * HB))
                _publish_moments(p_ln_gates, i_h, mean_p, m2_p, m_b, _runs(phase, 0))
                _sync(p_counter, ((s - s_lo) * BARRIERS + 1) * n_group, error, USE_BARRIER)
                mean_h, rstd_h = _combined_moments(p_ln_gates, m_b, n_group, H, HB, 4, NP_PAD, ln_eps)
                hh_hat = (acc - mean_h[:, None]) * rstd_h[:, None]
                acc = hh_hat * b_ln_hh
            # column 4 u + 2 k1 + k0 holds gate 2 k1 + k0 of unit u
            even, odd = tl.split(tl.reshape(acc, (BB, HB, 2, 2)))
            a_i, a_g = tl.split(even)
            a_f, a_o = tl.split(odd)

            row = r64[:, None] * (D * G) + d64 * G + o_j[None, :]  # gate i in [T, B, D*4H]
            a_i += tl.load(xg + row, mask=m_rj, other=0.0).to(ACC)
            a_f += tl.load(xg + row + H, mask=m_rj, other=0.0).to(ACC)
            a_g += tl.load(xg + row + 2 * H, mask=m_rj, other=0.0).to(ACC)
            a_o += tl.load(xg + row + 3 * H, mask=m_rj, other=0.0).to(ACC)
            if HAS_BIAS:
                a_i += b_bi
                a_f += b_bf
                a_g += b_bg
                a_o += b_bo
            if PEEPHOLE:
                a_i += b_pi * b_c
                a_f += b_pf * b_c
            gate_i = _activate(_clipped(a_i, clip, HAS_CLIP), ACT_GATE)
            if COUPLED:
                gate_f = 1.0 - gate_i
            else:
                gate_f = _activate(_clipped(a_f, clip, HAS_CLIP), ACT_GATE)
            gate_g = _activate(_clipped(a_g, clip, HAS_CLIP), ACT_IN)
            c_fresh = gate_f * b_c + gate_i * gate_g
            if HAS_CELL_CLIP:
                inside_cell = (c_fresh >= -cell_clip) & (c_fresh <= cell_clip)
                c_fresh = _clipped(c_fresh, cell_clip, True)
            if PEEPHOLE:
                a_o += b_po * c_fresh
            gate_o = _activate(_clipped(a_o, clip, HAS_CLIP), ACT_GATE)
            if LAYER_NORM:  # LN(c_t) over the H units of a row
                mean_p, m2_p = _partial_moments(c_fresh, m_j[None, :], tl.minimum(HB, H - i_h * HB))
                _publish_moments(p_ln_cell, i_h, mean_p, m2_p, m_b, _runs(phase, 1))
                _sync(p_counter, ((s - s_lo) * BARRIERS + 2) * n_group, error, USE_BARRIER)
                mean_c, rstd_c = _combined_moments(p_ln_cell, m_b, n_group, H, HB, 1, NP_PAD, ln_eps)
                h_fresh = gate_o * _activate((c_fresh - mean_c[:, None]) * rstd_c[:, None] * b_ln_cw + b_ln_cb,
                                             ACT_OUT)
            else:
                h_fresh = gate_o * _activate(c_fresh, ACT_OUT)
            if PROJ:  # h_t = m_t W_hr^T: m_t spans every program; each takes its PB units of h
                m_t = h_fresh
                p_m = m_buf + d64 * B * H
                tl.store(p_m + o_b64[:, None] * H + o_j[None, :], m_t.to(m_buf.dtype.element_ty),
                         mask=tl.where(_runs(phase, PH_PROJ), m_bj, False))
                _sync(p_counter, ((s - s_lo) * BARRIERS + PH_PROJ + 1) * n_group, error, USE_BARRIER)
                h_fresh = tl.zeros((BB, PB), dtype=ACC)
                for k0 in range(0, H_PAD, PROJ_K):
                    m_chunk = _row_chunk(p_m, o_b64, m_b, k0, H, PROJ_K, False)  # [BB, PROJ_K]
                    o_k = k0 + tl.arange(0, PROJ_K)
                    w_chunk = tl.load(w_hr + d64 * P * H + o_q[None, :].to(tl.int64) * H + o_k[:, None],
                                      mask=(o_k < H)[:, None] & m_q[None, :], other=0.0)  # [PROJ_K, PB]
                    h_fresh += _product(m_chunk, w_chunk, PRECISION, ACC, DOT_IN_FP32)
                if HAS_PROJ_CLIP:
                    inside_proj = (h_fresh >= -proj_clip) & (h_fresh <= proj_clip)
                    h_fresh = _clipped(h_fresh, proj_clip, True)

            p_state_t = r64[:, None] * (D * H) + d64 * H + o_j[None, :]  # [T, B, D*H]
            p_out_t = r64[:, None] * (D * P) + d64 * P + o_q[None, :]  # [T, B, D*P]
            if NEEDS_H_PREV:
                p_h_own = p_h_prev + o_b64[:, None] * P + o_q[None, :]
                h_prev_own = tl.load(p_h_own, mask=m_bq, other=0.0, cache_modifier=".cg").to(ACC)
            if ZONEOUT_H == 1:
                keep_h = tl.load(zh_mask + ((d64 * T + t64) * B + o_b64[:, None]) * P + o_q[None, :], mask=m_bq,
                                 other=0.0).to(ACC)
                h_new = keep_h * h_prev_own + (1.0 - keep_h) * h_fresh
            elif ZONEOUT_H == 2:
                h_new = z_h * h_prev_own + (1.0 - z_h) * h_fresh
            else:
                h_new = h_fresh
            if ZONEOUT_C == 1:
                keep_c = tl.load(zc_mask + ((d64 * T + t64) * B + o_b64[:, None]) * H + o_j[None, :], mask=m_bj,
                                 other=0.0).to(ACC)
                c_new = keep_c * b_c + (1.0 - keep_c) * c_fresh
            elif ZONEOUT_C == 2:
                c_new = z_c * b_c + (1.0 - z_c) * c_fresh
            else:
                c_new = c_fresh
            if HAS_LENGTHS:
                active = (t < b_len)[:, None]
                h_out = tl.where(active, h_new, 0.0)
                h_new = tl.where(active, h_new, h_prev_own)
                c_new = tl.where(active, c_new, b_c)
            else:
                h_out = h_new
            # a launch that runs an earlier phase of the step only (layer norm, one launch per step)
            # stores nothing of the step's results
            finishes = _finishes(phase, BARRIERS)
            b_c = tl.where(finishes, c_new, b_c)
            m_rj = tl.where(finishes, m_rj, False)
            m_rq = tl.where(finishes, m_rq, False)
            m_next = tl.where(finishes, m_bq, False)

            tl.store(y + p_out_t, h_out.to(y.dtype.element_ty), mask=m_rq)
            p_h_next = h_buf + (((s + 1) % 2) * D + d64) * B * P + o_b64[:, None] * P + o_q[None, :]
            tl.store(p_h_next, h_new.to(h_buf.dtype.element_ty), mask=m_next)
            if SAVE and PROJ:
                tl.store(m_out + p_state_t, m_t.to(m_out.dtype.element_ty), mask=m_rj)
                if HAS_PROJ_CLIP:
                    tl.store(proj_clip_out + p_out_t, inside_proj.to(tl.int8), mask=m_rq)
            if SAVE and LAYER_NORM:
                # the normalised h_{t-1} W_hh^T of the owned gates, and (once per row) the statistics
                hat_even, hat_odd = tl.split(tl.reshape(hh_hat, (BB, HB, 2, 2)))
                hat_i, hat_g = tl.split(hat_even)
                hat_f, hat_o = tl.split(hat_odd)
                tl.store(hh_hat_out + row, hat_i, mask=m_rj)
                tl.store(hh_hat_out + row + H, hat_f, mask=m_rj)
                tl.store(hh_hat_out + row + 2 * H, hat_g, mask=m_rj)
                tl.store(hh_hat_out + row + 3 * H, hat_o, mask=m_rj)
                m_row = tl.where(i_h == 0, tl.where(finishes, _live(m_b, t, b_len, PACKED), False), False)
                p_rows = ln_rows_out + r64 * (D * 3) + d64 * 3
                tl.store(p_rows, rstd_h, mask=m_row)
                tl.store(p_rows + 1, mean_c, mask=m_row)
                tl.store(p_rows + 2, rstd_c, mask=m_row)
            if SAVE:
                p_g = gates_out + row
                tl.store(p_g, gate_i.to(gates_out.dtype.element_ty), mask=m_rj)
                tl.store(p_g + H, gate_f.to(gates_out.dtype.element_ty), mask=m_rj)
                tl.store(p_g + 2 * H, gate_g.to(gates_out.dtype.element_ty), mask=m_rj)
                tl.store(p_g + 3 * H, gate_o.to(gates_out.dtype.element_ty), mask=m_rj)
                tl.store(c_fresh_out + p_state_t, c_fresh, mask=m_rj)
                if ZONEOUT_C != 0:
                    tl.store(c_carried_out + p_state_t, c_new, mask=m_rj)
                if HAS_CLIP:
                    p_clip = clip_out + row
                    tl.store(p_clip, ((a_i >= -clip) & (a_i <= clip)).to(tl.int8), mask=m_rj)
                    tl.store(p_clip + H, ((a_f >= -clip) & (a_f <= clip)).to(tl.int8), mask=m_rj)
                    tl.store(p_clip + 2 * H, ((a_g >= -clip) & (a_g <= clip)).to(tl.int8), mask=m_rj)
                    tl.store(p_clip + 3 * H, ((a_o >= -clip) & (a_o <= clip)).to(tl.int8), mask=m_rj)
                if HAS_CELL_CLIP:
                    tl.store(cell_clip_out + p_state_t, inside_cell.to(tl.int8), mask=m_rj)
            _sync(p_counter, (s - s_lo + 1) * BARRIERS * n_group, error, USE_BARRIER)

        tl.store(c_state + p_state, b_c, mask=m_bj)

    @triton.jit
    def _gate_rows(k0, H, H_PAD: tl.constexpr, K_CHUNK: tl.constexpr):
        """Entries ``[k0, k0 + K_CHUNK)`` of the gate axis padded per gate to ``H_PAD``: their rows of a
        ``4H`` axis, and which are real."""
        o_r = k0 + tl.arange(0, K_CHUNK)
        r_unit = o_r % H_PAD
        return ((o_r // H_PAD) * H + r_unit).to(tl.int64), r_unit < H

    @triton.jit
    def _weight_column_chunk(w, o_q, m_q, k0, H, P, H_PAD: tl.constexpr, K_CHUNK: tl.constexpr, AS_A: tl.constexpr):
        """Rows (gate axis) ``[k0, k0 + K_CHUNK)`` of the owned columns ``o_q`` of ``weight_hh [4H, P]``:
        the product's B operand ``[K, PB]``, or transposed, its A operand ``[PB, K]``."""
        rows, m_r = _gate_rows(k0, H, H_PAD, K_CHUNK)
        if AS_A:
            chunk = tl.load(w + rows[None, :] * P + o_q[:, None], mask=m_q[:, None] & m_r[None, :], other=0.0)
        else:
            chunk = tl.load(w + rows[:, None] * P + o_q[None, :], mask=m_r[:, None] & m_q[None, :], other=0.0)
        return chunk

    @triton.jit
    def _dh_from_dgates(dgates, w_dir, b_w, s, T, B, i_d, offsets, b_len, o_b64, m_b, o_q, m_q, H, P,
                        D: tl.constexpr, G: tl.constexpr, H_PAD: tl.constexpr, PB: tl.constexpr, BB: tl.constexpr,
                        K_CHUNK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, W_AS_A: tl.constexpr,
                        DOT_IN_FP32: tl.constexpr, PACKED: tl.constexpr):
        """``dgates_t W_hh`` for the owned rows and units of h, ``t`` the backward's ``s``-th step:
        ``[BB, 4H] x [4H, PB]`` (or its transpose, ``W_hh^T`` as the A operand), over K chunks of the
        gate axis; with one chunk the weight slice ``b_w`` is the one loaded before the time loop.
        Padded rows of steps past a sequence's end hold zeros, so they add nothing (packed input has no
        such rows: they are masked). Returns ``[BB, PB]``."""
        t = _time_index(T - 1 - s, T, i_d)
        base = dgates + i_d.to(tl.int64) * G + _rows_at(offsets, t, B, o_b64, PACKED) * (D * G)
        m_b = _live(m_b, t, b_len, PACKED)
        if W_AS_A:
            acc = tl.zeros((PB, BB), dtype=ACC)
        else:
            acc = tl.zeros((BB, PB), dtype=ACC)
        for k0 in range(0, 4 * H_PAD, K_CHUNK):
            rows, m_r = _gate_rows(k0, H, H_PAD, K_CHUNK)
            if K_CHUNK == 4 * H_PAD:
                w_chunk = b_w
            else:
                w_chunk = _weight_column_chunk(w_dir, o_q, m_q, k0, H, P, H_PAD, K_CHUNK, W_AS_A)
            if W_AS_A:
                b_dg = tl.load(base[None, :] + rows[:, None], mask=m_r[:, None] & m_b[None, :], other=0.0,
                               cache_modifier=".cg")
                acc += _product(w_chunk, b_dg, PRECISION, ACC, DOT_IN_FP32)
            else:
                b_dg = tl.load(base[:, None] + rows[None, :], mask=m_b[:, None] & m_r[None, :], other=0.0,
                               cache_modifier=".cg")
                acc += _product(b_dg, w_chunk, PRECISION, ACC, DOT_IN_FP32)
        if W_AS_A:
            acc = tl.trans(acc)
        return acc

    @triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end", "finish", "phase"])
    def _backward_kernel(
        dy,  # [T, B, D*H]
        dh_state,  # [D, B, H]  dh_n in, dh_0 out, accumulation dtype
        dc_state,  # [D, B, H]  dc_n in, dc_0 out
        w_hh,  # [D, 4H, H]
        peephole,  # [D, 3H]
        lengths,  # [B]
        offsets,  # [T]  (PACKED)
        rec_mask,  # [D, B, H]
        zh_mask,  # [D, T, B, H]
        zc_mask,  # [D, T, B, H]
        gates,  # [T, B, D*4H]  saved activations
        c_fresh,  # [T, B, D*H]
        c_carried,  # [T, B, D*H]  (zoneout on c only)
        c0,  # [D, B, H]
        clip_in,  # [T, B, D*4H] int8
        cell_clip_in,  # [T, B, D*H] int8
        ln_hh,  # [D, 4H]  layer-norm weights (LAYER_NORM)
        ln_cell_w,  # [D, H]
        ln_cell_b,  # [D, H]
        hh_hat,  # [T, B, D*4H]  saved normalised h_{t-1} W_hh^T
        ln_rows,  # [T, B, D*3]  saved rstd of h_{t-1} W_hh^T, mean and rstd of c_t
        ln_stats,  # [2, D, B, LN_SLOTS, 2]  the programs' row sums, exchanged
        da_out,  # [T, B, D*4H]  out (LAYER_NORM): d loss / d a_t, for LN(x W_ih^T) and the biases
        dln,  # [NB, D, 6H]  out: the weights' gradients of LN(h W_hh^T) (4H) and LN(c_t) (weight H, bias H)
        dgates,  # [T, B, D*4H]  out: d loss / d (h_{t-1} W_hh^T), which is d loss / d a_t without layer norm
        dpeep,  # [NB, D, 3H]  out: peephole gradient summed over this batch block's rows
        w_hr,  # [D, P, H]  the projection (PROJ)
        proj_clip_in,  # [T, B, D*P] int8
        dhp_out,  # [T, B, D*P]  out: d loss / d (m_t W_hr^T), exchanged between the programs (PROJ)
        counters,  # [D, NB] int32
        error,  # [1] int32
        T,
        B,
        step_begin,
        step_end,
        finish,
        phase,
        z_h,
        z_c,
        H: tl.constexpr,
        D: tl.constexpr,
        H_PAD: tl.constexpr,
        HB: tl.constexpr,
        BB: tl.constexpr,
        ACC: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        ACT_GATE: tl.constexpr,
        ACT_IN: tl.constexpr,
        ACT_OUT: tl.constexpr,
        PEEPHOLE: tl.constexpr,
        HAS_CLIP: tl.constexpr,
        COUPLED: tl.constexpr,
        HAS_CELL_CLIP: tl.constexpr,
        ZONEOUT_H: tl.constexpr,
        ZONEOUT_C: tl.constexpr,
        HAS_REC_MASK: tl.constexpr,
        HAS_LENGTHS: tl.constexpr,
        PACKED: tl.constexpr,
        W_AS_A: tl.constexpr,
        K_CHUNK: tl.constexpr,
        LAYER_NORM: tl.constexpr,
        NP_PAD: tl.constexpr,
        LN_SLOTS: tl.constexpr,
        PROJ: tl.constexpr,
        P: tl.constexpr,
        P_PAD: tl.constexpr,
        PB: tl.constexpr,
        PROJ_K: tl.constexpr,
        HAS_PROJ_CLIP: tl.constexpr,
        USE_BARRIER: tl.constexpr,
    ):
        """Backward steps ``[step_begin, step_end)``, counted from the last processed step
        (docs/equations.md section 10). Each step has two parts: first ``dh`` receives
        ``dgates W_hh`` of the step before (every program's slice of it, published before the
        barrier), then the owned slice of this step's ``dgates`` is computed and published.
        ``finish`` runs the last product, which gives ``dh_0``; one launch per step passes it to an
        extra, empty launch, so that a launch boundary separates the parts. Steps past the end of
        every sequence of the batch block are skipped (their dgates rows stay zero).

        With ``PROJ``, ``dm_t = d(m_t W_hr^T) W_hr`` needs every program's units of h: a phase
        publishes them. With ``LAYER_NORM`` the backward of ``LN(c_t)`` and of ``LN(h_{t-1} W_hh^T)``
        each need two sums over a whole row: each is a phase that publishes the program's share.
        Every phase ends at the group's barrier (``phase`` as in the forward kernel)."""
        i_h, i_b, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        G: tl.constexpr = 4 * H
        o_j = i_h * HB + tl.arange(0, HB)  # hidden (cell) units owned
        o_q = i_h * PB + tl.arange(0, PB)  # units of h owned (the same without projection)
        o_b = i_b * BB + tl.arange(0, BB)
        m_j, m_q, m_b = o_j < H, o_q < P, o_b < B
        m_bj = m_b[:, None] & m_j[None, :]
        m_bq = m_b[:, None] & m_q[None, :]
        o_b64 = o_b.to(tl.int64)
        d64 = i_d.to(tl.int64)

        # weight_hh columns of the owned units of h (the gate axis padded per gate to H_PAD): the
        # product's B operand [4H, PB], or transposed, its A operand [PB, 4H]; loaded once when it is
        # one K chunk, else streamed from L2 each step
        w_dir = w_hh + d64 * G * P
        if K_CHUNK == 4 * H_PAD:
            b_w = _weight_column_chunk(w_dir, o_q, m_q, 0, H, P, H_PAD, K_CHUNK, W_AS_A)
        else:
            b_w = 0.0  # unused

        if PEEPHOLE:
            p_peep = peephole + i_d * 3 * H + o_j
            b_pi = tl.load(p_peep, mask=m_j, other=0.0)[None, :]
            b_pf = tl.load(p_peep + H, mask=m_j, other=0.0)[None, :]
            b_po = tl.load(p_peep + 2 * H, mask=m_j, other=0.0)[None, :]
            d_pi = tl.zeros((HB,), dtype=ACC)
            d_pf = tl.zeros((HB,), dtype=ACC)
            d_po = tl.zeros((HB,), dtype=ACC)
        if HAS_REC_MASK:
            b_rec = tl.load(rec_mask + (d64 * B + o_b64[:, None]) * P + o_q[None, :], mask=m_bq, other=0.0).to(ACC)
        b_len = _lengths_of(lengths, o_b, m_b, BB, HAS_LENGTHS)

        # barriers (phases) per step: the projection's exchange, layer norm's two, then dgates'
        BARRIERS: tl.constexpr = 1 + (2 if LAYER_NORM else 0) + (1 if PROJ else 0)
        PH_LN_CELL: tl.constexpr = 1 if PROJ else 0
        PH_LN_GATES: tl.constexpr = PH_LN_CELL + 1
        if LAYER_NORM:
            p_gate_w = ln_hh + d64 * G + o_j
            b_gi = tl.load(p_gate_w, mask=m_j, other=0.0)[None, :]
            b_gf = tl.load(p_gate_w + H, mask=m_j, other=0.0)[None, :]
            b_gg = tl.load(p_gate_w + 2 * H, mask=m_j, other=0.0)[None, :]
            b_go = tl.load(p_gate_w + 3 * H, mask=m_j, other=0.0)[None, :]
            b_ln_cw = tl.load(ln_cell_w + d64 * H + o_j, mask=m_j, other=0.0)[None, :]
            b_ln_cb = tl.load(ln_cell_b + d64 * H + o_j, mask=m_j, other=0.0)[None, :]
            d_gi = tl.zeros((HB,), dtype=ACC)
            d_gf = tl.zeros((HB,), dtype=ACC)
            d_gg = tl.zeros((HB,), dtype=ACC)
            d_go = tl.zeros((HB,), dtype=ACC)
            d_cw = tl.zeros((HB,), dtype=ACC)
            d_cb = tl.zeros((HB,), dtype=ACC)
            p_ln_gates = ln_stats + ((0 * D + d64) * B + o_b64) * LN_SLOTS * 2  # [BB]
            p_ln_cell = ln_stats + ((1 * D + d64) * B + o_b64) * LN_SLOTS * 2

        p_state = (d64 * B + o_b64[:, None]) * H + o_j[None, :]
        p_hstate = (d64 * B + o_b64[:, None]) * P + o_q[None, :]  # [BB, PB] in a [D, B, P] tensor
        b_dh = tl.load(dh_state + p_hstate, mask=m_bq, other=0.0)
        b_dc = tl.load(dc_state + p_state, mask=m_bj, other=0.0)
        b_c0 = tl.load(c0 + p_state, mask=m_bj, other=0.0)
        p_counter = counters + i_d * tl.num_programs(1) + i_b
        n_group = tl.num_programs(0)

        lo, hi = _step_range(lengths, o_b, m_b, T, i_d, 0, HAS_LENGTHS)
        s_lo = tl.maximum(step_begin, lo)
        # num_stages=1: a step's loads of dgates must not be prefetched before the step that writes it
        for s in tl.range(s_lo, tl.minimum(step_end, hi), num_stages=1):
            # a launch that runs an earlier phase of the step only stores nothing of its results
            finishes = _finishes(phase, BARRIERS)
            dh_carried, dc_carried = b_dh, b_dc
            if s > lo:
                dh_in = _dh_from_dgates(dgates, w_dir, b_w, s - 1, T, B, i_d, offsets, b_len, o_b64, m_b, o_q, m_q, H,
                                        P, D, G, H_PAD, PB, BB, K_CHUNK, PRECISION, ACC, W_AS_A, DOT_IN_FP32, PACKED)
                if HAS_REC_MASK:
                    dh_in = dh_in * b_rec
                b_dh += dh_in

            s_fwd = T - 1 - s  # the forward pass's step index
            t = _time_index(s_fwd, T, i_d)
            t64 = t.to(tl.int64)
            t_prev = tl.where(i_d == 1, t + 1, t - 1)  # the step processed before t
            r64 = _rows_at(offsets, t, B, o_b64, PACKED)
            # t_prev is -1 or T at a direction's first step, where nothing is read from it
            r_prev = _rows_at(offsets, tl.minimum(tl.maximum(t_prev, 0), T - 1), B, o_b64, PACKED)
            m_live = _live(m_b, t, b_len, PACKED)
            m_rj = m_live[:, None] & m_j[None, :]
            m_rq = m_live[:, None] & m_q[None, :]
            row = r64[:, None] * (D * G) + d64 * G + o_j[None, :]
            p_state_t = r64[:, None] * (D * H) + d64 * H + o_j[None, :]
            p_state_prev = r_prev[:, None] * (D * H) + d64 * H + o_j[None, :]
            p_out_t = r64[:, None] * (D * P) + d64 * P + o_q[None, :]

            dh_total = b_dh + tl.load(dy + p_out_t, mask=m_rq, other=0.0).to(ACC)
            if ZONEOUT_H == 1:
                keep_h = tl.load(zh_mask + ((d64 * T + t64) * B + o_b64[:, None]) * P + o_q[None, :], mask=m_bq,
                                 other=0.0).to(ACC)
                dh_fresh, dh_kept = (1.0 - keep_h) * dh_total, keep_h * dh_total
            elif ZONEOUT_H == 2:
                dh_fresh, dh_kept = (1.0 - z_h) * dh_total, z_h * dh_total
            else:
                dh_fresh, dh_kept = dh_total, tl.zeros_like(dh_total)
            if ZONEOUT_C == 1:
                keep_c = tl.load(zc_mask + ((d64 * T + t64) * B + o_b64[:, None]) * H + o_j[None, :], mask=m_bj,
                                 other=0.0).to(ACC)
                dc_fresh, dc_kept = (1.0 - keep_c) * b_dc, keep_c * b_dc
            elif ZONEOUT_C == 2:
                dc_fresh, dc_kept = (1.0 - z_c) * b_dc, z_c * b_dc
            else:
                dc_fresh = b_dc
            if PROJ:  # h_t = clip(m_t W_hr^T): dm_t = d(m_t W_hr^T) W_hr, over every program's units of h
                d_proj = dh_fresh
                if HAS_PROJ_CLIP:
                    d_proj = tl.where(tl.load(proj_clip_in + p_out_t, mask=m_rq, other=0) != 0, d_proj, 0.0)
                if HAS_LENGTHS:  # past a sequence's end h_t was frozen: no gradient to the projection
                    d_proj = tl.where((t < b_len)[:, None], d_proj, 0.0)
                tl.store(dhp_out + p_out_t, d_proj.to(dhp_out.dtype.element_ty),
                         mask=tl.where(_runs(phase, 0), m_rq, False))
                _sync(p_counter, ((s - s_lo) * BARRIERS + 1) * n_group, error, USE_BARRIER)
                p_dproj = dhp_out + r64 * (D * P) + d64 * P  # [BB]
                dh_fresh = tl.zeros((BB, HB), dtype=ACC)  # now d loss / d m_t
                for k0 in range(0, P_PAD, PROJ_K):
                    o_k = k0 + tl.arange(0, PROJ_K)
                    m_k = o_k < P
                    d_chunk = tl.load(p_dproj[:, None] + o_k[None, :], mask=m_live[:, None] & m_k[None, :], other=0.0,
                                      cache_modifier=".cg")  # [BB, PROJ_K]
                    w_chunk = tl.load(w_hr + d64 * P * H + o_k[:, None].to(tl.int64) * H + o_j[None, :],
                                      mask=m_k[:, None] & m_j[None, :], other=0.0)  # [PROJ_K, HB]
                    dh_fresh += _product(d_chunk, w_chunk, PRECISION, ACC, DOT_IN_FP32)

            gate_i = tl.load(gates + row, mask=m_rj, other=0.0).to(ACC)
            gate_f = tl.load(gates + row + H, mask=m_rj, other=0.0).to(ACC)
            gate_g = tl.load(gates + row + 2 * H, mask=m_rj, other=0.0).to(ACC)
            gate_o = tl.load(gates + row + 3 * H, mask=m_rj, other=0.0).to(ACC)
            b_cf = tl.load(c_fresh + p_state_t, mask=m_rj, other=0.0)
            # c_{t-1}: the carried state after the step processed before t, or c_0
            # (the reverse direction's first real step follows only padding, which left c_0 in place)
            prev_real = m_bj & (tl.full((BB, HB), s_fwd, tl.int32) > 0)
            if HAS_LENGTHS:
                prev_real = prev_real & (t_prev < b_len)[:, None]
            if ZONEOUT_C != 0:
                c_prev = tl.load(c_carried + p_state_prev, mask=prev_real, other=0.0)
            else:
                c_prev = tl.load(c_fresh + p_state_prev, mask=prev_real, other=0.0)
            c_prev = tl.where(prev_real, c_prev, b_c0)

            if LAYER_NORM:
                p_rows = ln_rows + r64 * (D * 3) + d64 * 3
                m_live = _live(m_b, t, b_len, PACKED)
                rstd_h = tl.load(p_rows, mask=m_live, other=0.0)[:, None]
                mean_c = tl.load(p_rows + 1, mask=m_live, other=0.0)[:, None]
                rstd_c = tl.load(p_rows + 2, mask=m_live, other=0.0)[:, None]
                c_hat = tl.where(m_rj, (b_cf - mean_c) * rstd_c, 0.0)
                cell_out = _activate(c_hat * b_ln_cw + b_ln_cb, ACT_OUT)
            else:
                cell_out = _activate(b_cf, ACT_OUT)
            da_o = dh_fresh * cell_out * _activation_grad(gate_o, ACT_GATE)
            d_cell = dh_fresh * gate_o * _activation_grad(cell_out, ACT_OUT)  # d loss / d (the cell's output)
            if LAYER_NORM:  # back through LN(c_t): two sums over the row's H units
                d_cell = tl.where(m_rj, d_cell, 0.0)
                if HAS_LENGTHS:  # padding rows (past a sequence's end) add nothing
                    d_cell = tl.where((t < b_len)[:, None], d_cell, 0.0)
                d_cw += tl.where(finishes, tl.sum(d_cell * c_hat, axis=0), 0.0)
                d_cb += tl.where(finishes, tl.sum(d_cell, axis=0), 0.0)
                d_hat = d_cell * b_ln_cw
                _publish_sums(p_ln_cell, i_h, tl.sum(d_hat, axis=1), tl.sum(d_hat * c_hat, axis=1), m_b,
                              _runs(phase, PH_LN_CELL))
                _sync(p_counter, ((s - s_lo) * BARRIERS + PH_LN_CELL + 1) * n_group, error, USE_BARRIER)
                sum_d, sum_dc = _combined_sums(p_ln_cell, m_b, n_group, NP_PAD)
                d_cell = rstd_c * (d_hat - (sum_d[:, None] + c_hat * sum_dc[:, None]) / H)
            dc_fresh += d_cell
            if HAS_CLIP:
                p_clip = clip_in + row
                da_o = tl.where(tl.load(p_clip + 3 * H, mask=m_rj, other=0) != 0, da_o, 0.0)
            if PEEPHOLE:
                dc_fresh += da_o * b_po
            if HAS_CELL_CLIP:
                dc_fresh = tl.where(tl.load(cell_clip_in + p_state_t, mask=m_rj, other=0) != 0, dc_fresh, 0.0)
            d_i = dc_fresh * gate_g
            d_f = dc_fresh * c_prev
            if COUPLED:
                d_i -= d_f  # f = 1 - i
                da_f = tl.zeros_like(d_f)
            else:
                da_f = d_f * _activation_grad(gate_f, ACT_GATE)
            da_i = d_i * _activation_grad(gate_i, ACT_GATE)
            da_g = dc_fresh * gate_i * _activation_grad(gate_g, ACT_IN)
            if HAS_CLIP:
                da_i = tl.where(tl.load(p_clip, mask=m_rj, other=0) != 0, da_i, 0.0)
                da_g = tl.where(tl.load(p_clip + 2 * H, mask=m_rj, other=0) != 0, da_g, 0.0)
                if not COUPLED:
                    da_f = tl.where(tl.load(p_clip + H, mask=m_rj, other=0) != 0, da_f, 0.0)
            dc_new = dc_fresh * gate_f
            if PEEPHOLE:
                dc_new += da_i * b_pi + da_f * b_pf
            if ZONEOUT_C != 0:
                dc_new += dc_kept

            if HAS_LENGTHS:
                # past a sequence's end the state was frozen and the output a constant zero
                active = (t < b_len)[:, None]
                da_i = tl.where(active, da_i, 0.0)
                da_f = tl.where(active, da_f, 0.0)
                da_g = tl.where(active, da_g, 0.0)
                da_o = tl.where(active, da_o, 0.0)
                b_dh = tl.where(active, dh_kept, b_dh)
                b_dc = tl.where(active, dc_new, b_dc)
            else:
                b_dh = dh_kept
                b_dc = dc_new
            if PEEPHOLE:
                d_pi += tl.where(finishes, tl.sum(da_i * c_prev, axis=0), 0.0)
                d_pf += tl.where(finishes, tl.sum(da_f * c_prev, axis=0), 0.0)
                d_po += tl.where(finishes, tl.sum(da_o * b_cf, axis=0), 0.0)
            b_dh = tl.where(finishes, b_dh, dh_carried)
            b_dc = tl.where(finishes, b_dc, dc_carried)
            m_live_j = m_rj
            m_rj = tl.where(finishes, m_rj, False)
            if LAYER_NORM:
                # a_t = LN(x W_ih^T) + LN(h_{t-1} W_hh^T) + b: d a_t goes to the input side and the biases
                # as it is, and back through LN(h_{t-1} W_hh^T): two sums over the row's 4H gates
                tl.store(da_out + row, da_i, mask=m_rj)
                tl.store(da_out + row + H, da_f, mask=m_rj)
                tl.store(da_out + row + 2 * H, da_g, mask=m_rj)
                tl.store(da_out + row + 3 * H, da_o, mask=m_rj)
                hat_i = tl.load(hh_hat + row, mask=m_live_j, other=0.0)
                hat_f = tl.load(hh_hat + row + H, mask=m_live_j, other=0.0)
                hat_g = tl.load(hh_hat + row + 2 * H, mask=m_live_j, other=0.0)
                hat_o = tl.load(hh_hat + row + 3 * H, mask=m_live_j, other=0.0)
                d_gi += tl.where(finishes, tl.sum(da_i * hat_i, axis=0), 0.0)
                d_gf += tl.where(finishes, tl.sum(da_f * hat_f, axis=0), 0.0)
                d_gg += tl.where(finishes, tl.sum(da_g * hat_g, axis=0), 0.0)
                d_go += tl.where(finishes, tl.sum(da_o * hat_o, axis=0), 0.0)
                dhat_i, dhat_f, dhat_g, dhat_o = da_i * b_gi, da_f * b_gf, da_g * b_gg, da_o * b_go
                sum_d = tl.sum(dhat_i + dhat_f + dhat_g + dhat_o, axis=1)
                sum_dh = tl.sum(dhat_i * hat_i + dhat_f * hat_f + dhat_g * hat_g + dhat_o * hat_o, axis=1)
                _publish_sums(p_ln_gates, i_h, sum_d, sum_dh, m_b, _runs(phase, PH_LN_GATES))
                _sync(p_counter, ((s - s_lo) * BARRIERS + PH_LN_GATES + 1) * n_group, error, USE_BARRIER)
                sum_d, sum_dh = _combined_sums(p_ln_gates, m_b, n_group, NP_PAD)
                mean_d, mean_dh = (sum_d / G)[:, None], (sum_dh / G)[:, None]
                da_i = rstd_h * (dhat_i - mean_d - hat_i * mean_dh)
                da_f = rstd_h * (dhat_f - mean_d - hat_f * mean_dh)
                da_g = rstd_h * (dhat_g - mean_d - hat_g * mean_dh)
                da_o = rstd_h * (dhat_o - mean_d - hat_o * mean_dh)
            out_ty = dgates.dtype.element_ty
            tl.store(dgates + row, da_i.to(out_ty), mask=m_rj)
            tl.store(dgates + row + H, da_f.to(out_ty), mask=m_rj)
            tl.store(dgates + row + 2 * H, da_g.to(out_ty), mask=m_rj)
            tl.store(dgates + row + 3 * H, da_o.to(out_ty), mask=m_rj)
            _sync(p_counter, (s - s_lo + 1) * BARRIERS * n_group, error, USE_BARRIER)

        if (finish != 0) & (hi > lo):
            dh_in = _dh_from_dgates(dgates, w_dir, b_w, hi - 1, T, B, i_d, offsets, b_len, o_b64, m_b, o_q, m_q, H, P,
                                    D, G, H_PAD, PB, BB, K_CHUNK, PRECISION, ACC, W_AS_A, DOT_IN_FP32, PACKED)
            if HAS_REC_MASK:
                dh_in = dh_in * b_rec
            b_dh += dh_in
        tl.store(dh_state + p_hstate, b_dh, mask=m_bq)
        tl.store(dc_state + p_state, b_dc, mask=m_bj)
        if PEEPHOLE:
            p_dpeep = dpeep + (i_b * D + i_d) * 3 * H + o_j
            tl.store(p_dpeep, tl.load(p_dpeep, mask=m_j, other=0.0) + d_pi, mask=m_j)
            tl.store(p_dpeep + H, tl.load(p_dpeep + H, mask=m_j, other=0.0) + d_pf, mask=m_j)
            tl.store(p_dpeep + 2 * H, tl.load(p_dpeep + 2 * H, mask=m_j, other=0.0) + d_po, mask=m_j)
        if LAYER_NORM:  # this launch's share, added: one launch per step accumulates over the launches
            p_dln = dln + (i_b * D + i_d) * 6 * H + o_j
            tl.store(p_dln, tl.load(p_dln, mask=m_j, other=0.0) + d_gi, mask=m_j)
            tl.store(p_dln + H, tl.load(p_dln + H, mask=m_j, other=0.0) + d_gf, mask=m_j)
            tl.store(p_dln + 2 * H, tl.load(p_dln + 2 * H, mask=m_j, other=0.0) + d_gg, mask=m_j)
            tl.store(p_dln + 3 * H, tl.load(p_dln + 3 * H, mask=m_j, other=0.0) + d_go, mask=m_j)
            tl.store(p_dln + 4 * H, tl.load(p_dln + 4 * H, mask=m_j, other=0.0) + d_cw, mask=m_j)
            tl.store(p_dln + 5 * H, tl.load(p_dln + 5 * H, mask=m_j, other=0.0) + d_cb, mask=m_j)


# -- launchers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """How a kernel's work is split: ``HB`` hidden units x ``BB`` batch rows per program.

    ``persistent``: one launch runs every step; the ``D x ceil(B / BB)`` groups of
    ``ceil(H / HB)`` programs each meet at a barrier per step (``barrier`` is False when a group
    is a single program). Otherwise one launch per step. ``k_chunk``: the recurrent product's
    reduction is split into chunks of this size (its full length, ``H`` or ``4H`` padded, keeps the
    weight slice loaded once for the whole sequence; shorter chunks stream it from L2 each step).
    """

    hb: int
    bb: int
    persistent: bool
    barrier: bool
    k_chunk: int
    # the weight slice as tl.dot's A operand rather than its B operand
    w_as_a: bool = True
    num_warps: int = 4

    def shape(self, batch: int, hidden: int, directions: int) -> tuple[int, int, int]:
        return (triton.cdiv(hidden, self.hb), triton.cdiv(batch, self.bb), directions)


# Operand bytes one program stages per step for the recurrent product (its weight slice and a block
# of h or dgates): (whole reduction kept loaded, one streamed chunk), per kernel. From Triton's sm_90
# builds (engines/triton_build.py, benchmarks/triton_resources.py): within these the kernels build
# without register spills and well inside an H100 SM's 227 KB of shared memory; the backward, with
# more live state, spills above 32 KB.
_STAGED_BYTES = {"forward": (96 * 1024, 48 * 1024), "backward": (32 * 1024, 32 * 1024)}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def hidden_pad(hidden: int) -> int:
    """``H`` rounded up to a power of two, at least 16 (``tl.dot``'s smallest K)."""
    return max(16, _pow2(hidden))


def _min_hb(kind: str) -> int:
    """``tl.dot`` needs every side >= 16: the forward's product is ``[BB, H] x [H, 4 HB]``, so
    ``HB >= 4``; the backward's is ``[BB, 4H] x [4H, HB]``, so ``HB >= 16``."""
    return 4 if kind == "forward" else 16


def k_chunk(kind: str, hidden: int, hb: int, bb: int, dtype: torch.dtype) -> int:
    """The reduction's chunk: all of it if the operands fit the kernel's resident budget
    (:data:`_STAGED_BYTES`), else halved until they fit its chunk budget (at least 16)."""
    total, rows = (hidden_pad(hidden), 4 * hb) if kind == "forward" else (4 * hidden_pad(hidden), hb)
    per_k = (rows + bb) * torch.empty((), dtype=dtype).element_size()
    resident, streamed = _STAGED_BYTES[kind]
    if per_k * total <= resident:
        return total
    chunk = total
    while chunk > 16 and per_k * chunk > streamed:
        chunk //= 2
    return chunk


def per_step_grid(kind: str, grid: Grid, hidden: int, dtype: torch.dtype) -> Grid:
    """The one-launch-per-step split that replaces a persistent ``grid`` that does not fit the GPU.
    It keeps ``BB``, so the buffers sized by the number of batch blocks stay valid."""
    hb = _min_hb(kind)
    return Grid(hb=hb, bb=grid.bb, persistent=False, barrier=False, k_chunk=k_chunk(kind, hidden, hb, grid.bb, dtype),
                w_as_a=grid.w_as_a)


def plan_grid(kind: str, batch: int, hidden: int, directions: int, dtype: torch.dtype, sms: int) -> Grid:
    """The split of ``kind`` ("forward" or "backward") for one layer on a GPU with ``sms`` SMs: ``HB``
    grows from its minimum until the programs fit one per SM (else one launch per step); the
    product's reduction is chunked so that its operands fit on chip."""
    h_pad = hidden_pad(hidden)
    bb = max(16, _pow2(batch)) if batch <= 64 else 64
    groups = directions * triton.cdiv(batch, bb)
    hb = _min_hb(kind)
    while groups * triton.cdiv(hidden, hb) > sms and hb < h_pad:
        hb *= 2
    chunk = k_chunk(kind, hidden, hb, bb, dtype)
    staged = (4 * hb if kind == "forward" else hb) + bb
    # more warps for big staged operands or a big elementwise tile (register pressure, from the builds)
    big = staged * chunk * torch.empty((), dtype=dtype).element_size() > 32 * 1024 or hb * bb >= 1024
    grid = Grid(hb=hb, bb=bb, persistent=True, barrier=triton.cdiv(hidden, hb) > 1, k_chunk=chunk,
                num_warps=8 if big else 4)
    if groups * triton.cdiv(hidden, hb) > sms:
        return per_step_grid(kind, grid, hidden, dtype)
    return grid


def choose_grid(kind: str, batch: int, hidden: int, directions: int, dtype: torch.dtype, device: torch.device) -> Grid:
    """:func:`plan_grid` for ``device``; interpreted (CPU) runs get one program per group."""
    if INTERPRET or device.type != "cuda":
        # interpreted programs run one after another: one program per group
        h_pad, bb = hidden_pad(hidden), max(16, _pow2(batch))
        return Grid(hb=h_pad, bb=bb, persistent=True, barrier=False, k_chunk=k_chunk(kind, hidden, h_pad, bb, dtype))
    return plan_grid(kind, batch, hidden, directions, dtype, torch.cuda.get_device_properties(device).multi_processor_count)


_ALL_PHASES = 7  # the kernels' `phase` that runs every phase of a step (_ALL_PHASES_C)

_VERIFIED: set[tuple] = set()
_DOES_NOT_FIT: set[tuple] = set()
# The barrier's error flag costs a host sync to read: by default only the first persistent launch
# of each configuration reads it; FASTLSTM_TRITON_CHECK_BARRIERS=always reads it after every launch
# (for GPUs shared with other kernels that may hold SMs).
_CHECK_EVERY_LAUNCH = os.environ.get("FASTLSTM_TRITON_CHECK_BARRIERS") == "always"


def _launch(kernel, call: _Call, grid: Grid, args: tuple, scalars: tuple, extra: dict, error: Tensor, *,
            backward: bool) -> None:
    """Run every step: one persistent launch, or one launch per step (plus, for the backward, a last
    launch for ``dh_0``). Kernels take ``(*args, step_begin, step_end, [finish,] *scalars)``.

    A persistent grid whose program does not fit an SM (Triton's OutOfResources) falls back to the
    per-step grid. The first persistent launch of each configuration is checked for a barrier that
    timed out, which would mean its programs were not all resident at once."""
    kind = "backward" if backward else "forward"
    constants = call.constants(grid) | extra | call.layer_norm_constants(grid)
    # every flag is in the key: a layer-norm or projection kernel (more barriers, more registers) is
    # checked and falls back on its own, apart from the plain kernel of the same shape
    key = (kind, error.device, call.batch, call.hidden, call.directions, call.dtype, grid,
           tuple(sorted((k, str(v)) for k, v in constants.items())))
    shape = grid.shape(call.batch, call.hidden, call.directions)
    # the barrier counters are int32: a launch whose arrivals could pass 2^31 runs one launch per step
    too_long = call.steps * call.phases * shape[0] >= 2**31 - 1
    if grid.persistent and (key in _DOES_NOT_FIT or too_long):
        return _launch(kernel, call, call.fitted(kind, per_step_grid(kind, grid, call.hidden, call.dtype)), args,
                       scalars, extra, error, backward=backward)

    def run(begin: int, end: int, finish: int, phase: int, use_barrier: bool) -> None:
        # the backward's `finish` says whether to end with dh_0; `phase` which phases of a step to run
        step_args = (begin, end, finish, phase) if backward else (begin, end, phase)
        kernel[shape](*args, *step_args, *scalars, **constants, USE_BARRIER=use_barrier, num_warps=grid.num_warps)

    # Triton launches on the current CUDA device: make it the tensors' one
    device = torch.cuda.device(error.device) if error.device.type == "cuda" else contextlib.nullcontext()
    try:
        with device:
            if grid.persistent:
                run(0, call.steps, 1, _ALL_PHASES, grid.barrier)
            else:
                # with layer norm or the projection each phase of a step is a launch (the launch
                # boundary is the barrier)
                phases = range(call.phases) if call.phases > 1 else [_ALL_PHASES]
                for s in range(call.steps):
                    for phase in phases:
                        run(s, s + 1, 0, phase, False)
                if backward:
                    run(call.steps, call.steps, 1, _ALL_PHASES, False)
    except Exception as exc:
        if grid.persistent and _OutOfResources is not None and isinstance(exc, _OutOfResources):
            _DOES_NOT_FIT.add(key)
            return _launch(kernel, call, call.fitted(kind, per_step_grid(kind, grid, call.hidden, call.dtype)), args,
                           scalars, extra, error, backward=backward)
        raise RuntimeError(
            f"fastlstm: the Triton {kind} kernel failed for grid {shape} ({grid}) with {constants}: {exc}"
        ) from exc
    if grid.barrier and (_CHECK_EVERY_LAUNCH or key not in _VERIFIED):
        if int(error.item()) != 0:
            raise RuntimeError(
                f"fastlstm: the persistent Triton {kind} kernel's barrier timed out (grid {shape}): its "
                "programs were not all resident at once, e.g. because another kernel held SMs"
            )
        _VERIFIED.add(key)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """float32 products as torch.nn.LSTM's on the GPU: cuDNN's recurrence runs in TF32 while
    ``torch.backends.cudnn.allow_tf32`` is on (torch's default), IEEE when a user turns it off.
    (Measured on an H200, B=16 T=512 H=1024: torch's float32 LSTM 7.85 ms forward with the flag on,
    14.98 ms off.) Triton's interpreter (CPU tensors) always takes IEEE."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


_TL_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


@dataclass
class _Call:
    """Everything one layer's kernels need, in kernel layout. ``D`` directions share one launch."""

    steps: int
    batch: int
    hidden: int
    directions: int
    dtype: torch.dtype
    acc: torch.dtype
    lengths: Tensor | None
    w_ih: Tensor  # [D*4H, I]
    w_hh: Tensor  # [D, 4H, H], DropConnect applied
    weight_masks: list[Tensor | None]
    bias: Tensor | None  # [D, 4H] acc
    peephole: Tensor | None  # [D, 3H] acc
    rec_mask: Tensor | None  # [D, B, H]
    zh_mask: Tensor | None  # [D, T, B, H]
    zc_mask: Tensor | None
    zoneout_h: int
    zoneout_c: int
    options: LSTMOptions
    ln_ih: Tensor | None  # [D, 4H] acc: layer-norm weights
    ln_hh: Tensor | None  # [D, 4H]
    ln_cell_w: Tensor | None  # [D, H]
    ln_cell_b: Tensor | None  # [D, H]
    h_size: int  # P: the size of h, proj_size or H
    w_hr: Tensor | None  # [D, P, H]: the projection
    # A PackedSequence's rows instead of a padded batch: its batch_sizes [T] (CPU) and each step's
    # first row [T] (on the device); lengths then holds the sorted sequences' lengths.
    batch_sizes: Tensor | None = None
    offsets: Tensor | None = None
    # where the kernels run (the float32 products' precision depends on it); the sm_90 build checks
    # (engines/triton_build.py) describe a CUDA launch without tensors
    device: torch.device = torch.device("cuda")

    @property
    def phases(self) -> int:
        """Phases (barriers) per step: layer norm adds two exchanges, the projection one."""
        return 1 + 2 * (self.ln_hh is not None) + (self.w_hr is not None)

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The leading shape of the per-token tensors: ``(T, B)`` padded, ``(N,)`` packed."""
        return (self.steps, self.batch) if self.batch_sizes is None else (int(self.batch_sizes.sum()),)

    @staticmethod
    def of(x: Tensor, lengths: Tensor | None, weights: Sequence[DirectionWeights], options: LSTMOptions,
           masks: Sequence[DirectionMasks], training: bool, *, batch_sizes: Tensor | None = None) -> _Call:
        """The call for padded ``x [T, B, I]`` (with optional ``lengths``), or with ``batch_sizes``, for a
        PackedSequence's rows ``x [N, I]`` (sorted order)."""
        dtype, acc = x.dtype, accumulation_dtype(x.dtype)
        offsets = None
        if batch_sizes is None:
            T, B = x.shape[0], x.shape[1]
        else:
            batch_sizes = batch_sizes.to(torch.int64).cpu()
            T, B = batch_sizes.numel(), int(batch_sizes[0])
            lengths = (batch_sizes[:, None] > torch.arange(B)[None, :]).sum(0)  # sorted: longest first
            offsets = (torch.cumsum(batch_sizes, 0) - batch_sizes).to(x.device)
        H, P = weights[0].weight_hh.shape[0] // 4, weights[0].weight_hh.shape[1]
        w_hh = torch.stack([
            w.weight_hh if m.weight_hh is None else w.weight_hh * m.weight_hh for w, m in zip(weights, masks)
        ]).to(dtype).contiguous()

        def stacked(tensors, to):
            return None if tensors[0] is None else torch.stack(list(tensors)).to(to).contiguous()

        def mode(present: bool, probability: float) -> int:
            if training:
                return _ZONEOUT_MASK if present else _ZONEOUT_OFF
            return _ZONEOUT_CONSTANT if probability > 0 else _ZONEOUT_OFF

        bias = None if weights[0].bias_ih is None else torch.stack([w.bias_ih + w.bias_hh for w in weights]).to(acc)
        return _Call(
            steps=T, batch=B, hidden=H, directions=len(weights), dtype=dtype, acc=acc,
            lengths=None if lengths is None else lengths.to(device=x.device, dtype=torch.int64).contiguous(),
            w_ih=torch.cat([w.weight_ih for w in weights]).to(dtype),
            w_hh=w_hh,
            weight_masks=[m.weight_hh for m in masks],
            bias=bias,
            peephole=stacked([w.weight_peephole for w in weights], acc),
            rec_mask=stacked([m.recurrent for m in masks], acc),
            zh_mask=stacked([m.zoneout_h for m in masks], acc),
            zc_mask=stacked([m.zoneout_c for m in masks], acc),
            zoneout_h=mode(masks[0].zoneout_h is not None, options.zoneout_h),
            zoneout_c=mode(masks[0].zoneout_c is not None, options.zoneout_c),
            options=options,
            ln_ih=stacked([w.layer_norm_ih_weight for w in weights], acc),
            ln_hh=stacked([w.layer_norm_hh_weight for w in weights], acc),
            ln_cell_w=stacked([w.layer_norm_cell_weight for w in weights], acc),
            ln_cell_b=stacked([w.layer_norm_cell_bias for w in weights], acc),
            h_size=P,
            w_hr=stacked([w.weight_hr for w in weights], dtype),
            batch_sizes=batch_sizes,
            offsets=offsets,
            device=x.device,
        )

    def constants(self, grid: Grid) -> dict:
        o = self.options
        return dict(
            H=self.hidden, D=self.directions, H_PAD=hidden_pad(self.hidden), HB=grid.hb, BB=grid.bb,
            ACC=getattr(tl, _TL_DTYPES[self.acc]), PRECISION=_precision(self.dtype, self.device),
            DOT_IN_FP32=INTERPRET and self.dtype == torch.bfloat16,
            ACT_GATE=_ACTIVATION_CODES[o.activations[0]], ACT_IN=_ACTIVATION_CODES[o.activations[1]],
            ACT_OUT=_ACTIVATION_CODES[o.activations[2]], PEEPHOLE=self.peephole is not None,
            HAS_CLIP=o.clip is not None, COUPLED=o.coupled_input_forget, HAS_CELL_CLIP=o.cell_clip is not None,
            ZONEOUT_H=self.zoneout_h, ZONEOUT_C=self.zoneout_c, HAS_REC_MASK=self.rec_mask is not None,
            HAS_LENGTHS=self.lengths is not None, PACKED=self.offsets is not None, W_AS_A=grid.w_as_a,
            K_CHUNK=grid.k_chunk, **self.projection_constants(grid),
        )

    def projection_constants(self, grid: Grid) -> dict:
        """The size ``P`` of h, and ``PB``, the units of h a program owns: ``HB`` without projection;
        with it, ``P`` spread over the group's programs (``tl.dot`` needs at least 16)."""
        P, programs = self.h_size, triton.cdiv(self.hidden, grid.hb)
        proj = self.w_hr is not None
        return dict(P=P, P_PAD=hidden_pad(P), PB=max(16, _pow2(triton.cdiv(P, programs))) if proj else grid.hb,
                    PROJ=proj, PROJ_K=32, HAS_PROJ_CLIP=proj and self.options.proj_clip is not None)

    def layer_norm_constants(self, grid: Grid) -> dict:
        """Layer norm's flag and its exchange's sizes (programs per group, slots)."""
        return dict(LAYER_NORM=self.ln_hh is not None, NP_PAD=max(2, _pow2(triton.cdiv(self.hidden, grid.hb))),
                    LN_SLOTS=_ln_slots(self.hidden))

    def grid(self, kind: str, device: torch.device) -> Grid:
        return self.fitted(kind, choose_grid(kind, self.batch, self.hidden, self.directions, self.dtype, device))

    def fitted(self, kind: str, grid: Grid) -> Grid:
        """``grid`` for this call: with a projection the forward's recurrent product reduces over
        ``P <= H``, so its whole reduction may fit in one chunk."""
        if kind == "forward" and self.w_hr is not None:
            grid = dataclasses.replace(grid, k_chunk=min(grid.k_chunk, hidden_pad(self.h_size)))
        return grid


def _empty(like: Tensor, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
    """Every buffer a kernel must fill comes from here, so that tests can poison them (NaN) and catch
    an element the kernel never wrote."""
    return like.new_empty(shape, dtype=dtype)


def _or_dummy(t: Tensor | None, like: Tensor) -> Tensor:
    """Triton needs a pointer for every argument; a flag keeps an absent tensor from being read."""
    return like.new_empty(1) if t is None else t


def _forward(call: _Call, x: Tensor, h0: Tensor, c0: Tensor, *, save: bool):
    """``x [T, B, I]`` (packed: ``[N, I]``), ``h0``/``c0 [D, B, H]`` -> ``y [T, B, D*H]`` (packed:
    ``[N, D*H]``), ``h_n``, ``c_n [D, B, H]`` and, with ``save``, the tensors :func:`_backward` needs."""
    T, B, H, D, dtype, acc = call.steps, call.batch, call.hidden, call.directions, call.dtype, call.acc
    G, P, proj = 4 * H, call.h_size, call.w_hr is not None
    tokens = call.token_shape
    xg = (x.reshape(-1, x.shape[-1]) @ call.w_ih.t()).view(*tokens, D * G)  # every step and direction at once
    layer_norm = call.ln_hh is not None
    if layer_norm:  # LN(x_t W_ih^T) is outside the recurrence too, in the accumulation dtype
        normed, mean_x, rstd_x = torch.native_layer_norm(xg.view(-1, D, G).to(acc), [G], None, None, LAYER_NORM_EPS)
        xg = (normed * call.ln_ih).view(*tokens, D * G)
    h_buf = _empty(x, 2, D, B, P)
    h_buf.copy_(h0.unsqueeze(0).expand(2, D, B, P))  # a direction that skips its first steps starts in either slot
    c_state = c0.to(acc).contiguous().clone()
    # padding rows of steps a batch block skips (past all of its sequences' ends) are never written:
    # zeros there; packed input has no padding rows
    padded_with_lengths = call.lengths is not None and call.offsets is None
    y = x.new_zeros(*tokens, D * P) if padded_with_lengths else _empty(x, *tokens, D * P)
    o = call.options
    saved = {
        "gates": _empty(x, *tokens, D * G) if save else None,
        "c_fresh": _empty(x, *tokens, D * H, dtype=acc) if save else None,
        "c_carried": _empty(x, *tokens, D * H, dtype=acc) if save and call.zoneout_c else None,
        "clip": _empty(x, *tokens, D * G, dtype=torch.int8) if save and o.clip is not None else None,
        "cell_clip": _empty(x, *tokens, D * H, dtype=torch.int8) if save and o.cell_clip is not None else None,
        "hh_hat": _empty(x, *tokens, D * G, dtype=acc) if save and layer_norm else None,
        "ln_rows": _empty(x, *tokens, D * 3, dtype=acc) if save and layer_norm else None,
        "x_moments": (mean_x, rstd_x) if save and layer_norm else None,
        # read by the host for W_hr's gradient: zeros in the padding rows of skipped steps
        "m": (x.new_zeros if padded_with_lengths else partial(_empty, x))(*tokens, D * H) if save and proj else None,
        "proj_clip": _empty(x, *tokens, D * P, dtype=torch.int8) if save and proj and o.proj_clip is not None else None,
    }
    grid = call.grid("forward", x.device)
    counters = torch.zeros(D, triton.cdiv(B, grid.bb), dtype=torch.int32, device=x.device)
    error = torch.zeros(1, dtype=torch.int32, device=x.device)
    dummy_acc = x.new_empty(1, dtype=acc)
    args = (
        xg, _or_dummy(call.bias, dummy_acc), call.w_hh, _or_dummy(call.peephole, dummy_acc),
        _or_dummy(call.lengths, counters), _or_dummy(call.offsets, counters), _or_dummy(call.rec_mask, dummy_acc),
        _or_dummy(call.zh_mask, dummy_acc), _or_dummy(call.zc_mask, dummy_acc), h_buf, c_state, y,
        _or_dummy(saved["gates"], y), _or_dummy(saved["c_fresh"], dummy_acc), _or_dummy(saved["c_carried"], dummy_acc),
        _or_dummy(saved["clip"], error), _or_dummy(saved["cell_clip"], error),
        _or_dummy(call.ln_hh, dummy_acc), _or_dummy(call.ln_cell_w, dummy_acc), _or_dummy(call.ln_cell_b, dummy_acc),
        _ln_stats(call, x), _or_dummy(saved["hh_hat"], dummy_acc), _or_dummy(saved["ln_rows"], dummy_acc),
        _or_dummy(call.w_hr, y), x.new_empty(D, B, H) if proj else y, _or_dummy(saved["m"], y),
        _or_dummy(saved["proj_clip"], error), counters, error, T, B,
    )
    scalars = (o.clip or 0.0, o.cell_clip or 0.0, o.zoneout_h, o.zoneout_c, LAYER_NORM_EPS, o.proj_clip or 0.0)
    extra = dict(HAS_BIAS=call.bias is not None, NEEDS_H_PREV=call.zoneout_h != 0 or call.lengths is not None,
                 SAVE=save)
    _launch(_forward_kernel, call, grid, args, scalars, extra, error, backward=False)
    return y, _final_h(h_buf, call, grid.bb), c_state.to(dtype), saved


def _ln_slots(hidden: int) -> int:
    """Slots per row of the layer-norm exchange: one per program of a group, for every grid (the
    launcher may switch grids; ``HB >= 4``)."""
    return max(2, _pow2(triton.cdiv(hidden, 4)))


def _ln_stats(call: _Call, like: Tensor) -> Tensor:
    """Where the programs of a group exchange their layer-norm moments: ``[2, D, B, LN_SLOTS, 2]``."""
    if call.ln_hh is None:
        return like.new_empty(1, dtype=call.acc)
    return like.new_zeros(2, call.directions, call.batch, _ln_slots(call.hidden), 2, dtype=call.acc)


def _final_h(h_buf: Tensor, call: _Call, bb: int) -> Tensor:
    """``h_n [D, B, H]`` from the ping-pong buffer ``[2, D, B, H]``: step ``s`` writes slot
    ``(s + 1) % 2``, so a block that ran its last step ``hi - 1`` left ``h`` in slot ``hi % 2`` (``hi`` is
    ``T`` except for the forward direction of a block whose sequences all end early)."""
    T, B, D = call.steps, call.batch, call.directions
    if call.lengths is None:
        return h_buf[T % 2].clone()
    padded = torch.zeros(triton.cdiv(B, bb) * bb, dtype=torch.int64, device=h_buf.device)
    padded[:B] = call.lengths
    longest = padded.view(-1, bb).amax(1).repeat_interleave(bb)[:B]  # [B]: the max length of each row's block
    slots = torch.stack([longest % 2, torch.full_like(longest, T % 2)][:D])  # [D, B]
    return h_buf.gather(0, slots[None, :, :, None].expand(1, D, B, h_buf.shape[-1]))[0]



def _previous_states(y: Tensor, h0: Tensor, lengths: Tensor | None) -> Tensor:
    """``h_{t-1}`` as each step saw it, ``[T, B, D, H]``, rebuilt from ``y [T, B, D*H]`` and ``h0``:
    the output of the step processed before, or ``h_0``. Past a sequence's end the state was frozen,
    but those steps' ``dgates`` are zero, so what stands there does not matter; the reverse
    direction's first real step, ``t = length - 1``, follows only padding and sees ``h_0``."""
    T, B = y.shape[0], y.shape[1]
    D, H = h0.shape[0], h0.shape[2]
    y4 = y.view(T, B, D, H)
    h_prev = torch.empty_like(y4)
    h_prev[0, :, 0] = h0[0]
    h_prev[1:, :, 0] = y4[:-1, :, 0]
    if D == 2:
        h_prev[T - 1, :, 1] = h0[1]
        h_prev[: T - 1, :, 1] = y4[1:, :, 1]
        if lengths is not None:
            first = (torch.arange(T, device=y.device)[:, None] + 1 >= lengths[None, :])[..., None]  # [T, B, 1]
            h_prev[:, :, 1] = torch.where(first, h0[1], h_prev[:, :, 1])
    return h_prev


def _previous_states_packed(y: Tensor, h0: Tensor, call: _Call) -> Tensor:
    """:func:`_previous_states` for a PackedSequence's rows: ``y [N, D*H]`` -> ``[N, D, H]``. Row
    ``(t, b)``'s forward direction saw row ``(t - 1, b)`` (or ``h_0``), its reverse direction row
    ``(t + 1, b)`` if sequence ``b`` reaches step ``t + 1`` (else ``h_0``)."""
    batch_sizes, T = call.batch_sizes, call.steps
    N, D, H = y.shape[0], h0.shape[0], h0.shape[2]
    first = torch.cumsum(batch_sizes, 0) - batch_sizes
    step = torch.repeat_interleave(torch.arange(T), batch_sizes)
    slot = torch.arange(N) - first[step]
    initial = N + slot  # row of h_0 in cat([y_d, h_0[d]])
    sources = [torch.where(step > 0, first[(step - 1).clamp(min=0)] + slot, initial)]
    if D == 2:
        nxt = (step + 1).clamp(max=T - 1)
        has_next = (step + 1 < T) & (slot < batch_sizes[nxt])
        sources.append(torch.where(has_next, first[nxt] + slot, initial))
    y3 = y.view(N, D, H)
    return torch.stack([torch.cat([y3[:, d], h0[d].to(y.dtype)]).index_select(0, src.to(y.device))
                        for d, src in enumerate(sources)], 1)


def _backward(call: _Call, saved: dict, x: Tensor, y: Tensor, h0: Tensor, c0: Tensor, dy: Tensor, dh_n: Tensor,
              dc_n: Tensor) -> dict[str, Tensor | None]:
    """BPTT in the kernel, then the weight products: returns the gradients of ``x``, ``h0``, ``c0``,
    ``w_ih [D*4H, I]``, ``w_hh [D, 4H, H]`` (of the stored weight: the DropConnect mask applied),
    the summed biases ``[D, 4H]`` and the peepholes ``[D, 3H]``."""
    T, B, H, D, dtype, acc = call.steps, call.batch, call.hidden, call.directions, call.dtype, call.acc
    G, P, proj = 4 * H, call.h_size, call.w_hr is not None
    dh_state = dh_n.to(acc).contiguous().clone()
    dc_state = dc_n.to(acc).contiguous().clone()
    tokens = call.token_shape
    # padding rows of skipped steps must read as zero; packed input has no padding rows
    padded_with_lengths = call.lengths is not None and call.offsets is None
    dgates = x.new_zeros(*tokens, D * G) if padded_with_lengths else _empty(x, *tokens, D * G)
    layer_norm = call.ln_hh is not None
    da = None
    if layer_norm:  # d a_t, for LN(x W_ih^T) and the biases (dgates is then d (h_{t-1} W_hh^T))
        da = x.new_zeros(*tokens, D * G, dtype=acc) if padded_with_lengths else _empty(x, *tokens, D * G, dtype=acc)
    grid = call.grid("backward", x.device)
    blocks = triton.cdiv(B, grid.bb)
    dpeep = torch.zeros(blocks, D, 3 * H, dtype=acc, device=x.device)
    dln = torch.zeros(blocks, D, 6 * H, dtype=acc, device=x.device) if layer_norm else None
    d_proj = None
    if proj:  # d loss / d (m_t W_hr^T), for dm_t and for W_hr's gradient
        d_proj = x.new_zeros(*tokens, D * P) if padded_with_lengths else _empty(x, *tokens, D * P)
    counters = torch.zeros(D, blocks, dtype=torch.int32, device=x.device)
    error = torch.zeros(1, dtype=torch.int32, device=x.device)
    dummy_acc = x.new_empty(1, dtype=acc)
    c0_acc = c0.to(acc).contiguous()
    args = (
        dy.to(dtype).contiguous(), dh_state, dc_state, call.w_hh, _or_dummy(call.peephole, dummy_acc),
        _or_dummy(call.lengths, counters), _or_dummy(call.offsets, counters), _or_dummy(call.rec_mask, dummy_acc),
        _or_dummy(call.zh_mask, dummy_acc), _or_dummy(call.zc_mask, dummy_acc), saved["gates"], saved["c_fresh"], _or_dummy(saved["c_carried"], dummy_acc),
        c0_acc, _or_dummy(saved["clip"], error), _or_dummy(saved["cell_clip"], error),
        _or_dummy(call.ln_hh, dummy_acc), _or_dummy(call.ln_cell_w, dummy_acc), _or_dummy(call.ln_cell_b, dummy_acc),
        _or_dummy(saved["hh_hat"], dummy_acc), _or_dummy(saved["ln_rows"], dummy_acc), _ln_stats(call, x),
        _or_dummy(da, dummy_acc), _or_dummy(dln, dummy_acc), dgates, dpeep, _or_dummy(call.w_hr, dgates),
        _or_dummy(saved["proj_clip"], error), _or_dummy(d_proj, dgates), counters, error, T, B,
    )
    o = call.options
    _launch(_backward_kernel, call, grid, args, (o.zoneout_h, o.zoneout_c), {}, error, backward=True)

    rows = dgates.view(-1, D * G)
    n = rows.shape[0]  # T*B, or N packed rows
    x_rows = x.reshape(n, -1)
    # h_{t-1} as each row's step saw it, the recurrent-dropout mask applied: [n, D, P]
    rec = None if call.rec_mask is None else call.rec_mask.transpose(0, 1)  # [B, D, H]
    if call.offsets is None:
        h_in = _previous_states(y, h0, call.lengths)  # [T, B, D, H]
    else:
        h_in = _previous_states_packed(y, h0, call)
        if rec is not None:  # each packed row's sequence
            first = torch.cumsum(call.batch_sizes, 0) - call.batch_sizes
            rec = rec[(torch.arange(n) - torch.repeat_interleave(first, call.batch_sizes)).to(x.device)]
    if rec is not None:
        h_in = (h_in * rec).to(dtype)
    h_in = h_in.reshape(n, D, P)
    per_direction = rows.view(n, D, G).transpose(0, 1)  # [D, n, 4H]
    d_w_hh = torch.bmm(per_direction.transpose(1, 2), h_in.transpose(0, 1))  # [D, 4H, H]
    grads = {"h0": dh_state.to(dtype), "c0": dc_state.to(dtype), "weight_hh": d_w_hh,
             "peephole": dpeep.sum(0) if call.peephole is not None else None}
    if proj:  # d W_hr = sum over tokens of d(m_t W_hr^T)^T m_t, per direction: [D, P, H]
        grads["w_hr"] = torch.bmm(d_proj.view(n, D, P).permute(1, 2, 0), saved["m"].view(n, D, H).transpose(0, 1))
    if layer_norm:  # back through LN(x W_ih^T): recompute x W_ih^T (one GEMM) rather than keep it
        mean_x, rstd_x = saved["x_moments"]
        raw = (x_rows @ call.w_ih.t()).view(n, D, G).to(acc)
        da3 = da.view(n, D, G)
        d_raw = torch.ops.aten.native_layer_norm_backward(da3 * call.ln_ih, raw, [G], mean_x, rstd_x, None, None,
                                                          [True, False, False])[0]
        input_side = d_raw.view(n, D * G).to(dtype)
        d_ln = dln.sum(0)
        grads |= {"bias": da.view(n, D * G).sum(0).view(D, G),
                  "ln_ih": (da3 * ((raw - mean_x) * rstd_x)).sum(0), "ln_hh": d_ln[:, : 4 * H],
                  "ln_cell_w": d_ln[:, 4 * H : 5 * H], "ln_cell_b": d_ln[:, 5 * H :]}
    else:
        input_side = rows
        grads["bias"] = rows.sum(0, dtype=acc).view(D, G)
    grads |= {"x": (input_side @ call.w_ih).view(x.shape), "weight_ih": input_side.t() @ x_rows}
    return grads


# -- one layer: the autograd.Function ---------------------------------------------------------------

_FIELDS = DirectionWeights._fields


class _LayerFunction(torch.autograd.Function):
    """One layer, every direction. Inputs after the non-tensor setup: ``x [T, B, I]``,
    ``h0``/``c0 [D, B, H]``, then each direction's ``DirectionWeights`` fields."""

    @staticmethod
    def forward(ctx, setup, x, h0, c0, *flat_weights):
        call = setup
        y, h_n, c_n, saved = _forward(call, x, h0, c0, save=True)
        ctx.call, ctx.saved = call, saved
        ctx.present = [t is not None for t in flat_weights]
        ctx.save_for_backward(x, y, h0, c0)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        call = ctx.call
        x, y, h0, c0 = ctx.saved_tensors
        grads = _backward(call, ctx.saved, x, y, h0, c0, dy, dh_n, dc_n)
        G = 4 * call.hidden
        flat = []
        for d in range(call.directions):
            per_field = {
                "weight_ih": grads["weight_ih"][d * G : (d + 1) * G],
                "weight_hh": grads["weight_hh"][d] if call.weight_masks[d] is None
                else grads["weight_hh"][d] * call.weight_masks[d],
                "bias_ih": grads["bias"][d],
                "bias_hh": grads["bias"][d],
                "weight_peephole": None if grads["peephole"] is None else grads["peephole"][d],
            }
            if "w_hr" in grads:
                per_field["weight_hr"] = grads["w_hr"][d]
            if "ln_hh" in grads:
                per_field |= {"layer_norm_ih_weight": grads["ln_ih"][d], "layer_norm_hh_weight": grads["ln_hh"][d],
                              "layer_norm_cell_weight": grads["ln_cell_w"][d],
                              "layer_norm_cell_bias": grads["ln_cell_b"][d]}
            flat.extend(per_field.get(name) for name in _FIELDS)
        flat = [g if present else None for g, present in zip(flat, ctx.present)]
        return (None, grads["x"], grads["h0"], grads["c0"], *flat)


# -- the public op ----------------------------------------------------------------------------------


def available() -> bool:
    return triton is not None


def layer_gradients(x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor, weights: Sequence[DirectionWeights],
                    options: LSTMOptions, masks: Sequence[DirectionMasks] | None, *, training: bool,
                    cotangents: tuple[Tensor, Tensor, Tensor]) -> list[Tensor | None]:
    """``[dx, dh0, dc0, *each direction's weight gradients]`` of one layer call under the cotangents
    ``(dy, dh_n, dc_n)``, the autograd.Function run as plain functions (engines/ops.py)."""
    masks = list(masks) if masks is not None else [DirectionMasks() for _ in weights]
    flat = [t for w in weights for t in w]
    ctx = PlainContext([False, True, True, True, *(t is not None for t in flat)])
    with torch.no_grad():
        _LayerFunction.forward(ctx, _Call.of(x, lengths, weights, options, masks, training), x.contiguous(), h0, c0,
                               *flat)
        return list(_LayerFunction.backward(ctx, *cotangents)[1:])


def supports(device: torch.device, dtype: torch.dtype, options: LSTMOptions) -> bool:
    return triton is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)


def _needs_grad(x: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[DirectionWeights]) -> bool:
    tensors = (x, h0, c0, *(t for w in weights for t in w))
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lstm_layer(
    x: Tensor,
    lengths: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[DirectionWeights],
    options: LSTMOptions,
    masks: Sequence[DirectionMasks] | None,
    *,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The engine entry point; the signature and semantics of :func:`fastlstm.reference.lstm_layer`.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests)."""
    if masks is not None and not training:
        raise ValueError("masks are only used in training mode; eval mode uses their expectations")
    masks = list(masks) if masks is not None else [DirectionMasks() for _ in weights]
    if lengths is not None:
        return _by_length(x, lengths, h0, c0, weights, options, masks, training)
    return _run(x, lengths, h0, c0, weights, options, masks, training)


def _by_length(x, lengths, h0, c0, weights, options, masks, training):
    """Sequences sorted by length (longest first), so that each batch block's steps past all of its
    sequences' ends can be skipped; results in the caller's order (autograd sees the permutations)."""
    order = torch.argsort(lengths, descending=True, stable=True).to(x.device)
    back = torch.argsort(order)
    h0, c0, masks = _in_order(order, h0, c0, masks)
    y, h, c = _run(x.index_select(1, order), lengths.to(x.device)[order], h0, c0, weights, options, masks, training)
    return y.index_select(1, back), h.index_select(1, back), c.index_select(1, back)


def _in_order(order: Tensor, h0: Tensor, c0: Tensor, masks: list[DirectionMasks]):
    """The initial states and the masks (user batch order) with their batch rows taken in ``order``."""
    def rows(t, dim):
        return None if t is None else t.index_select(dim, order)

    return rows(h0, 1), rows(c0, 1), [
        DirectionMasks(rows(m.zoneout_h, 1), rows(m.zoneout_c, 1), rows(m.recurrent, 0), m.weight_hh) for m in masks
    ]


def lstm_layer_packed(
    data: Tensor,
    batch_sizes: Tensor,
    sorted_indices: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[DirectionWeights],
    options: LSTMOptions,
    masks: Sequence[DirectionMasks] | None,
    *,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """A PackedSequence's rows ``data [N, I]`` (with its ``batch_sizes`` and ``sorted_indices``) as they
    are: -> ``(y [N, D * H_out], h_n, c_n)``, states in user batch order. The kernels address each
    step's rows through the step's first row, so no padded tensor is built and no padding is
    computed. Masks are padded ``[T, B, .]`` in user order, as everywhere."""
    if masks is not None and not training:
        raise ValueError("masks are only used in training mode; eval mode uses their expectations")
    masks = list(masks) if masks is not None else [DirectionMasks() for _ in weights]
    if sorted_indices is None:
        return _run(data, None, h0, c0, weights, options, masks, training, batch_sizes=batch_sizes)
    order = sorted_indices.to(data.device)
    back = torch.argsort(order)
    h0, c0, masks = _in_order(order, h0, c0, masks)
    y, h, c = _run(data, None, h0, c0, weights, options, masks, training, batch_sizes=batch_sizes)
    return y, h.index_select(1, back), c.index_select(1, back)


def _run(x, lengths, h0, c0, weights, options, masks, training, *, batch_sizes=None):
    call = _Call.of(x, lengths, weights, options, masks, training, batch_sizes=batch_sizes)
    if not _needs_grad(x, h0, c0, weights):
        with torch.no_grad():
            y, h_n, c_n, _ = _forward(call, x.contiguous(), h0, c0, save=False)
        return y, h_n, c_n
    flat = [t for w in weights for t in w]
    return _LayerFunction.apply(call, x.contiguous(), h0, c0, *flat)
