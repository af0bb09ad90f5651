"""The CPU engine: one input GEMM, a compiled time loop, and a hand-written backward (BPTT).

Read top to bottom: the compiled kernels (``cpu_kernels.cpp``/``.h``) and their ``Plan``, the
GEMMs outside the loop, the packed layout, the per-direction launcher, the two
``autograd.Function`` nodes of one layer (the input projection, then the recurrence), the single
step, and the public op with the engine signature.

Shape legend: ``T`` steps, ``B`` batch, ``I`` input features, ``H`` hidden, ``P`` projection,
``H_out = P or H``, ``D`` directions, ``N`` real tokens (``T * B`` without lengths).

Layout. Sequences are sorted by length (longest first), so the rows still running at step ``t``
are a prefix ``[0, n_t)`` of the batch, and every per-step tensor is stored *packed*: step ``t``'s
``n_t`` rows start at row ``offsets[t]``. No work and no memory go to padding. The reverse
direction walks ``t = T-1 .. 0`` over the same prefixes; a row joins at its own last step with its
initial state, which its untouched state row still holds.

Work per layer:
    forward:  XW = X W_ih^T for all steps and both directions (one GEMM), then per direction and
              step one recurrent GEMM and one fused pointwise update (plus the projection GEMM).
    backward: per step one GEMM for dh (plus the projection's), then after the loop one GEMM each
              for dW_hh and dW_ih (K = N), one for dx, and a reduction for the biases.
Saved for backward: gate activations (not pre-activations), the fresh cell, the recurrent GEMM's
input, and what the options need (clip masks, zoneout-carried cell, layer-norm statistics).

The time loop runs in C++ with a GEMM of its own over weights packed once per call; batch rows
are independent recurrences, so disjoint row ranges run on separate threads, one per core torch
may use. The GEMMs outside the loop are torch's (BLAS or oneDNN, whichever is measured faster).
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import DirectionMasks
from .ops import PlainContext
from ..options import GATE_ACTIVATIONS, LSTMOptions
from ..weights import DirectionWeights

try:
    from . import _cpu_kernels as kernels
except ImportError:  # built without a compiler: the engine is unavailable, "auto" uses the reference
    kernels = None

LAYER_NORM_EPS = 1e-5
_ACTIVATION_CODES = {name: code for code, name in enumerate(GATE_ACTIVATIONS)}
_I64, _F64, _PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class Plan(ctypes.Structure):
    """Mirror of ``struct Plan`` in cpu_kernels.cpp (every field 8 bytes, same order)."""

    _fields_ = [
        ("dtype", _I64), ("steps", _I64), ("batch", _I64), ("hidden", _I64), ("proj", _I64), ("h_out", _I64),
        ("reverse", _I64), ("act_gate", _I64), ("act_in", _I64), ("act_out", _I64),
        ("peephole", _I64), ("coupled", _I64), ("layer_norm", _I64),
        ("clip", _F64), ("cell_clip", _F64), ("proj_clip", _F64),
        ("zoneout_mode", _I64), ("z_h", _F64), ("z_c", _F64),
        ("n_rows", _PTR), ("offsets", _PTR),
        ("w_hh", _PTR), ("w_hr", _PTR), ("peep", _PTR), ("ln_hh", _PTR), ("ln_c_w", _PTR), ("ln_c_b", _PTR),
        ("rec_mask", _PTR), ("zh_mask", _PTR), ("zc_mask", _PTR),
        ("xg", _PTR), ("ld_xg", _I64), ("c0", _PTR), ("h_state", _PTR), ("c_state", _PTR),
        ("y", _PTR), ("ld_y", _I64),
        ("gates", _PTR), ("clip_mask", _PTR), ("c_fresh", _PTR), ("cclip_mask", _PTR), ("c_carried", _PTR),
        ("h_in", _PTR), ("m", _PTR), ("pclip_mask", _PTR), ("hw_hat", _PTR), ("hw_rstd", _PTR),
        ("c_hat", _PTR), ("c_rstd", _PTR), ("hw", _PTR), ("ld_hw", _I64), ("htilde", _PTR),
        ("dy", _PTR), ("ld_dy", _I64), ("dh_state", _PTR), ("dc_state", _PTR),
        ("dgates", _PTR), ("ld_dgates", _I64), ("dhw", _PTR), ("ld_dhw", _I64), ("dproj", _PTR),
        ("dm", _PTR), ("dh_in", _PTR), ("dpeep", _PTR), ("dln_hh", _PTR), ("dln_c_w", _PTR), ("dln_c_b", _PTR),
        ("w_hh_packed", _PTR), ("w_hh_packed_t", _PTR), ("save", _I64), ("work", _PTR),
        ("row_begin", _I64), ("row_end", _I64), ("w_hr_packed", _PTR), ("w_hr_packed_t", _PTR),
        ("column_threads", _I64),
    ]


if kernels is not None and kernels.plan_size() != ctypes.sizeof(Plan):  # pragma: no cover - build mismatch
    kernels = None


def available() -> bool:
    return kernels is not None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().contiguous()


def _dense(t: Tensor | None) -> Tensor | None:
    """``t`` contiguous, where no autograd graph is being recorded (no detach needed)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# -- the GEMMs outside the loop ---------------------------------------------------------------------
#
# torch's CPU matmul is BLAS (MKL on x86), whose speed depends strongly on the CPU; on some,
# oneDNN (torch's mkldnn linear) is several times faster for the same product. Each product shape
# is timed once both ways (best of 5) and the faster one kept for the process.

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_CHOICES: dict[tuple, str] = {}


def _onednn_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.contiguous(), bias, "none", [], "")


