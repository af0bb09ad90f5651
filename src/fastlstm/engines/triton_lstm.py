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
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import DirectionMasks
from .ops import PlainContext
from ..options import LSTMOptions
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

    @triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end"])
    def _forward_kernel(
        xg,  # [T, B, D*4H]  x_t W_ih^T of every direction, storage dtype
        bias,  # [D, 4H]  b_ih + b_hh, accumulation dtype
        w_hh,  # [D, 4H, H]  weight_hh (DropConnect mask applied), storage dtype
        peephole,  # [D, 3H]  (p_i, p_f, p_o), accumulation dtype
        lengths,  # [B] int64
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
        counters,  # [D, NB] int32 barrier arrivals
        error,  # [1] int32
        T,
        B,
        step_begin,
        step_end,
        clip,
        cell_clip,
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
        HAS_BIAS: tl.constexpr,
        PEEPHOLE: tl.constexpr,
        HAS_CLIP: tl.constexpr,
        COUPLED: tl.constexpr,
        HAS_CELL_CLIP: tl.constexpr,
        ZONEOUT_H: tl.constexpr,
        ZONEOUT_C: tl.constexpr,
        HAS_REC_MASK: tl.constexpr,
        HAS_LENGTHS: tl.constexpr,
        W_AS_A: tl.constexpr,
        K_CHUNK: tl.constexpr,
        NEEDS_H_PREV: tl.constexpr,
        SAVE: tl.constexpr,
        USE_BARRIER: tl.constexpr,
    ):
        """Steps ``[step_begin, step_end)`` of the recurrence (docs/equations.md, sections 1-7):
        ``a_t = x_t W_ih^T + b + h_{t-1} W_hh^T``, the gates, ``c_t``, ``h_t``, per program slice."""
        i_h, i_b, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        G: tl.constexpr = 4 * H
        o_j = i_h * HB + tl.arange(0, HB)  # hidden units owned
        o_b = i_b * BB + tl.arange(0, BB)  # batch rows owned
        m_j, m_b = o_j < H, o_b < B
        m_bj = m_b[:, None] & m_j[None, :]
        o_b64 = o_b.to(tl.int64)
        d64 = i_d.to(tl.int64)

        # weight_hh rows of the owned units, gate-interleaved (entry 4 u + gate), as the product's
        # A operand [4 HB, H] (it can stay in registers) or its B operand [H, 4 HB]. With one K chunk
        # the slice is loaded once, before the time loop; with several it is streamed from L2 each step.
        o_col = tl.arange(0, 4 * HB)
        col_unit, col_gate = i_h * HB + o_col // 4, o_col % 4
        w_row = (col_gate * H + col_unit).to(tl.int64)
        m_col = col_unit < H
        w_dir = w_hh + d64 * G * H
        rec_dir = rec_mask + d64 * B * H
        RESIDENT: tl.constexpr = K_CHUNK == H_PAD
        if RESIDENT:
            b_w = _weight_row_chunk(w_dir, w_row, m_col, 0, H, K_CHUNK, W_AS_A)

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
            b_rec = _row_chunk(rec_dir, o_b64, m_b, 0, H, K_CHUNK, W_AS_A)
        if HAS_LENGTHS:
            b_len = tl.load(lengths + o_b, mask=m_b, other=0)

        p_state = (d64 * B + o_b64[:, None]) * H + o_j[None, :]  # [BB, HB] in a [D, B, H] tensor
        b_c = tl.load(c_state + p_state, mask=m_bj, other=0.0)
        p_counter = counters + i_d * tl.num_programs(1) + i_b
        n_group = tl.num_programs(0)

        lo, hi = _step_range(lengths, o_b, m_b, T, i_d, 1, HAS_LENGTHS)
        s_lo = tl.maximum(step_begin, lo)
        # num_stages=1: a step's loads of h_{t-1} must not be prefetched before the step that writes it
        for s in tl.range(s_lo, tl.minimum(step_end, hi), num_stages=1):
            t = _time_index(s, T, i_d)
            t64 = t.to(tl.int64)
            p_h_prev = h_buf + ((s % 2) * D + d64) * B * H
            # h_{t-1} [BB, H] (or its transpose [H, BB] against W as A) times the weight slice
            if RESIDENT:
                b_h = _row_chunk(p_h_prev, o_b64, m_b, 0, H, K_CHUNK, W_AS_A)
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
                for k0 in range(0, H_PAD, K_CHUNK):
                    b_h = _row_chunk(p_h_prev, o_b64, m_b, k0, H, K_CHUNK, W_AS_A)
                    if HAS_REC_MASK:
                        b_h = (b_h.to(ACC) * _row_chunk(rec_dir, o_b64, m_b, k0, H, K_CHUNK, W_AS_A)).to(b_h.dtype)
                    w_chunk = _weight_row_chunk(w_dir, w_row, m_col, k0, H, K_CHUNK, W_AS_A)
                    if W_AS_A:
                        acc += _product(w_chunk, b_h, PRECISION, ACC, DOT_IN_FP32)
                    else:
                        acc += _product(b_h, w_chunk, PRECISION, ACC, DOT_IN_FP32)
            if W_AS_A:
                acc = tl.trans(acc)  # [BB, 4 HB]
            # column 4 u + 2 k1 + k0 holds gate 2 k1 + k0 of unit u
            even, odd = tl.split(tl.reshape(acc, (BB, HB, 2, 2)))
            a_i, a_g = tl.split(even)
            a_f, a_o = tl.split(odd)

            row = (t64 * B + o_b64[:, None]) * (D * G) + d64 * G + o_j[None, :]  # gate i in [T, B, D*4H]
            a_i += tl.load(xg + row, mask=m_bj, other=0.0).to(ACC)
            a_f += tl.load(xg + row + H, mask=m_bj, other=0.0).to(ACC)
            a_g += tl.load(xg + row + 2 * H, mask=m_bj, other=0.0).to(ACC)
            a_o += tl.load(xg + row + 3 * H, mask=m_bj, other=0.0).to(ACC)
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
            h_fresh = gate_o * _activate(c_fresh, ACT_OUT)

            p_state_t = (t64 * B + o_b64[:, None]) * (D * H) + d64 * H + o_j[None, :]  # [T, B, D*H]
            if NEEDS_H_PREV:
                p_h_own = p_h_prev + o_b64[:, None] * H + o_j[None, :]
                h_prev_own = tl.load(p_h_own, mask=m_bj, other=0.0, cache_modifier=".cg").to(ACC)
            if ZONEOUT_H == 1:
                keep_h = tl.load(zh_mask + ((d64 * T + t64) * B + o_b64[:, None]) * H + o_j[None, :], mask=m_bj,
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
            b_c = c_new

            tl.store(y + p_state_t, h_out.to(y.dtype.element_ty), mask=m_bj)
            p_h_next = h_buf + (((s + 1) % 2) * D + d64) * B * H + o_b64[:, None] * H + o_j[None, :]
            tl.store(p_h_next, h_new.to(h_buf.dtype.element_ty), mask=m_bj)
            if SAVE:
                p_g = gates_out + row
                tl.store(p_g, gate_i.to(gates_out.dtype.element_ty), mask=m_bj)
                tl.store(p_g + H, gate_f.to(gates_out.dtype.element_ty), mask=m_bj)
                tl.store(p_g + 2 * H, gate_g.to(gates_out.dtype.element_ty), mask=m_bj)
                tl.store(p_g + 3 * H, gate_o.to(gates_out.dtype.element_ty), mask=m_bj)
                tl.store(c_fresh_out + p_state_t, c_fresh, mask=m_bj)
                if ZONEOUT_C != 0:
                    tl.store(c_carried_out + p_state_t, c_new, mask=m_bj)
                if HAS_CLIP:
                    p_clip = clip_out + row
                    tl.store(p_clip, ((a_i >= -clip) & (a_i <= clip)).to(tl.int8), mask=m_bj)
                    tl.store(p_clip + H, ((a_f >= -clip) & (a_f <= clip)).to(tl.int8), mask=m_bj)
                    tl.store(p_clip + 2 * H, ((a_g >= -clip) & (a_g <= clip)).to(tl.int8), mask=m_bj)
                    tl.store(p_clip + 3 * H, ((a_o >= -clip) & (a_o <= clip)).to(tl.int8), mask=m_bj)
                if HAS_CELL_CLIP:
                    tl.store(cell_clip_out + p_state_t, inside_cell.to(tl.int8), mask=m_bj)
            if USE_BARRIER:
                _grid_barrier(p_counter, (s - s_lo + 1) * n_group, error)
            else:  # one program per group: its own warps still exchange h through memory
                tl.debug_barrier()

        tl.store(c_state + p_state, b_c, mask=m_bj)

    @triton.jit
    def _gate_rows(k0, H, H_PAD: tl.constexpr, K_CHUNK: tl.constexpr):
        """Entries ``[k0, k0 + K_CHUNK)`` of the gate axis padded per gate to ``H_PAD``: their rows of a
        ``4H`` axis, and which are real."""
        o_r = k0 + tl.arange(0, K_CHUNK)
        r_unit = o_r % H_PAD
        return ((o_r // H_PAD) * H + r_unit).to(tl.int64), r_unit < H

    @triton.jit
    def _weight_column_chunk(w, o_j, m_j, k0, H, H_PAD: tl.constexpr, K_CHUNK: tl.constexpr, AS_A: tl.constexpr):
        """Rows (gate axis) ``[k0, k0 + K_CHUNK)`` of the owned columns ``o_j`` of ``weight_hh [4H, H]``:
        the product's B operand ``[K, HB]``, or transposed, its A operand ``[HB, K]``."""
        rows, m_r = _gate_rows(k0, H, H_PAD, K_CHUNK)
        if AS_A:
            chunk = tl.load(w + rows[None, :] * H + o_j[:, None], mask=m_j[:, None] & m_r[None, :], other=0.0)
        else:
            chunk = tl.load(w + rows[:, None] * H + o_j[None, :], mask=m_r[:, None] & m_j[None, :], other=0.0)
        return chunk

    @triton.jit
    def _dh_from_dgates(dgates, w_dir, b_w, s, T, B, i_d, o_b64, m_b, o_j, m_j, H, D: tl.constexpr, G: tl.constexpr,
                        H_PAD: tl.constexpr, HB: tl.constexpr, BB: tl.constexpr, K_CHUNK: tl.constexpr,
                        PRECISION: tl.constexpr, ACC: tl.constexpr, W_AS_A: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """``dgates_t W_hh`` for the owned rows and units, ``t`` the backward's ``s``-th step:
        ``[BB, 4H] x [4H, HB]`` (or its transpose, ``W_hh^T`` as the A operand), over K chunks of the
        gate axis; with one chunk the weight slice ``b_w`` is the one loaded before the time loop.
        Rows of steps past a sequence's end hold zeros, so they add nothing. Returns ``[BB, HB]``."""
        t = _time_index(T - 1 - s, T, i_d).to(tl.int64)
        base = dgates + i_d.to(tl.int64) * G + (t * B + o_b64) * (D * G)
        if W_AS_A:
            acc = tl.zeros((HB, BB), dtype=ACC)
        else:
            acc = tl.zeros((BB, HB), dtype=ACC)
        for k0 in range(0, 4 * H_PAD, K_CHUNK):
            rows, m_r = _gate_rows(k0, H, H_PAD, K_CHUNK)
            if K_CHUNK == 4 * H_PAD:
                w_chunk = b_w
            else:
                w_chunk = _weight_column_chunk(w_dir, o_j, m_j, k0, H, H_PAD, K_CHUNK, W_AS_A)
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

    @triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end", "finish"])
    def _backward_kernel(
        dy,  # [T, B, D*H]
        dh_state,  # [D, B, H]  dh_n in, dh_0 out, accumulation dtype
        dc_state,  # [D, B, H]  dc_n in, dc_0 out
        w_hh,  # [D, 4H, H]
        peephole,  # [D, 3H]
        lengths,  # [B]
        rec_mask,  # [D, B, H]
        zh_mask,  # [D, T, B, H]
        zc_mask,  # [D, T, B, H]
        gates,  # [T, B, D*4H]  saved activations
        c_fresh,  # [T, B, D*H]
        c_carried,  # [T, B, D*H]  (zoneout on c only)
        c0,  # [D, B, H]
        clip_in,  # [T, B, D*4H] int8
        cell_clip_in,  # [T, B, D*H] int8
        dgates,  # [T, B, D*4H]  out: d loss / d a_t (pre-activation), storage dtype
        dpeep,  # [NB, D, 3H]  out: peephole gradient summed over this batch block's rows
        counters,  # [D, NB] int32
        error,  # [1] int32
        T,
        B,
        step_begin,
        step_end,
        finish,
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
        W_AS_A: tl.constexpr,
        K_CHUNK: tl.constexpr,
        USE_BARRIER: tl.constexpr,
    ):
        """Backward steps ``[step_begin, step_end)``, counted from the last processed step
        (docs/equations.md section 10). Each step has two phases: first ``dh`` receives
        ``dgates W_hh`` of the step before (every program's slice of it, published before the
        barrier), then the owned slice of this step's ``dgates`` is computed and published.
        ``finish`` runs the last product, which gives ``dh_0``; one launch per step passes it to an
        extra, empty launch, so that a launch boundary separates the phases. Steps past the end of
        every sequence of the batch block are skipped (their dgates rows stay zero)."""
        i_h, i_b, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        G: tl.constexpr = 4 * H
        o_j = i_h * HB + tl.arange(0, HB)
        o_b = i_b * BB + tl.arange(0, BB)
        m_j, m_b = o_j < H, o_b < B
        m_bj = m_b[:, None] & m_j[None, :]
        o_b64 = o_b.to(tl.int64)
        d64 = i_d.to(tl.int64)

        # weight_hh columns of the owned units (the gate axis padded per gate to H_PAD): the product's B
        # operand [4H, HB], or transposed, its A operand [HB, 4H]; loaded once when it is one K chunk,
        # else streamed from L2 each step
        w_dir = w_hh + d64 * G * H
        if K_CHUNK == 4 * H_PAD:
            b_w = _weight_column_chunk(w_dir, o_j, m_j, 0, H, H_PAD, K_CHUNK, W_AS_A)
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
            b_rec = tl.load(rec_mask + (d64 * B + o_b64[:, None]) * H + o_j[None, :], mask=m_bj, other=0.0).to(ACC)
        if HAS_LENGTHS:
            b_len = tl.load(lengths + o_b, mask=m_b, other=0)

        p_state = (d64 * B + o_b64[:, None]) * H + o_j[None, :]
        b_dh = tl.load(dh_state + p_state, mask=m_bj, other=0.0)
        b_dc = tl.load(dc_state + p_state, mask=m_bj, other=0.0)
        b_c0 = tl.load(c0 + p_state, mask=m_bj, other=0.0)
        p_counter = counters + i_d * tl.num_programs(1) + i_b
        n_group = tl.num_programs(0)

        lo, hi = _step_range(lengths, o_b, m_b, T, i_d, 0, HAS_LENGTHS)
        s_lo = tl.maximum(step_begin, lo)
        # num_stages=1: a step's loads of dgates must not be prefetched before the step that writes it
        for s in tl.range(s_lo, tl.minimum(step_end, hi), num_stages=1):
            if s > lo:
                dh_in = _dh_from_dgates(dgates, w_dir, b_w, s - 1, T, B, i_d, o_b64, m_b, o_j, m_j, H, D, G, H_PAD,
                                        HB, BB, K_CHUNK, PRECISION, ACC, W_AS_A, DOT_IN_FP32)
                if HAS_REC_MASK:
                    dh_in = dh_in * b_rec
                b_dh += dh_in

            s_fwd = T - 1 - s  # the forward pass's step index
            t = _time_index(s_fwd, T, i_d)
            t64 = t.to(tl.int64)
            t_prev = tl.where(i_d == 1, t + 1, t - 1)  # the step processed before t
            row = (t64 * B + o_b64[:, None]) * (D * G) + d64 * G + o_j[None, :]
            p_state_t = (t64 * B + o_b64[:, None]) * (D * H) + d64 * H + o_j[None, :]
            p_state_prev = (t_prev.to(tl.int64) * B + o_b64[:, None]) * (D * H) + d64 * H + o_j[None, :]

            dh_total = b_dh + tl.load(dy + p_state_t, mask=m_bj, other=0.0).to(ACC)
            if ZONEOUT_H == 1:
                keep_h = tl.load(zh_mask + ((d64 * T + t64) * B + o_b64[:, None]) * H + o_j[None, :], mask=m_bj,
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

            gate_i = tl.load(gates + row, mask=m_bj, other=0.0).to(ACC)
            gate_f = tl.load(gates + row + H, mask=m_bj, other=0.0).to(ACC)
            gate_g = tl.load(gates + row + 2 * H, mask=m_bj, other=0.0).to(ACC)
            gate_o = tl.load(gates + row + 3 * H, mask=m_bj, other=0.0).to(ACC)
            b_cf = tl.load(c_fresh + p_state_t, mask=m_bj, other=0.0)
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

            cell_out = _activate(b_cf, ACT_OUT)
            da_o = dh_fresh * cell_out * _activation_grad(gate_o, ACT_GATE)
            dc_fresh += dh_fresh * gate_o * _activation_grad(cell_out, ACT_OUT)
            if HAS_CLIP:
                p_clip = clip_in + row
                da_o = tl.where(tl.load(p_clip + 3 * H, mask=m_bj, other=0) != 0, da_o, 0.0)
            if PEEPHOLE:
                dc_fresh += da_o * b_po
            if HAS_CELL_CLIP:
                dc_fresh = tl.where(tl.load(cell_clip_in + p_state_t, mask=m_bj, other=0) != 0, dc_fresh, 0.0)
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
                da_i = tl.where(tl.load(p_clip, mask=m_bj, other=0) != 0, da_i, 0.0)
                da_g = tl.where(tl.load(p_clip + 2 * H, mask=m_bj, other=0) != 0, da_g, 0.0)
                if not COUPLED:
                    da_f = tl.where(tl.load(p_clip + H, mask=m_bj, other=0) != 0, da_f, 0.0)
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
                d_pi += tl.sum(da_i * c_prev, axis=0)
                d_pf += tl.sum(da_f * c_prev, axis=0)
                d_po += tl.sum(da_o * b_cf, axis=0)
            out_ty = dgates.dtype.element_ty
            tl.store(dgates + row, da_i.to(out_ty), mask=m_bj)
            tl.store(dgates + row + H, da_f.to(out_ty), mask=m_bj)
            tl.store(dgates + row + 2 * H, da_g.to(out_ty), mask=m_bj)
            tl.store(dgates + row + 3 * H, da_o.to(out_ty), mask=m_bj)
            if USE_BARRIER:
                _grid_barrier(p_counter, (s - s_lo + 1) * n_group, error)
            else:  # one program per group: its own warps still exchange dgates through memory
                tl.debug_barrier()

        if (finish != 0) & (hi > lo):
            dh_in = _dh_from_dgates(dgates, w_dir, b_w, hi - 1, T, B, i_d, o_b64, m_b, o_j, m_j, H, D, G, H_PAD,
                                    HB, BB, K_CHUNK, PRECISION, ACC, W_AS_A, DOT_IN_FP32)
            if HAS_REC_MASK:
                dh_in = dh_in * b_rec
            b_dh += dh_in
        tl.store(dh_state + p_state, b_dh, mask=m_bj)
        tl.store(dc_state + p_state, b_dc, mask=m_bj)
        if PEEPHOLE:
            p_dpeep = dpeep + (i_b * D + i_d) * 3 * H + o_j
            tl.store(p_dpeep, tl.load(p_dpeep, mask=m_j, other=0.0) + d_pi, mask=m_j)
            tl.store(p_dpeep + H, tl.load(p_dpeep + H, mask=m_j, other=0.0) + d_pf, mask=m_j)
            tl.store(p_dpeep + 2 * H, tl.load(p_dpeep + 2 * H, mask=m_j, other=0.0) + d_po, mask=m_j)


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
    key = (kind, error.device, call.batch, call.hidden, call.directions, call.dtype, grid, tuple(sorted(extra.items())))
    if grid.persistent and key in _DOES_NOT_FIT:
        grid = per_step_grid(kind, grid, call.hidden, call.dtype)
    shape = grid.shape(call.batch, call.hidden, call.directions)
    constants = call.constants(grid) | extra

    def run(begin: int, end: int, finish: int, use_barrier: bool) -> None:
        step_args = (begin, end, finish) if backward else (begin, end)
        kernel[shape](*args, *step_args, *scalars, **constants, USE_BARRIER=use_barrier, num_warps=grid.num_warps)

    # Triton launches on the current CUDA device: make it the tensors' one
    device = torch.cuda.device(error.device) if error.device.type == "cuda" else contextlib.nullcontext()
    try:
        with device:
            if grid.persistent:
                run(0, call.steps, 1, grid.barrier)
            else:
                for s in range(call.steps):
                    run(s, s + 1, 0, False)
                if backward:
                    run(call.steps, call.steps, 1, False)
    except Exception as exc:
        if grid.persistent and _OutOfResources is not None and isinstance(exc, _OutOfResources):
            _DOES_NOT_FIT.add(key)
            return _launch(kernel, call, per_step_grid(kind, grid, call.hidden, call.dtype), args, scalars, extra, error,
                           backward=backward)
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


def _precision(dtype: torch.dtype) -> str:
    """IEEE products for float32 unless the user enabled TF32 for matmuls, as torch does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
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

    @staticmethod
    def of(x: Tensor, lengths: Tensor | None, weights: Sequence[DirectionWeights], options: LSTMOptions,
           masks: Sequence[DirectionMasks], training: bool) -> _Call:
        dtype, acc = x.dtype, accumulation_dtype(x.dtype)
        T, B = x.shape[0], x.shape[1]
        H = weights[0].weight_hh.shape[0] // 4
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
        )

    def constants(self, grid: Grid) -> dict:
        o = self.options
        return dict(
            H=self.hidden, D=self.directions, H_PAD=hidden_pad(self.hidden), HB=grid.hb, BB=grid.bb,
            ACC=getattr(tl, _TL_DTYPES[self.acc]), PRECISION=_precision(self.dtype),
            DOT_IN_FP32=INTERPRET and self.dtype == torch.bfloat16,
            ACT_GATE=_ACTIVATION_CODES[o.activations[0]], ACT_IN=_ACTIVATION_CODES[o.activations[1]],
            ACT_OUT=_ACTIVATION_CODES[o.activations[2]], PEEPHOLE=self.peephole is not None,
            HAS_CLIP=o.clip is not None, COUPLED=o.coupled_input_forget, HAS_CELL_CLIP=o.cell_clip is not None,
            ZONEOUT_H=self.zoneout_h, ZONEOUT_C=self.zoneout_c, HAS_REC_MASK=self.rec_mask is not None,
            HAS_LENGTHS=self.lengths is not None, W_AS_A=grid.w_as_a, K_CHUNK=grid.k_chunk,
        )

    def grid(self, kind: str, device: torch.device) -> Grid:
        return choose_grid(kind, self.batch, self.hidden, self.directions, self.dtype, device)


def _empty(like: Tensor, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
    """Every buffer a kernel must fill comes from here, so that tests can poison them (NaN) and catch
    an element the kernel never wrote."""
    return like.new_empty(shape, dtype=dtype)


def _or_dummy(t: Tensor | None, like: Tensor) -> Tensor:
    """Triton needs a pointer for every argument; a flag keeps an absent tensor from being read."""
    return like.new_empty(1) if t is None else t


def _forward(call: _Call, x: Tensor, h0: Tensor, c0: Tensor, *, save: bool):
    """``x [T, B, I]``, ``h0``/``c0 [D, B, H]`` -> ``y [T, B, D*H]``, ``h_n``, ``c_n [D, B, H]`` and, with
    ``save``, the tensors :func:`_backward` needs."""
    T, B, H, D, dtype, acc = call.steps, call.batch, call.hidden, call.directions, call.dtype, call.acc
    G = 4 * H
    xg = (x.reshape(T * B, -1) @ call.w_ih.t()).view(T, B, D * G)  # every step and direction at once
    h_buf = _empty(x, 2, D, B, H)
    h_buf.copy_(h0.unsqueeze(0).expand(2, D, B, H))  # a direction that skips its first steps starts in either slot
    c_state = c0.to(acc).contiguous().clone()
    # steps a batch block skips (past all of its sequences' ends) are never written: zeros there
    y = _empty(x, T, B, D * H) if call.lengths is None else x.new_zeros(T, B, D * H)
    o = call.options
    saved = {
        "gates": _empty(x, T, B, D * G) if save else None,
        "c_fresh": _empty(x, T, B, D * H, dtype=acc) if save else None,
        "c_carried": _empty(x, T, B, D * H, dtype=acc) if save and call.zoneout_c else None,
        "clip": _empty(x, T, B, D * G, dtype=torch.int8) if save and o.clip is not None else None,
        "cell_clip": _empty(x, T, B, D * H, dtype=torch.int8) if save and o.cell_clip is not None else None,
    }
    grid = call.grid("forward", x.device)
    counters = torch.zeros(D, triton.cdiv(B, grid.bb), dtype=torch.int32, device=x.device)
    error = torch.zeros(1, dtype=torch.int32, device=x.device)
    dummy_acc = x.new_empty(1, dtype=acc)
    args = (
        xg, _or_dummy(call.bias, dummy_acc), call.w_hh, _or_dummy(call.peephole, dummy_acc),
        _or_dummy(call.lengths, counters), _or_dummy(call.rec_mask, dummy_acc), _or_dummy(call.zh_mask, dummy_acc),
        _or_dummy(call.zc_mask, dummy_acc), h_buf, c_state, y,
        _or_dummy(saved["gates"], y), _or_dummy(saved["c_fresh"], dummy_acc), _or_dummy(saved["c_carried"], dummy_acc),
        _or_dummy(saved["clip"], error), _or_dummy(saved["cell_clip"], error), counters, error,
        T, B,
    )
    scalars = (o.clip or 0.0, o.cell_clip or 0.0, o.zoneout_h, o.zoneout_c)
    extra = dict(HAS_BIAS=call.bias is not None, NEEDS_H_PREV=call.zoneout_h != 0 or call.lengths is not None,
                 SAVE=save)
    _launch(_forward_kernel, call, grid, args, scalars, extra, error, backward=False)
    return y, _final_h(h_buf, call, grid.bb), c_state.to(dtype), saved


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


def _backward(call: _Call, saved: dict, x: Tensor, y: Tensor, h0: Tensor, c0: Tensor, dy: Tensor, dh_n: Tensor,
              dc_n: Tensor) -> dict[str, Tensor | None]:
    """BPTT in the kernel, then the weight products: returns the gradients of ``x``, ``h0``, ``c0``,
    ``w_ih [D*4H, I]``, ``w_hh [D, 4H, H]`` (of the stored weight: the DropConnect mask applied),
    the summed biases ``[D, 4H]`` and the peepholes ``[D, 3H]``."""
    T, B, H, D, dtype, acc = call.steps, call.batch, call.hidden, call.directions, call.dtype, call.acc
    G = 4 * H
    dh_state = dh_n.to(acc).contiguous().clone()
    dc_state = dc_n.to(acc).contiguous().clone()
    dgates = _empty(x, T, B, D * G) if call.lengths is None else x.new_zeros(T, B, D * G)  # skipped steps: zero
    grid = call.grid("backward", x.device)
    blocks = triton.cdiv(B, grid.bb)
    dpeep = torch.zeros(blocks, D, 3 * H, dtype=acc, device=x.device)
    counters = torch.zeros(D, blocks, dtype=torch.int32, device=x.device)
    error = torch.zeros(1, dtype=torch.int32, device=x.device)
    dummy_acc = x.new_empty(1, dtype=acc)
    c0_acc = c0.to(acc).contiguous()
    args = (
        dy.to(dtype).contiguous(), dh_state, dc_state, call.w_hh, _or_dummy(call.peephole, dummy_acc),
        _or_dummy(call.lengths, counters), _or_dummy(call.rec_mask, dummy_acc), _or_dummy(call.zh_mask, dummy_acc),
        _or_dummy(call.zc_mask, dummy_acc), saved["gates"], saved["c_fresh"], _or_dummy(saved["c_carried"], dummy_acc),
        c0_acc, _or_dummy(saved["clip"], error), _or_dummy(saved["cell_clip"], error), dgates, dpeep, counters,
        error, T, B,
    )
    o = call.options
    _launch(_backward_kernel, call, grid, args, (o.zoneout_h, o.zoneout_c), {}, error, backward=True)

    rows = dgates.view(T * B, D * G)
    x_rows = x.reshape(T * B, -1)
    h_in = _previous_states(y, h0, call.lengths)
    if call.rec_mask is not None:
        h_in = (h_in * call.rec_mask.transpose(0, 1).unsqueeze(0)).to(dtype)
    per_direction = rows.view(T * B, D, G).transpose(0, 1)  # [D, T*B, 4H]
    d_w_hh = torch.bmm(per_direction.transpose(1, 2), h_in.view(T * B, D, H).transpose(0, 1))  # [D, 4H, H]
    return {
        "x": (rows @ call.w_ih).view(T, B, -1),
        "h0": dh_state.to(dtype),
        "c0": dc_state.to(dtype),
        "weight_ih": rows.t() @ x_rows,
        "weight_hh": d_w_hh,
        "bias": rows.sum(0, dtype=acc).view(D, G),
        "peephole": dpeep.sum(0) if call.peephole is not None else None,
    }


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
    ``(dy, dh_n, dc_n)``, the autograd.Function run as plain functions (engines/ops.py). Layers the
    kernels do not cover never get here: under torch.compile they are traced on the reference."""
    masks = list(masks) if masks is not None else [DirectionMasks() for _ in weights]
    flat = [t for w in weights for t in w]
    ctx = PlainContext([False, True, True, True, *(t is not None for t in flat)])
    with torch.no_grad():
        _LayerFunction.forward(ctx, _Call.of(x, lengths, weights, options, masks, training), x.contiguous(), h0, c0,
                               *flat)
        return list(_LayerFunction.backward(ctx, *cotangents)[1:])


def supports(device: torch.device, dtype: torch.dtype, options: LSTMOptions) -> bool:
    return triton is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)


def kernels_cover(weights: Sequence[DirectionWeights], options: LSTMOptions) -> bool:
    """Layer norm and the projection reach the kernels in part 2; until then the reference runs them."""
    return not options.layer_norm and weights[0].weight_hr is None


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
    if not kernels_cover(weights, options):
        from .. import reference

        return reference.lstm_layer(x, lengths, h0, c0, weights, options, masks, training=training)
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

    def rows(t, dim):
        return None if t is None else t.index_select(dim, order)

    sorted_masks = [DirectionMasks(rows(m.zoneout_h, 1), rows(m.zoneout_c, 1), rows(m.recurrent, 0), m.weight_hh)
                    for m in masks]
    y, h, c = _run(rows(x, 1), lengths.to(x.device)[order], rows(h0, 1), rows(c0, 1), weights, options, sorted_masks,
                   training)
    return y.index_select(1, back), h.index_select(1, back), c.index_select(1, back)


def _run(x, lengths, h0, c0, weights, options, masks, training):
    call = _Call.of(x, lengths, weights, options, masks, training)
    tensors = (x, h0, c0, *(t for w in weights for t in w))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        with torch.no_grad():
            y, h_n, c_n, _ = _forward(call, x.contiguous(), h0, c0, save=False)
        return y, h_n, c_n
    flat = [t for w in weights for t in w]
    return _LayerFunction.apply(call, x.contiguous(), h0, c0, *flat)