# kind -> (BLAS, oneDNN) implementations of the same product
_PRODUCTS = {
    "nt": (  # a [M, K] @ b [N, K]^T (+ bias)
        lambda a, b, bias: torch.mm(a, b.t()) if bias is None else torch.addmm(bias, a, b.t()),
        _onednn_nt,
    ),
    "tn": (  # a [K, M]^T @ b [K, N]
        lambda a, b, bias: torch.mm(a.t(), b),
        lambda a, b, bias: _onednn_nt(a.t(), b.t()),
    ),
    "nn": (  # a [M, K] @ b [K, N]
        lambda a, b, bias: torch.mm(a, b),
        lambda a, b, bias: _onednn_nt(a, b.t()),
    ),
}


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul(kind: str, a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    blas, onednn = _PRODUCTS[kind]
    if not (_ONEDNN and a.dtype == torch.float32):
        return blas(a, b, bias)
    # Token counts change with every packed batch: shapes are keyed by the power of two above
    # them, so a training run times each size class once rather than every batch.
    key = (kind, *(1 << max(0, int(n) - 1).bit_length() for n in (*a.shape, *b.shape)), bias is not None)
    if key not in _CHOICES:
        args = (torch.randn(a.shape), torch.randn(b.shape), None if bias is None else torch.randn(bias.shape))
        _CHOICES[key] = "onednn" if _best_time(lambda: onednn(*args)) < _best_time(lambda: blas(*args)) else "blas"
    return (onednn if _CHOICES[key] == "onednn" else blas)(a, b, bias)


def matmul_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a [M, K] @ b [N, K]^T (+ bias [N])``."""
    return _matmul("nt", a, b, bias)


def matmul_tn(a: Tensor, b: Tensor) -> Tensor:
    """``a [K, M]^T @ b [K, N]`` (weight gradients, ``K = N`` tokens)."""
    return _matmul("tn", a, b)


def matmul_nn(a: Tensor, b: Tensor) -> Tensor:
    """``a [M, K] @ b [K, N]`` (input gradients)."""
    return _matmul("nn", a, b)


def _pack_panels(b: Tensor) -> Tensor:
    """``b [K, N]`` -> ``[ceil(N / NR), K, NR]``: the column panels the loop's GEMM streams
    (NR = two 32-byte vectors: 16 floats or 8 doubles), zero-padded past N."""
    nr = 16 if b.dtype == torch.float32 else 8
    k, n = b.shape
    if n % nr:
        b = torch.nn.functional.pad(b, (0, nr - n % nr))
    return b.reshape(k, -1, nr).permute(1, 0, 2).contiguous()


# -- layout -----------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Packed-by-step rows of a batch sorted by length (see the module docstring)."""

    steps: int
    batch: int
    n_rows: Tensor  # [T] int64
    offsets: Tensor  # [T] int64
    total: int  # N
    lengths: Tensor  # [B] int64, sorted
    order: Tensor | None  # [B] sorted position -> user batch index; None when every length is T
    flat_index: Tensor | None  # [N] row -> index into the padded [T * B] rows; None when no padding
    packed_input: bool = False  # the input and output are packed rows already (a PackedSequence's)

    @staticmethod
    def of(steps: int, batch: int, lengths: Tensor | None) -> Layout:
        if lengths is None or bool((lengths == steps).all()):
            return _full_layout(steps, batch)
        sorted_lengths, order = torch.sort(lengths.cpu(), descending=True, stable=True)
        n_rows = (sorted_lengths.unsqueeze(0) > torch.arange(steps).unsqueeze(1)).sum(1)
        return Layout._of_rows(n_rows, batch, order, packed_input=False)  # (zero lengths: n_rows[0] < B)

    @staticmethod
    def of_packed(batch_sizes: Tensor, sorted_indices: Tensor | None) -> Layout:
        """A PackedSequence's rows are this layout already: step-major, each step's sequences in
        sorted order. Only its padded index (for masks) is computed; its data is used as it is."""
        order = None if sorted_indices is None else sorted_indices.cpu()
        n_rows = batch_sizes.to(torch.int64).cpu()
        return Layout._of_rows(n_rows, int(n_rows[0]), order, packed_input=True)

    @staticmethod
    def _of_rows(n_rows: Tensor, batch: int, order: Tensor | None, *, packed_input: bool) -> Layout:
        steps = n_rows.numel()
        offsets = torch.cumsum(n_rows, 0) - n_rows
        total = int(n_rows.sum())
        sorted_lengths = (n_rows.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(1)
        rows_t = torch.repeat_interleave(torch.arange(steps), n_rows)
        slot = torch.arange(total) - offsets[rows_t]
        flat_index = rows_t * batch + (slot if order is None else order[slot])
        return Layout(steps, batch, n_rows, offsets, total, sorted_lengths, order, flat_index, packed_input)

    def rows(self, padded: Tensor) -> Tensor:
        """``[T, B, F]`` -> ``[N, F]`` (contiguous)."""
        flat = padded.reshape(self.steps * self.batch, padded.shape[-1])
        return flat.contiguous() if self.flat_index is None else flat.index_select(0, self.flat_index)

    def input_rows(self, x: Tensor) -> Tensor:
        """The engine's input or output-gradient rows ``[N, F]``, from ``x`` in the caller's form."""
        return x.contiguous() if self.packed_input else self.rows(x)

    def output(self, rows: Tensor) -> Tensor:
        """Rows ``[N, F]`` in the caller's form: as they are for packed input, else padded."""
        return rows if self.packed_input else self.padded(rows)

    def padded(self, rows: Tensor) -> Tensor:
        """``[N, F]`` -> zero-padded ``[T, B, F]``."""
        if self.flat_index is None:
            return rows.view(self.steps, self.batch, rows.shape[-1])
        out = rows.new_zeros(self.steps * self.batch, rows.shape[-1])
        out.index_copy_(0, self.flat_index, rows)
        return out.view(self.steps, self.batch, rows.shape[-1])

    def sort(self, per_batch: Tensor) -> Tensor:
        return per_batch if self.order is None else per_batch.index_select(0, self.order)

    def unsort(self, per_batch: Tensor) -> Tensor:
        if self.order is None:
            return per_batch
        return torch.empty_like(per_batch).index_copy_(0, self.order, per_batch)

    def row_ranges(self, parts: int) -> list[tuple[int, int]]:
        """Up to ``parts`` disjoint batch-row ranges holding about equal numbers of tokens."""
        cumulative = torch.cumsum(self.lengths, 0)
        bounds = [0]
        for k in range(1, parts):
            bounds.append(max(bounds[-1], int(torch.searchsorted(cumulative, self.total * k / parts)) + 1))
        bounds.append(self.batch)
        return [(begin, end) for begin, end in zip(bounds, bounds[1:]) if end > begin]


@functools.lru_cache(maxsize=64)
def _full_layout(steps: int, batch: int) -> Layout:
    """Every sequence of length T (read-only, so shared between calls)."""
    n_rows = torch.full((steps,), batch, dtype=torch.int64)
    offsets = torch.arange(steps, dtype=torch.int64) * batch
    return Layout(steps, batch, n_rows, offsets, steps * batch, torch.full((batch,), steps), None, None)


# The loop splits rows across threads only when each thread keeps at least this many rows: its
# GEMM needs 4-row blocks to stay efficient, and every thread streams all of W_hh. Measured on the
# 2-core development machine (fp32, H 128..1024): 2 threads lose below 4 rows each, gain 5-10% at
# 4-8 rows and 10-50% from 8 rows each.
_MIN_ROWS_PER_THREAD = 8


def _thread_count(layout: Layout) -> int:
    return max(1, min(torch.get_num_threads(), layout.batch // _MIN_ROWS_PER_THREAD))


# With large recurrent weights a step is bound by streaming them from memory, and a row split would
# make every thread stream all of them: the threads split each step's GEMM columns (so each streams
# its share) and meet at a barrier a few times per step. Measured on the development machine
# (fp32, 2 threads): from 4 MB of W_hh (H = 512) columns beat rows at every batch size, by up to
# 3x at B = 1, H = 1024. Below it, where the batch splits into rows (8 or more per thread), rows win
# forward+backward. Where it does not (B < 16 on 2 threads), columns win from 64 KB of W_hh
# (H = 64): B = 1, T = 256, forward 4.21 -> 2.66 ms at H = 128 and 11.8 -> 7.4 ms at H = 256,
# forward+backward 10.5 -> 8.3 and 26.8 -> 19.8 ms; at H = 32 the barriers cost more than they save.
_MIN_COLUMN_WEIGHT_BYTES = 4 << 20
_MIN_COLUMN_WEIGHT_BYTES_UNSPLIT = 64 << 10
_MIN_COLUMNS_PER_MEMBER = 16


def _column_threads(hidden: int, h_out: int, dtype: torch.dtype, rows_split: bool) -> int:
    """Threads that split each step's columns (1: none); ``rows_split``: the batch splits into rows.
    A team has at most one member per 16 columns (:data:`_MIN_COLUMNS_PER_MEMBER`) of its narrowest
    product (the backward's, H_out wide): more would only wait at the barriers (the rule was
    measured with 2 threads)."""
    weight_bytes = 4 * hidden * h_out * (4 if dtype == torch.float32 else 8)
    least = _MIN_COLUMN_WEIGHT_BYTES if rows_split else _MIN_COLUMN_WEIGHT_BYTES_UNSPLIT
    if weight_bytes < least:
        return 1
    return max(1, min(torch.get_num_threads(), h_out // _MIN_COLUMNS_PER_MEMBER))


# Packing the recurrent weights costs about one step's worth of memory traffic, and the packed
# GEMM needs 4-row blocks: a single step, or fewer than 4 rows per thread, uses the weights'
# natural layout instead (dot products for B = 1 are as fast from it).
_MIN_STEPS_TO_PACK = 2
_MIN_ROWS_TO_PACK = 4


def _packs(layout: Layout, threads: int) -> bool:
    return layout.steps >= _MIN_STEPS_TO_PACK and layout.batch // threads >= _MIN_ROWS_TO_PACK


class _Arena:
    """One allocation carved into the named buffers a plan points at: a call makes one allocator
    request per dtype instead of one per buffer (it matters for single-step calls)."""

    def __init__(self, dtype: torch.dtype, sizes: dict[str, int], *, zero: bool = False):
        self._allocate(dtype, *self.layout(sizes), zero)

    @staticmethod
    def layout(sizes: dict[str, int]) -> tuple[dict[str, int | None], int]:
        """Each buffer's offset (None if empty) and the total, in elements."""
        offsets: dict[str, int | None] = {}
        total = 0
        for name, count in sizes.items():
            offsets[name] = total if count else None
            total += -(-count // 16) * 16  # whole cache lines per buffer
        return offsets, total

    @classmethod
    def of_layout(cls, dtype: torch.dtype, offsets: dict[str, int | None], total: int) -> _Arena:
        """An arena with a layout computed once (:meth:`layout`): one allocation, nothing else."""
        arena = cls.__new__(cls)
        arena._allocate(dtype, offsets, total, False)
        return arena

    def _allocate(self, dtype: torch.dtype, offsets: dict[str, int | None], total: int, zero: bool) -> None:
        self.offsets, self.tensor_dtype = offsets, dtype
        self.tensor = (torch.zeros if zero else torch.empty)(max(total, 1), dtype=dtype)
        self._base, self._item = self.tensor.data_ptr(), self.tensor.element_size()

    def release(self) -> Tensor:
        """Hand the allocation to its new owner (autograd's saved tensors, which free it after the
        backward unless the graph is retained); the plans' pointers stay valid while that owner
        keeps it. :meth:`hold` takes it back for the backward."""
        tensor, self.tensor = self.tensor, None
        return tensor

    def hold(self, tensor: Tensor) -> None:
        """Take an allocation (back) and point :meth:`ptr` at it; a copy in another dtype, device or
        layout (a saved-tensor hook's) is brought back to this arena's."""
        self.tensor = tensor.to(device="cpu", dtype=self.tensor_dtype).contiguous()
        self._base = self.tensor.data_ptr()

    def ptr(self, name: str) -> int | None:
        offset = self.offsets[name]
        return None if offset is None else self._base + offset * self._item

    def view(self, name: str, *shape: int) -> Tensor:
        offset, count = self.offsets[name], 1
        for extent in shape:
            count *= extent
        if offset is None:  # a buffer of no elements (B = 0, say)
            return self.tensor[:0].view(shape)
        return self.tensor[offset : offset + count].view(shape)


# -- one direction: the launcher ------------------------------------------------------------------


class _Direction:
    """Buffers and plans of one direction of one layer, forward and then backward."""

    def __init__(self, layout: Layout, w: DirectionWeights, masks: DirectionMasks, options: LSTMOptions,
                 *, training: bool, reverse: bool, dtype: torch.dtype):
        self.layout, self.w, self.masks, self.options = layout, w, masks, options
        self.reverse, self.dtype = reverse, dtype
        self.hidden = w.weight_hh.shape[0] // 4
        self.proj = 0 if w.weight_hr is None else w.weight_hr.shape[0]
        self.h_out = self.proj or self.hidden
        row_threads = _thread_count(layout)
        self.column_threads = _column_threads(self.hidden, self.h_out, dtype, rows_split=row_threads > 1)
        self.threads = 1 if self.column_threads > 1 else row_threads
        self.w_hh_eff = (w.weight_hh if masks.weight_hh is None else w.weight_hh * masks.weight_hh).contiguous()
        if not training:
            self.zoneout_mode = 2 if options.has_zoneout else 0
        else:
            self.zoneout_mode = 1 if (masks.zoneout_h is not None or masks.zoneout_c is not None) else 0
        # contiguous views (copies only if a parameter is strided) that the plan points into
        self.w_hr, self.peep = _contiguous(w.weight_hr), _contiguous(w.weight_peephole)
        self.ln_hh, self.ln_c_w, self.ln_c_b = (
            _contiguous(t) for t in (w.layer_norm_hh_weight, w.layer_norm_cell_weight, w.layer_norm_cell_bias)
        )
        self.rec_mask = None if masks.recurrent is None else layout.sort(masks.recurrent).contiguous()
        self.zh_mask = None if masks.zoneout_h is None else layout.rows(masks.zoneout_h)
        self.zc_mask = None if masks.zoneout_c is None else layout.rows(masks.zoneout_c)

    def _base_plan(self) -> Plan:
        o, lay = self.options, self.layout
        p = Plan()
        p.dtype = 0 if self.dtype == torch.float32 else 1
        p.steps, p.batch, p.hidden, p.proj, p.h_out = lay.steps, lay.batch, self.hidden, self.proj, self.h_out
        p.reverse = int(self.reverse)
        p.act_gate, p.act_in, p.act_out = (_ACTIVATION_CODES[a] for a in o.activations)
        p.peephole, p.coupled, p.layer_norm = int(o.peephole), int(o.coupled_input_forget), int(o.layer_norm)
        p.clip = o.clip or 0.0
        p.cell_clip = o.cell_clip or 0.0
        p.proj_clip = (o.proj_clip or 0.0) if self.proj else 0.0
        p.zoneout_mode, p.z_h, p.z_c = self.zoneout_mode, o.zoneout_h, o.zoneout_c
        p.n_rows, p.offsets = lay.n_rows.data_ptr(), lay.offsets.data_ptr()
        p.w_hh, p.w_hr, p.peep = _ptr(self.w_hh_eff), _ptr(self.w_hr), _ptr(self.peep)
        p.ln_hh, p.ln_c_w, p.ln_c_b = _ptr(self.ln_hh), _ptr(self.ln_c_w), _ptr(self.ln_c_b)
        p.rec_mask, p.zh_mask, p.zc_mask = _ptr(self.rec_mask), _ptr(self.zh_mask), _ptr(self.zc_mask)
        p.row_begin, p.row_end = 0, lay.batch
        p.column_threads = self.column_threads
        return p

    def _team(self, plan: Plan) -> list[Plan]:
        """One copy of ``plan`` per thread, each owning a range of batch rows."""
        if self.threads == 1:
            return [plan]
        team = []
        for begin, end in self.layout.row_ranges(self.threads):
            q = Plan.from_buffer_copy(plan)
            q.row_begin, q.row_end = begin, end
            team.append(q)
        return team

    # forward ------------------------------------------------------------------------------------

    def forward(self, xg: Tensor, h0: Tensor, c0: Tensor, y: Tensor, d: int, *, save: bool) -> tuple[Tensor, Tensor]:
        """Run the loop. ``xg [N, D*4H]`` (this direction's columns at ``d*4H``), ``h0``/``c0`` sorted;
        writes ``y [N, D*H_out]`` columns ``d*H_out``; returns ``(h_n, c_n)`` sorted. With ``save``
        every step's activations are kept for :meth:`backward`; without, one step's rows are reused."""
        lay, H, G, P, ho, o = self.layout, self.hidden, 4 * self.hidden, self.proj, self.h_out, self.options
        B, rows = lay.batch, (lay.total if save else lay.batch)
        zc = (self.zoneout_mode == 1 and self.zc_mask is not None) or (self.zoneout_mode == 2 and o.zoneout_c > 0)
        ln = o.layer_norm
        self.arena = _Arena(self.dtype, {
            "h_state": B * ho, "c_state": B * H, "gates": rows * G, "c_fresh": rows * H, "h_in": rows * ho,
            "c_carried": lay.total * H if zc and save else 0, "m": rows * H if P else 0,
            "hw_hat": rows * G if ln else 0, "hw_rstd": rows if ln else 0,
            "c_hat": rows * H if ln else 0, "c_rstd": rows if ln else 0,
            "hw": B * G, "htilde": B * P,
        })
        masks = _Arena(torch.uint8, {
            "clip_mask": rows * G if o.clip is not None else 0,
            "cclip_mask": rows * H if o.cell_clip is not None else 0,
            "pclip_mask": rows * P if P and o.proj_clip is not None else 0,
        })
        a = self.arena
        h_state, c_state = a.view("h_state", B, ho), a.view("c_state", B, H)
        h_state.copy_(h0)
        c_state.copy_(c0)
        self.c0 = c0.contiguous()
        self.pack = _packs(lay, self.threads)
        self.packed = [None, None]
        if self.pack:
            self.packed = [_pack_panels(self.w_hh_eff.t()), _pack_panels(self.w_hr.t()) if P else None]

        p = self._base_plan()
        p.xg, p.ld_xg = xg.data_ptr() + d * G * xg.element_size(), xg.stride(0)
        p.y, p.ld_y = y.data_ptr() + d * ho * y.element_size(), y.stride(0)
        p.c0 = self.c0.data_ptr()
        self.masks_arena = masks
        self._point_at_buffers(p)
        p.ld_hw = G
        p.w_hh_packed, p.w_hr_packed = _ptr(self.packed[0]), _ptr(self.packed[1])
        p.save = int(save)
        team = self._team(p)  # the plans must outlive the call that reads them
        kernels.forward_all(tuple(ctypes.addressof(q) for q in team))
        self.packed = [None, None]  # the backward reads the weights packed the other way round
        self._plan = p
        return h_state, c_state

    _ARENA_FIELDS = ("h_state", "c_state", "gates", "c_fresh", "h_in", "c_carried", "m", "hw_hat", "hw_rstd",
                     "c_hat", "c_rstd", "hw", "htilde")
    _MASK_FIELDS = ("clip_mask", "cclip_mask", "pclip_mask")

    def _point_at_buffers(self, p: Plan) -> None:
        for name in self._ARENA_FIELDS:
            setattr(p, name, self.arena.ptr(name))
        for name in self._MASK_FIELDS:
            setattr(p, name, self.masks_arena.ptr(name))

    def saved(self) -> tuple[Tensor, Tensor]:
        """The buffers the backward reads, released to autograd's saved tensors (see
        :class:`_Recurrence`); :meth:`restore` takes them back."""
        return self.arena.release(), self.masks_arena.release()

    def restore(self, arena: Tensor, masks: Tensor) -> None:
        """Take back the saved buffers for the backward, and point the plan at them: saved-tensor
        hooks (``torch.utils.checkpoint`` without reentrance, ``save_on_cpu``, offloading) may hand
        back a copy or a recomputation, not the allocation the forward wrote."""
        before = (self.arena._base, self.masks_arena._base)
        self.arena.hold(arena)
        self.masks_arena.hold(masks)
        if (self.arena._base, self.masks_arena._base) != before:
            self._point_at_buffers(self._plan)

    # backward -----------------------------------------------------------------------------------

    def backward(self, dy: Tensor, dh_n: Tensor, dc_n: Tensor, dgates: Tensor, d: int) -> dict[str, Tensor | None]:
        """BPTT. ``dy [N, D*H_out]``, ``dh_n``/``dc_n`` sorted; writes ``dgates [N, D*4H]`` columns
        ``d*4H`` (the gradient of ``xg``). Returns the gradients of this direction's recurrent
        parameters and of ``h0``, ``c0`` (sorted)."""
        lay, H, G, N, P, ho, o = (self.layout, self.hidden, 4 * self.hidden, self.layout.total, self.proj,
                                  self.h_out, self.options)
        B, ln = lay.batch, o.layer_norm
        dgates_dir = dgates[:, d * G : (d + 1) * G]
        work = _Arena(self.dtype, {"dh_state": B * ho, "dc_state": B * H, "dm": B * H, "dh_in": B * ho})
        # per-token scratch apart from the states (whose gradients are returned as views): it goes
        # when this returns
        scratch = _Arena(self.dtype, {"dhw": N * G if ln else 0, "dproj": N * P})
        dh_state, dc_state = work.view("dh_state", B, ho), work.view("dc_state", B, H)
        dh_state.copy_(dh_n)
        dc_state.copy_(dc_n)
        dhw = scratch.view("dhw", N, G) if ln else dgates_dir
        packed_t = [None, None]
        if self.pack:
            packed_t = [_pack_panels(self.w_hh_eff), _pack_panels(self.w_hr) if P else None]

        p = self._plan
        p.dy, p.ld_dy = dy.data_ptr() + d * ho * dy.element_size(), dy.stride(0)
        p.dh_state, p.dc_state = dh_state.data_ptr(), dc_state.data_ptr()
        p.dgates, p.ld_dgates = dgates_dir.data_ptr(), dgates.stride(0)
        p.dhw, p.ld_dhw = dhw.data_ptr(), dhw.stride(0)
        p.dproj, p.dm, p.dh_in = scratch.ptr("dproj"), work.ptr("dm"), work.ptr("dh_in")
        p.w_hh_packed_t, p.w_hr_packed_t = _ptr(packed_t[0]), _ptr(packed_t[1])
        team = self._team(p)
        # each plan of a team accumulates its own parameter-gradient sums and has its own scratch
        sums = []
        for q in team:
            acc = _Arena(self.dtype, {"work": 2 * H, "dpeep": 3 * H if o.peephole else 0, "dln_hh": G if ln else 0,
                                      "dln_c_w": H if ln else 0, "dln_c_b": H if ln else 0}, zero=True)
            for name in ("work", "dpeep", "dln_hh", "dln_c_w", "dln_c_b"):
                setattr(q, name, acc.ptr(name))
            sums.append(acc)
        kernels.backward_all(tuple(ctypes.addressof(q) for q in team))
        del packed_t, team  # not needed by the weight GEMMs below, which allocate their results

        grads: dict[str, Tensor | None] = {"h0": dh_state, "c0": dc_state}
        d_w_eff = matmul_tn(dhw, self.arena.view("h_in", N, ho))  # [4H, H_out], K = N
        grads["weight_hh"] = d_w_eff if self.masks.weight_hh is None else d_w_eff * self.masks.weight_hh
        grads["weight_hr"] = matmul_tn(scratch.view("dproj", N, P), self.arena.view("m", N, H)) if P else None
        shapes = {"weight_peephole": ("dpeep", 3 * H), "layer_norm_hh_weight": ("dln_hh", G),
                  "layer_norm_cell_weight": ("dln_c_w", H), "layer_norm_cell_bias": ("dln_c_b", H)}
        for field, (name, size) in shapes.items():
            present = sums[0].ptr(name) is not None
            grads[field] = sum(acc.view(name, size) for acc in sums) if present else None
        return grads


# -- one layer: two autograd.Functions --------------------------------------------------------------
#
# A layer is two nodes of the autograd graph: the input projection (xg = x W_ih^T + b, or its layer
# norm, all steps and directions in one GEMM) and the recurrence over xg. Autograd runs the
# recurrence's backward first and, unless the graph is retained, frees what it saved (the per-step
# activations) before the projection's backward allocates dx and dW_ih: one node would hold both
# at once, which measured 13.6 MB against torch.nn.LSTM's 11.5 at B = 16, T = 64, H = 256, P = 64.

_FIELDS = DirectionWeights._fields
_INPUT_FIELDS = ("weight_ih", "bias_ih", "bias_hh", "layer_norm_ih_weight")


def _unflatten(flat: Sequence[Tensor | None]) -> list[DirectionWeights]:
    n = len(_FIELDS)
    return [DirectionWeights(*flat[d * n : (d + 1) * n]) for d in range(len(flat) // n)]


def _flat_part(weights: Sequence[DirectionWeights], *, inputs: bool) -> list[Tensor | None]:
    """Every direction's fields in order, those of the other node (the input projection's, or the
    recurrence's) replaced by None."""
    return [t if (name in _INPUT_FIELDS) == inputs else None for w in weights for name, t in zip(_FIELDS, w)]


def _input_weight(weights: Sequence[DirectionWeights]) -> Tensor:
    """``W_ih`` of every direction ``[D*4H, I]``."""
    return weights[0].weight_ih if len(weights) == 1 else torch.cat([w.weight_ih for w in weights])


def _input_weights(weights: Sequence[DirectionWeights]) -> tuple[Tensor, Tensor | None]:
    """``W_ih`` of every direction ``[D*4H, I]`` and ``b_ih + b_hh`` ``[D*4H]`` (None without bias)."""
    w_ih = _input_weight(weights)
    if weights[0].bias_ih is None:
        return w_ih, None
    sums = [w.bias_ih + w.bias_hh for w in weights]
    return w_ih, sums[0] if len(weights) == 1 else torch.cat(sums)


def _project(x_rows: Tensor, weights: Sequence[DirectionWeights], options: LSTMOptions):
    """``xg [N, D*4H]`` = ``x W_ih^T + b`` or ``LN(x W_ih^T) * gain + b``; and, with layer norm,
    ``(xw [N, D, 4H], mean, rstd)`` for the backward (``x_hat`` is recomputed there: [N, D*4H]
    less to keep)."""
    D, G = len(weights), weights[0].weight_ih.shape[0]
    w_ih, bias = _input_weights(weights)
    if not options.layer_norm:
        return matmul_nt(x_rows, w_ih, bias).contiguous(), None
    if D == 1:  # torch's fused layer norm applies the gain and the bias in its one pass
        xw = matmul_nt(x_rows, w_ih)
        xg, x_mean, x_rstd = torch.native_layer_norm(xw, [G], weights[0].layer_norm_ih_weight, bias,
                                                     LAYER_NORM_EPS)
        return xg, (xw, x_mean, x_rstd)
    xw = matmul_nt(x_rows, w_ih).view(-1, D, G)  # one gain per direction: normalise, then scale in place
    xg, x_mean, x_rstd = torch.native_layer_norm(xw, [G], None, None, LAYER_NORM_EPS)
    xg = xg.mul_(torch.stack([w.layer_norm_ih_weight for w in weights])).view(-1, D * G)
    return (xg if bias is None else xg.add_(bias)), (xw, x_mean, x_rstd)


def _project_backward(dxg: Tensor, x_rows: Tensor, weights: Sequence[DirectionWeights], norm, needs_dx: bool,
                      needs_dw: bool) -> tuple[Tensor | None, list[Tensor | None]]:
    """The gradients of :func:`_project` from ``dxg [N, D*4H]`` (overwritten with two directions and
    layer norm): ``dx [N, I]`` and the flat list of every direction's input-side fields (None
    elsewhere)."""
    D, G = len(weights), weights[0].weight_ih.shape[0]
    w_ih = _input_weight(weights)
    d_bias = dxg.sum(0) if weights[0].bias_ih is not None else None
    d_gain = None
    if norm is not None and D == 1:
        xw, x_mean, x_rstd = norm
        dxg, d_gain, _ = torch.ops.aten.native_layer_norm_backward(
            dxg, xw, [G], x_mean, x_rstd, weights[0].layer_norm_ih_weight, None, [True, True, False])
        d_gain = d_gain.unsqueeze(0)  # [D = 1, 4H]
    elif norm is not None:
        gains = torch.stack([w.layer_norm_ih_weight for w in weights])  # [D, 4H]
        dg = dxg.view(-1, D, G)
        xw, x_mean, x_rstd = norm
        x_hat_dg = (xw - x_mean).mul_(x_rstd).mul_(dg)  # one [N, D, 4H] temporary
        d_gain = x_hat_dg.sum(0)  # [D, 4H]
        del x_hat_dg
        # torch's own layer-norm backward: the reference's numerics, to the rounding (dxg is spent
        # after this: its gain is applied in place rather than into a copy)
        dxw, _, _ = torch.ops.aten.native_layer_norm_backward(
            dg.mul_(gains), xw, [G], x_mean, x_rstd, None, None, [True, False, False])
        dxg = dxw.reshape(-1, D * G)
    d_x = matmul_nn(dxg, w_ih) if needs_dx else None
    d_w_ih = matmul_tn(dxg, x_rows) if needs_dw else None
    grads: list[Tensor | None] = []
    for d, w in enumerate(weights):
        part = {"weight_ih": None if d_w_ih is None else d_w_ih[d * G : (d + 1) * G],
                "bias_ih": None if d_bias is None else d_bias[d * G : (d + 1) * G],
                "layer_norm_ih_weight": None if d_gain is None else d_gain[d]}
        part["bias_hh"] = part["bias_ih"]
        grads.extend(part.get(name) if getattr(w, name) is not None else None for name in _FIELDS)
    return d_x, grads


class _Projection(torch.autograd.Function):
    """``x`` in the caller's form (``[T, B, I]`` or packed rows ``[N, I]``) and the flat weights
    (input-side fields only) -> ``xg [N, D*4H]``."""

    @staticmethod
    def forward(ctx, setup, x, *flat_weights):
        layout, options = setup
        x_rows = layout.input_rows(x)
        xg, norm = _project(x_rows, _unflatten(flat_weights), options)
        ctx.layout, ctx.norm = layout, norm
        ctx.save_for_backward(x_rows, *flat_weights)
        return xg

    @staticmethod
    def backward(ctx, dxg):
        x_rows, *flat_weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # the two-direction layer-norm backward overwrites its input: autograd's gradient is not ours
        # to change
        spends = ctx.norm is not None and len(flat_weights) > len(_FIELDS)
        dxg = dxg.clone(memory_format=torch.contiguous_format) if spends else dxg.contiguous()
        needs_dw = any(needs[2 + d * len(_FIELDS)] for d in range(len(flat_weights) // len(_FIELDS)))
        d_x, grads = _project_backward(dxg, x_rows, _unflatten(flat_weights), ctx.norm, needs[1], needs_dw)
        return (None, None if d_x is None else ctx.layout.output(d_x), *grads)


def _recur(layout: Layout, options: LSTMOptions, masks, training: bool, save: bool, xg: Tensor, h0: Tensor,
           c0: Tensor, weights: Sequence[DirectionWeights], y_width: int):
    """Every direction's loop over ``xg [N, D*4H]`` (no autograd) -> ``(y_rows [N, D*H_out], h_n, c_n)``
    and the directions (for the backward)."""
    y_rows = torch.empty(layout.total, y_width, dtype=xg.dtype)
    directions, h_n, c_n = [], [], []
    for d, w in enumerate(weights):
        direction = _Direction(layout, w, masks[d], options, training=training, reverse=d == 1, dtype=xg.dtype)
        h, c = direction.forward(xg, layout.sort(h0[d]), layout.sort(c0[d]), y_rows, d, save=save)
        directions.append(direction)
        h_n.append(layout.unsort(h))
        c_n.append(layout.unsort(c))
    return (y_rows, torch.stack(h_n), torch.stack(c_n)), directions


class _Recurrence(torch.autograd.Function):
    """The loops. Inputs after the non-tensor setup: ``xg [N, D*4H]``, ``h0 [D, B, H_out]``,
    ``c0 [D, B, H]``, then the flat weights (recurrent fields only) -> ``y`` in the caller's form
    (``[T, B, D*H_out]`` or packed rows), ``h_n``, ``c_n``."""

    @staticmethod
    def forward(ctx, setup, xg, h0, c0, *flat_weights):
        layout, options, masks, training = setup
        weights = _unflatten(flat_weights)
        (y_rows, h_n, c_n), directions = _recur(layout, options, masks, training, True, xg, h0, c0, weights,
                                                len(weights) * weights[0].weight_hh.shape[1])
        ctx.layout, ctx.directions = layout, directions
        # the per-step buffers are autograd's to keep (and free once the backward is done); c0 too:
        # the backward reads it through the plans, so autograd must see it changed in place
        buffers = [t for direction in directions for t in direction.saved()]
        ctx.save_for_backward(c0, *buffers)
        return layout.output(y_rows), h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        layout, directions = ctx.layout, ctx.directions
        _, *buffers = ctx.saved_tensors
        D, dtype = len(directions), buffers[0].dtype
        G = 4 * directions[0].hidden
        dxg = torch.empty(layout.total, D * G, dtype=dtype)
        dy_rows = layout.input_rows(dy.to(dtype))
        per_direction = []
        for d, direction in enumerate(directions):
            direction.restore(buffers[2 * d], buffers[2 * d + 1])
            per_direction.append(direction.backward(dy_rows, layout.sort(dh_n[d]), layout.sort(dc_n[d]), dxg, d))
            direction.saved()  # the buffers are autograd's again: it frees them when this returns
        d_h0 = torch.stack([layout.unsort(g["h0"]) for g in per_direction])
        d_c0 = torch.stack([layout.unsort(g["c0"]) for g in per_direction])
        flat_grads = [None if name in _INPUT_FIELDS else g.get(name) for g in per_direction for name in _FIELDS]
        return (None, dxg, d_h0, d_c0, *flat_grads)


# -- a single step ----------------------------------------------------------------------------------
#
# LSTMCell and streaming calls run one step at a time, where Python overhead is most of the cost:
# this path makes one C++ call (input GEMV, step, states) and few allocations, from a plan template
# cached per configuration (only pointers change between calls). With autograd, the step keeps what
# its plan wrote (for T = 1 the saved rows are the step's own) and its backward is one more C++ call
# on the same plan, then the four weight-gradient products: no layer machinery (layout, arenas per
# direction, thread teams) for a step that has none of it to do.

_STEP_TEMPLATES: dict[tuple, _StepTemplate] = {}


@dataclass
class _Step:
    """One step's plan and everything its pointers point at for its backward (kept alive with it).
    Not the step's outputs: an autograd context holding its own outputs is a reference cycle
    through the graph, which Python's collector cannot see (it leaked every step)."""

    plan: Plan
    arena: _Arena
    w_hh: Tensor  # [4H, H] the effective weight_hh (DropConnect applied)
    keep: tuple  # the other tensors the plan points at


@dataclass
class _StepTemplate:
    """What every step of one configuration shares: the plan's constant fields, the layout it
    points into (held: the plan points at its tensors), and where the arena's buffers lie."""

    plan: Plan
    layout: Layout
    # _Arena.layout of what the step keeps (its backward reads it), and of its scratch (the input
    # and recurrent products, the output row), which goes when the step returns; one arena of both
    # when nothing is saved
    arenas: tuple[tuple[dict[str, int | None], int], ...]
    pointers: tuple[tuple[int, str, int], ...]  # (arena, plan field, byte offset into it)


def _step_template(dtype: torch.dtype, batch: int, w: DirectionWeights, options: LSTMOptions, masks: DirectionMasks,
                   training: bool, zoneout_c: bool, save: bool) -> _StepTemplate:
    hidden = w.weight_hh.shape[0] // 4
    G = 4 * hidden
    layout = _full_layout(1, batch)
    plan = _Direction(layout, w, masks, options, training=training, reverse=False, dtype=dtype)._base_plan()
    plan.column_threads = 1  # a step runs on the caller's thread
    plan.ld_xg, plan.ld_hw, plan.ld_y = G, G, hidden
    plan.save = int(save)
    item = torch.empty((), dtype=dtype).element_size()
    kept = {
        "gates": batch * G, "c_fresh": batch * hidden, "h_in": batch * hidden,
        "c_carried": batch * hidden if save and zoneout_c else 0,  # the saved step's carried cell
        "clip_mask": -(-batch * G // item) if options.clip is not None else 0,  # uint8 masks, in elements
        "cclip_mask": -(-batch * hidden // item) if options.cell_clip is not None else 0,
    }
    scratch = {"xg": batch * G, "hw": batch * G, "y": batch * hidden}
    arenas = (_Arena.layout(kept), _Arena.layout(scratch)) if save else (_Arena.layout(kept | scratch),)
    pointers = tuple((k, name, offset * item) for k, (offsets, _) in enumerate(arenas)
                     for name, offset in offsets.items() if offset is not None)
    return _StepTemplate(plan, layout, arenas, pointers)


def _step(x: Tensor, h0: Tensor, c0: Tensor, w: DirectionWeights, options: LSTMOptions, masks: DirectionMasks,
          training: bool, *, save: bool) -> tuple[_Step, Tensor, Tensor]:
    """Run one step: ``x [B, I]``, ``h0 [B, H]``, ``c0 [B, H]``. With ``save`` the plan's buffers hold
    what :func:`_step_backward` reads. Runs where no graph is recorded (nothing requires grad, or
    inside :class:`_StepFunction`), so tensors are read as they are, without ``detach``."""
    batch, hidden = x.shape[0], w.weight_hh.shape[0] // 4
    if training:
        zoneout_mode = 1 if (masks.zoneout_h is not None or masks.zoneout_c is not None) else 0
    else:
        zoneout_mode = 2 if options.has_zoneout else 0
    zoneout_c = (zoneout_mode == 1 and masks.zoneout_c is not None) or (zoneout_mode == 2 and options.zoneout_c > 0)
    key = (x.dtype, batch, hidden, options, zoneout_mode, zoneout_c, save)
    entry = _STEP_TEMPLATES.get(key)
    if entry is None:
        entry = _STEP_TEMPLATES.setdefault(key, _step_template(x.dtype, batch, w, options, masks, training, zoneout_c,
                                                                save))
    p = Plan.from_buffer_copy(entry.plan)
    arenas = [_Arena.of_layout(x.dtype, *layout) for layout in entry.arenas]
    h, c = x.new_empty(batch, hidden), x.new_empty(batch, hidden)
    bases = [arena.tensor.data_ptr() for arena in arenas]
    for k, name, offset in entry.pointers:
        setattr(p, name, bases[k] + offset)
    p.h_state, p.c_state = h.data_ptr(), c.data_ptr()
    w_hh = (w.weight_hh if masks.weight_hh is None else w.weight_hh * masks.weight_hh).contiguous()
    peep = _dense(w.weight_peephole)
    step_masks = (_dense(masks.recurrent), _dense(masks.zoneout_h), _dense(masks.zoneout_c))
    p.w_hh, p.peep = w_hh.data_ptr(), _ptr(peep)
    p.rec_mask, p.zh_mask, p.zc_mask = (_ptr(m) for m in step_masks)
    x, h0, c0, w_ih = x.contiguous(), h0.contiguous(), c0.contiguous(), w.weight_ih.contiguous()
    p.c0 = c0.data_ptr()
    b_ih, b_hh = _dense(w.bias_ih), _dense(w.bias_hh)
    kernels.single_step(ctypes.addressof(p), x.data_ptr(), x.shape[1], w_ih.data_ptr(), _ptr(b_ih) or 0,
                        _ptr(b_hh) or 0, h0.data_ptr(), c0.data_ptr())  # 0: no bias
    # the scratch and the outputs are not the step's to keep (the backward reads none of them)
    p.xg = p.hw = p.y = p.h_state = p.c_state = None
    return _Step(p, arenas[0], w_hh, (x, peep, *step_masks, c0)), h, c


def _single_step(x: Tensor, h0: Tensor, c0: Tensor, w: DirectionWeights, options: LSTMOptions,
                 masks: DirectionMasks, training: bool) -> tuple[Tensor, Tensor]:
    """``x [B, I]``, ``h0 [B, H]``, ``c0 [B, H]`` -> ``(h_1, c_1)``, each ``[B, H]``, nothing saved."""
    _, h, c = _step(x, h0, c0, w, options, masks, training, save=False)
    return h, c


def _step_backward(step: _Step, x: Tensor, dh: Tensor, dc: Tensor, w: DirectionWeights, masks: DirectionMasks,
                   needs_x: bool) -> dict[str, Tensor | None]:
    """The gradients of one step from ``dh``/``dc [B, H]`` (of ``h_1``, ``c_1``): one C++ call on the
    forward's plan, the step's BPTT and then ``dx = da W_ih``, ``dW_ih = da^T x``,
    ``dW_hh = da^T h_0`` and the bias sum, ``da [B, 4H]`` the pre-activations' gradient."""
    p, H = step.plan, step.plan.hidden
    B, I, G = x.shape[0], x.shape[1], 4 * H
    if B == 0:  # no rows: nothing flows (and no buffer to hand the C++ loops)
        zeros = x.new_zeros
        return {"x": x.new_empty(0, I) if needs_x else None, "h0": dh.new_empty(0, H), "c0": dc.new_empty(0, H),
                "weight_ih": zeros(G, I), "weight_hh": zeros(G, H),
                "bias_ih": zeros(G) if w.bias_ih is not None else None,
                "bias_hh": zeros(G) if w.bias_ih is not None else None,
                "weight_peephole": zeros(3 * H) if p.peephole else None}
    # one zeroed allocation: the states' gradients, dgates, scratch and the peephole sums (dy is
    # zero: h_1's gradient arrives as the final state's)
    work = _Arena(x.dtype, {"dh_state": B * H, "dc_state": B * H, "dgates": B * G, "dy": B * H, "dm": B * H,
                            "dh_in": B * H, "work": 2 * H, "dpeep": 3 * H if p.peephole else 0}, zero=True)
    dh_state, dc_state = work.view("dh_state", B, H), work.view("dc_state", B, H)
    dh_state.copy_(dh)
    dc_state.copy_(dc)
    p.dy, p.ld_dy = work.ptr("dy"), H
    p.dh_state, p.dc_state = dh_state.data_ptr(), dc_state.data_ptr()
    p.dgates = p.dhw = work.ptr("dgates")
    p.ld_dgates = p.ld_dhw = G
    p.dproj, p.dm, p.dh_in = None, work.ptr("dm"), work.ptr("dh_in")
    p.w_hh_packed_t, p.w_hr_packed_t = None, None
    p.work, p.dpeep = work.ptr("work"), work.ptr("dpeep")
    w_ih, x = w.weight_ih.contiguous(), x.contiguous()
    d_x = x.new_empty(B, I) if needs_x else None
    d_w_ih, d_w_hh = x.new_empty(G, I), x.new_empty(G, H)
    d_bias = x.new_empty(G) if w.bias_ih is not None else None
    kernels.step_backward(ctypes.addressof(p), x.data_ptr(), I, w_ih.data_ptr(), _ptr(d_x) or 0, d_w_ih.data_ptr(),
                          d_w_hh.data_ptr(), _ptr(d_bias) or 0)  # 0: not wanted
    return {
        "x": d_x, "h0": dh_state, "c0": dc_state, "weight_ih": d_w_ih,
        "weight_hh": d_w_hh if masks.weight_hh is None else d_w_hh * masks.weight_hh,
        "bias_ih": d_bias, "bias_hh": d_bias,
        "weight_peephole": work.view("dpeep", 3 * H) if p.peephole else None,
    }


class _StepFunction(torch.autograd.Function):
    """One step with autograd: ``x [B, I]``, ``h0``/``c0 [B, H]``, then the ``DirectionWeights``
    fields -> ``(h_1, c_1)``. For layers without projection or layer norm (see
    :func:`_steps_alone`)."""

    @staticmethod
    def forward(ctx, setup, x, h0, c0, *flat_weights):
        options, masks, training = setup
        ctx.step, h, c = _step(x, h0, c0, DirectionWeights(*flat_weights), options, masks, training, save=True)
        ctx.masks = masks
        # (autograd's check that nothing changed them in place; the backward reads c0 too)
        ctx.save_for_backward(x, c0, *flat_weights)
        return h, c

    @staticmethod
    def backward(ctx, dh, dc):
        # (the step's buffers live as long as the graph: a retained graph runs backward again)
        x, _, *flat_weights = ctx.saved_tensors
        w = DirectionWeights(*flat_weights)
        g = _step_backward(ctx.step, x, dh, dc, w, ctx.masks, ctx.needs_input_grad[1])
        return (None, g["x"], g["h0"], g["c0"], *(None if p is None else g[f] for f, p in zip(_FIELDS, w)))


def _steps_alone(weights: Sequence[DirectionWeights], options: LSTMOptions) -> bool:
    """Whether a step runs on the single-step path: one direction, no projection, no layer norm."""
    return len(weights) == 1 and weights[0].weight_hr is None and not options.layer_norm


def _is_single_step(x: Tensor, lengths: Tensor | None, weights: Sequence[DirectionWeights], options: LSTMOptions) -> bool:
    return x.shape[0] == 1 and lengths is None and _steps_alone(weights, options)


def _one_step(x: Tensor, h0: Tensor, c0: Tensor, w: DirectionWeights, options: LSTMOptions,
              masks: DirectionMasks | None, training: bool) -> tuple[Tensor, Tensor]:
    """``(h_1, c_1)`` of one step on the single-step path, through :class:`_StepFunction` when a
    gradient is needed."""
    masks = masks if masks is not None else DirectionMasks()
    if not _needs_grad(x, h0, c0, [w]):  # (nothing requires grad: no graph is recorded)
        return _single_step(x, h0, c0, w, options, masks, training)
    return _StepFunction.apply((options, masks, training), x, h0, c0, *w)


# -- the public op ----------------------------------------------------------------------------------


def supports(device: torch.device, dtype: torch.dtype, options: LSTMOptions) -> bool:
    return kernels is not None and device.type == "cpu" and dtype in (torch.float32, torch.float64)


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
    """The engine entry point; the signature and semantics of :func:`fastlstm.reference.lstm_layer`."""
    if masks is not None and not training:
        raise ValueError("masks are only used in training mode; eval mode uses their expectations")
    layout = Layout.of(x.shape[0], x.shape[1], lengths)
    if _is_single_step(x, lengths, weights, options):
        h, c = _one_step(x[0], h0[0], c0[0], weights[0], options, None if masks is None else masks[0], training)
        return h.unsqueeze(0).clone(), h.unsqueeze(0), c.unsqueeze(0)
    return _run_layer(layout, x, h0, c0, weights, options, masks, training)


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
    """A PackedSequence's rows ``data [N, I]`` (with its ``batch_sizes`` and ``sorted_indices``) as
    they are, no padding built: -> ``(y [N, D * H_out], h_n, c_n)``, states in user batch order.
    Masks are padded ``[T, B, .]`` in user order, as everywhere."""
    if masks is not None and not training:
        raise ValueError("masks are only used in training mode; eval mode uses their expectations")
    return _run_layer(Layout.of_packed(batch_sizes, sorted_indices), data, h0, c0, weights, options, masks, training)


def _needs_grad(x: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[DirectionWeights]) -> bool:
    tensors = (x, h0, c0, *(t for w in weights for t in w))
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run_layer(layout: Layout, x: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[DirectionWeights],
               options: LSTMOptions, masks: Sequence[DirectionMasks] | None, training: bool):
    masks = list(masks) if masks is not None else [DirectionMasks() for _ in weights]
    weights = list(weights)
    y_width = len(weights) * weights[0].weight_hh.shape[1]
    if not _needs_grad(x, h0, c0, weights):  # inference: nothing is kept per step
        with torch.no_grad():
            xg, _ = _project(layout.input_rows(x), weights, options)
            (y_rows, h_n, c_n), _ = _recur(layout, options, masks, training, False, xg, h0, c0, weights, y_width)
        return layout.output(y_rows), h_n, c_n
    xg = _Projection.apply((layout, options), x, *_flat_part(weights, inputs=True))
    return _Recurrence.apply((layout, options, masks, training), xg, h0, c0, *_flat_part(weights, inputs=False))


def layer_gradients(x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor, weights: Sequence[DirectionWeights],
                    options: LSTMOptions, masks: Sequence[DirectionMasks] | None, *, training: bool,
                    cotangents: tuple[Tensor, Tensor, Tensor]) -> list[Tensor | None]:
    """``[dx, dh0, dc0, *each direction's weight gradients]`` of one layer call under the cotangents
    ``(dy, dh_n, dc_n)``: both autograd.Functions' forwards and backwards run as plain functions,
    for the custom op that torch.compile sees (engines/ops.py)."""
    masks = list(masks) if masks is not None else [DirectionMasks() for _ in weights]
    weights = list(weights)
    layout = Layout.of(x.shape[0], x.shape[1], lengths)
    inputs_flat, recurrent_flat = _flat_part(weights, inputs=True), _flat_part(weights, inputs=False)
    projection = PlainContext([False, True, *(t is not None for t in inputs_flat)])
    recurrence = PlainContext([False, True, True, True, *(t is not None for t in recurrent_flat)])
    dy, dh_n, dc_n = cotangents
    with torch.no_grad():
        xg = _Projection.forward(projection, (layout, options), x, *inputs_flat)
        _Recurrence.forward(recurrence, (layout, options, masks, training), xg, h0, c0, *recurrent_flat)
        del xg
        _, dxg, d_h0, d_c0, *recurrent_grads = _Recurrence.backward(recurrence, dy, dh_n, dc_n)
        _, d_x, *input_grads = _Projection.backward(projection, dxg)
    grads = [a if a is not None else b for a, b in zip(input_grads, recurrent_grads)]
    return [d_x, d_h0, d_c0, *grads]


def lstm_cell(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w: DirectionWeights,
    options: LSTMOptions,
    masks: DirectionMasks | None,
    *,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """One step, ``x [B, I]``, ``h0``/``c0 [B, H]`` -> ``(h_1, c_1)``: the single-step path (with or
    without autograd), or with layer norm :func:`lstm_layer` with ``T = 1``."""
    if masks is not None and not training:
        raise ValueError("masks are only used in training mode; eval mode uses their expectations")
    if _steps_alone([w], options):
        return _one_step(x, h0, c0, w, options, masks, training)
    _, h, c = lstm_layer(x.unsqueeze(0), None, h0.unsqueeze(0), c0.unsqueeze(0), [w], options,
                         None if masks is None else [masks], training=training)
    return h[0], c[0]
