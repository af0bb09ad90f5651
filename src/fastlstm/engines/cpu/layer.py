"""One layer on the CPU: per direction, a compiled loop over the layout's rows, forward and backward.

Shape legend: ``T`` steps, ``B`` batch (sorted by length), ``H`` hidden, ``P`` projection,
``H_out = P or H``, ``D`` directions, ``G = 4H``, ``N`` rows.

Work per layer:
    forward:  per direction and step, one recurrent GEMM (the kernels' own, over weights packed once
              per call) and one fused pointwise update (plus the projection's GEMM).
    backward: per step one GEMM for dh (plus the projection's), then one GEMM each for dW_hh (and
              dW_hr) over all rows, and a reduction for the biases. The input side (dx, dW_ih) is
              the input projection's, outside the engine.
Saved for the backward (per direction, one float arena and one uint8 arena): gate activations (not
pre-activations), the fresh cell, the recurrent GEMM's input, and what the options need (clip
masks, zoneout-carried cell, layer-norm statistics). Without autograd only one step's rows are kept.

Half precision (``half``: bfloat16 or float16 calls, computed in float32): the output ``y`` and its
gradient ``dy`` are in the half precision (the kernels convert each row), and so are the saved gate
activations, which lie in the uint8 arena (first, so aligned); the rest stays float32, the cell
included. That halves what the backward reads of the gates, as torch's half-precision LSTM keeps them.
Where the kernels multiply bfloat16 pairs (instruction set ``avx512_bf16``), a bfloat16 call's
recurrent products run on bfloat16 operands (twice the float32 products per instruction), as torch's
bfloat16 LSTM's do: forward, ``h_in`` rounded to bfloat16 against ``W_hh`` in bfloat16 panels (the
saved ``h_in`` holds the rounded values, so ``dW_hh`` is the gradient of the product computed);
backward, ``dh_in = dhw W_hh`` with ``dhw`` rounded for the product (the saved gradients stay float32).
``dW_hh``/``dW_hr`` are torch's bfloat16 GEMMs where the CPU has them (``gemm.gradient_product``).

Measured and not adopted (Zen 4, 2 threads, 2026-12-07; the patches are described in that stop's
closing note): a layer projecting its input itself, a chunk of 256-1024 rows at a time (no
``[N, 4H]`` gates or gate gradient held whole): forward+backward 0.96-1.24x the time of the
projection outside at the float32 and bfloat16 rows of cpu-quick (its weight gradients summed over
chunks; float16 0.79-0.93x), forward 0.94-1.18x; peak memory lower in some rows (bfloat16 B32 T64
H256 26.7 -> 20.6 MB) but not float16's (21.0 -> 21.5 MB, torch 12.0: the saved arenas and the
weights' float32 copies dominate there); the kernels normalising the raw input gates themselves
under layer norm (the statistics in the pass that reads each row, again in the backward): within
the timing noise (0.98-1.02x) and no lower peak.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ...masks import DirectionMasks
from ...options import GATE_ACTIVATIONS
from ...weights import DirectionWeights
from ..contract import LayerCall, LayerGrads, LayerInputs
from . import gemm, kernels, threads
from .arena import Arena, arena_layout

ACTIVATION_CODES = {name: code for code, name in enumerate(GATE_ACTIVATIONS)}
_FLOAT_BUFFERS = ("gates", "c_fresh", "h_in", "c_carried", "m", "hw_hat", "hw_rstd", "c_hat",
                  "c_rstd", "hw", "htilde")
_MASK_BUFFERS = ("clip_mask", "cclip_mask", "pclip_mask")


def zoneout_mode(call: LayerCall, masks: DirectionMasks) -> int:
    """The kernels' zoneout mode: 0 off, 1 Bernoulli masks (training), 2 expectation (eval)."""
    if call.training:
        return 1 if (masks.zoneout_h is not None or masks.zoneout_c is not None) else 0
    return 2 if call.options.has_zoneout else 0


def carries_cell(call: LayerCall, masks: DirectionMasks) -> bool:
    """Whether zoneout on ``c`` makes the carried cell differ from the fresh one (it is then kept)."""
    mode = zoneout_mode(call, masks)
    return (mode == 1 and masks.zoneout_c is not None) or (mode == 2 and call.options.zoneout_c > 0)


def buffer_sizes(call: LayerCall, rows: int, batch: int, hidden: int, proj: int, carried: bool,
                 save: bool, half: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """The float and uint8 buffers of one direction, in elements (bytes); per-step ones for ``rows``
    rows (``N`` when saving, else one step's ``B``). ``half``: a half-precision call, whose saved
    gates are two bytes each."""
    o, G, ho = call.options, 4 * hidden, proj or hidden
    ln, half_gates = o.layer_norm, half and save
    floats = {
        "gates": 0 if half_gates else rows * G, "c_fresh": rows * hidden,
        "h_in": rows * ho, "c_carried": rows * hidden if carried and save else 0, "m": rows * hidden if proj else 0,
        "hw_hat": rows * G if ln else 0, "hw_rstd": rows if ln else 0, "c_hat": rows * hidden if ln else 0,
        "c_rstd": rows if ln else 0, "hw": batch * G, "htilde": batch * proj,
    }
    masks = {
        "half_gates": 2 * rows * G if half_gates else 0,
        "clip_mask": rows * G if o.clip is not None else 0,
        "cclip_mask": rows * hidden if o.cell_clip is not None else 0,
        "pclip_mask": rows * proj if proj and o.proj_clip is not None else 0,
    }
    return floats, masks


def allocate(call: LayerCall, inputs: LayerInputs, *, half: torch.dtype | None = None) -> list[Tensor]:
    """Each direction's (float arena, uint8 arena) for its backward; also run on fake tensors.
    ``half``: the call's half precision (``inputs`` then float32), or None."""
    if not call.save:
        return []
    layout, dtype, saved = inputs.layout, inputs.h0.dtype, []
    for w, masks in zip(inputs.weights, inputs.masks):
        hidden, proj = w.weight_hh.shape[0] // 4, 0 if w.weight_hr is None else w.weight_hr.shape[0]
        floats, uint8 = buffer_sizes(call, layout.total, layout.batch, hidden, proj, carries_cell(call, masks), True,
                                     half is not None)
        saved += [inputs.h0.new_empty(arena_layout(floats)[1], dtype=dtype),
                  inputs.h0.new_empty(arena_layout(uint8)[1], dtype=torch.uint8)]
    return saved


@functools.lru_cache(maxsize=256)
def _constant_fields(call: LayerCall, dtype: torch.dtype, steps: int, batch: int, hidden: int, proj: int,
                     reverse: bool, zoneout: int, column_threads: int, save: bool):
    """The fields of a direction's plan that do not point at anything, set once per configuration
    (copying a plan costs less than setting them)."""
    o = call.options
    p = kernels.new_plan()
    p.dtype = kernels.dtype_code(dtype)
    p.steps, p.batch, p.hidden, p.proj, p.h_out = steps, batch, hidden, proj, proj or hidden
    p.reverse = int(reverse)
    p.act_gate, p.act_in, p.act_out = (ACTIVATION_CODES[a] for a in o.activations)
    p.peephole, p.coupled, p.layer_norm = int(o.peephole), int(o.coupled_input_forget), int(o.layer_norm)
    p.clip, p.cell_clip = o.clip or 0.0, o.cell_clip or 0.0
    p.proj_clip = (o.proj_clip or 0.0) if proj else 0.0
    p.zoneout_mode, p.z_h, p.z_c = zoneout, o.zoneout_h, o.zoneout_c
    p.row_begin, p.row_end = 0, batch
    p.column_threads = column_threads
    p.save = int(save)
    return p


_PANEL_KINDS = {torch.float32: 0, torch.float64: 1, torch.int32: 2}


def _panels(b: Tensor) -> Tensor:
    """``b [K, N]`` (any strides; float32, float64, or int32 words) -> ``[ceil(N / NR), K, NR]``: the
    column panels the loop's GEMM streams (NR = 64 bytes: 16 four-byte or 8 eight-byte elements,
    whatever the instruction set), zero-padded past N."""
    nr = 64 // b.element_size()
    k, n = b.shape
    panels = b.new_empty(-(-n // nr), k, nr)
    kernels.module().pack_panels(_PANEL_KINDS[b.dtype], k, n, b.data_ptr(), b.stride(0), b.stride(1), panels.data_ptr())
    return panels


def _bfloat16_pair_panels(b: Tensor) -> Tensor:
    """``b [K, N]`` (bfloat16, or float32 holding bfloat16 values; any strides) -> bfloat16 ``[ceil(N / 16),
    ceil(K / 2), 16, 2]``: the panels of the AVX512-BF16 product (kernels.cpp, ``gemm_bf16_pairs``),
    rows k = 2j and 2j + 1 of a column side by side, zero-padded past K and N."""
    k, n = b.shape
    # b = W^T (the forward's): a column's pairs are adjacent in W's rows, one word each. (Both strides are
    # compared: a [K, 1] W_hh, H_out = 1, has strides (1, 1) too, and its view as words would fail.)
    if b.stride(0) == 1 and b.stride(1) == k:
        w = b.t().to(torch.bfloat16)
        w = torch.nn.functional.pad(w, (0, 1)) if k % 2 else w.contiguous()
        return _panels(w.view(torch.int32).t()).view(torch.bfloat16).view(-1, (k + 1) // 2, 16, 2)
    rows = b.to(torch.bfloat16).contiguous()
    panels = torch.empty(-(-n // 16), (k + 1) // 2, 16, 2, dtype=torch.bfloat16)
    kernels.module().pack_bfloat16_pairs(k, n, rows.data_ptr(), rows.stride(0), panels.data_ptr())
    return panels


class Direction:
    """One direction of one layer: its plans, for the forward and then, rebuilt from the same
    inputs and the saved arenas, for the backward (nothing is held between the two)."""

    def __init__(self, call: LayerCall, inputs: LayerInputs, d: int, half: torch.dtype | None = None):
        w, masks, layout = inputs.weights[d], inputs.masks[d], inputs.layout
        self.call, self.layout, self.d, self.reverse = call, layout, d, d == 1
        self.dtype, self.half = inputs.h0.dtype, half
        self.hidden = w.weight_hh.shape[0] // 4
        self.proj = 0 if w.weight_hr is None else w.weight_hr.shape[0]
        self.h_out = self.proj or self.hidden
        rows = threads.row_threads(layout.batch)
        self.column_threads = threads.column_threads(self.hidden, self.h_out, self.dtype, rows_split=rows > 1)
        self.threads = 1 if self.column_threads > 1 else rows
        self.zoneout_mode, self.carried = zoneout_mode(call, masks), carries_cell(call, masks)
        # contiguous (copies only if strided) tensors the plans point into
        self.w_hh, self.w_hr, self.peep = (kernels.dense(t) for t in (w.weight_hh, w.weight_hr, w.weight_peephole))
        # (a half-precision call's W_hh comes in its own dtype: its bfloat16 pair panels are packed from
        # it as it is, and it is widened only where the kernels read float32, wide_w_hh)
        self._wide_w_hh = None
        self.ln = [kernels.dense(t) for t in (w.layer_norm_hh_weight, w.layer_norm_cell_weight, w.layer_norm_cell_bias)]
        self.masks = [kernels.dense(t) for t in (masks.recurrent, masks.zoneout_h, masks.zoneout_c)]
        self.c0 = inputs.c0[d].contiguous()
        self.bias = w.bias_ih
        if w.bias_ih is not None:
            self.bias = w.bias_ih + w.bias_hh

    def sizes(self, save: bool) -> tuple[dict[str, int], dict[str, int]]:
        rows = self.layout.total if save else self.layout.batch
        return buffer_sizes(self.call, rows, self.layout.batch, self.hidden, self.proj, self.carried, save,
                            self.half is not None)

    def plan(self, arena: Arena, masks: Arena, save: bool):
        """The plan's fields that the forward and the backward share, pointed at ``arena``/``masks``."""
        lay, ptr = self.layout, kernels.pointer
        p = kernels.copy_plan(_constant_fields(self.call, self.dtype, lay.steps, lay.batch, self.hidden, self.proj,
                                               self.reverse, self.zoneout_mode, self.column_threads, save))
        p.n_rows, p.offsets = lay.batch_sizes.data_ptr(), lay.offsets().data_ptr()
        p.w_hr, p.peep = ptr(self.w_hr), ptr(self.peep)
        p.ln_hh, p.ln_c_w, p.ln_c_b = ptr(self.ln[0]), ptr(self.ln[1]), ptr(self.ln[2])
        p.rec_mask, p.zh_mask, p.zc_mask = ptr(self.masks[0]), ptr(self.masks[1]), ptr(self.masks[2])
        p.c0 = self.c0.data_ptr()
        arena.point(p, _FLOAT_BUFFERS)
        masks.point(p, _MASK_BUFFERS)
        if self.half is not None:
            p.half = kernels.HALF_CODES[self.half]
            if save:
                p.gates = masks.ptr("half_gates")
        return p

    def wide_w_hh(self) -> Tensor:
        """``W_hh`` in the plan's dtype (a half-precision call's widened once, on first use)."""
        if self._wide_w_hh is None:
            self._wide_w_hh = self.w_hh if self.w_hh.dtype == self.dtype else self.w_hh.to(self.dtype)
        return self._wide_w_hh

    def point_w_hh(self, p, packs: bool) -> None:
        """Points ``p`` at ``W_hh`` in the plan's dtype, read in its natural layout (or packed from
        it), except where a packed call multiplies bfloat16 pairs (nothing then reads it)."""
        if not (packs and self.bfloat16_products()):
            p.w_hh = self.wide_w_hh().data_ptr()

    def bfloat16_products(self) -> bool:
        """Whether the kernels multiply this call's recurrent products in bfloat16 pairs (a bfloat16
        call on an instruction set that has them)."""
        return self.half == torch.bfloat16 and kernels.module().bfloat16_products()

    def bfloat16_operands(self, p, b: Tensor) -> tuple[Tensor, Tensor]:
        """For a product ``A [B, K] @ b [K, N]`` in bfloat16 pairs: ``b``'s panels, and the scratch the
        kernels round A's rows into (``[B, K]``, K padded to even), which ``p`` points at."""
        operand = torch.zeros(self.layout.batch, b.shape[0] + b.shape[0] % 2, dtype=torch.bfloat16)
        p.operand_bf16, p.ld_operand_bf16 = operand.data_ptr(), operand.shape[1]
        return _bfloat16_pair_panels(b), operand

    def team(self, plan) -> list:
        """One copy of ``plan`` per thread, each owning a range of batch rows."""
        if self.threads == 1:
            return [plan]
        team = []
        for begin, end in threads.row_ranges(self.layout, self.threads):
            member = kernels.copy_plan(plan)
            member.row_begin, member.row_end = begin, end
            team.append(member)
        return team

    def forward(self, xg: Tensor, y: Tensor, h: Tensor, c: Tensor, arena: Arena, masks: Arena, *, save: bool):
        """Run the loop over ``xg [N, D*4H]`` (this direction's columns at ``d*4H``), writing ``y [N, D*H_out]``
        (in the half precision, if any) columns ``d*H_out``; the states ``h [B, H_out]`` and ``c [B, H]``
        go in as ``h0``, ``c0`` and come out as ``h_n``, ``c_n``."""
        lay, G, d = self.layout, 4 * self.hidden, self.d
        p = self.plan(arena, masks, save)
        p.h_state, p.c_state = h.data_ptr(), c.data_ptr()
        p.xg, p.ld_xg = xg.data_ptr() + d * G * xg.element_size(), xg.stride(0)
        p.xg_half = kernels.HALF_CODES.get(xg.dtype, 0)
        p.bias = kernels.pointer(self.bias)
        p.y, p.ld_y = y.data_ptr() + d * self.h_out * y.element_size(), y.stride(0)
        p.ld_hw = G
        packed = [None, None]
        packs = threads.packs(lay.steps, lay.batch, self.threads)
        self.point_w_hh(p, packs)
        if packs:
            w_hr = None if self.w_hr is None else _panels(self.w_hr.t())
            if self.bfloat16_products():
                # the product in bfloat16 pairs (W_hh holds bfloat16 values; h_in is rounded to them)
                w_hh_bf16, operand = self.bfloat16_operands(p, self.w_hh.t())
                p.w_hh_bf16 = w_hh_bf16.data_ptr()
                packed = [None, w_hr, w_hh_bf16, operand]
            else:
                packed = [_panels(self.wide_w_hh().t()), w_hr]
        p.w_hh_packed, p.w_hr_packed = (kernels.pointer(t) for t in packed[:2])
        team = self.team(p)  # the plans (and what they point at) live until the call returns
        kernels.module().forward_all(tuple(kernels.address(q) for q in team))

    def backward(self, arena: Arena, masks: Arena, dy: Tensor, dh_n: Tensor, dc_n: Tensor,
                 dxg: Tensor) -> dict[str, Tensor | None]:
        """BPTT over the saved arenas: ``dy [N, D*H_out]`` (in the half precision, if any),
        ``dh_n``/``dc_n`` of this direction; writes ``dxg [N, D*4H]`` columns ``d*4H``. Returns the
        gradients of ``h0``, ``c0`` and of this direction's recurrent weights (of ``weight_hh`` as the
        kernels read it: DropConnect applied)."""
        lay, H, G, P, ho, d = self.layout, self.hidden, 4 * self.hidden, self.proj, self.h_out, self.d
        N, B, ln = lay.total, lay.batch, self.call.options.layer_norm
        dgates = dxg[:, d * G : (d + 1) * G]
        work = Arena.allocate(self.dtype, {"dh_state": B * ho, "dc_state": B * H, "dm": B * H, "dh_in": B * ho})
        # per-row scratch apart from the states (whose gradients are returned as views), each buffer its own
        # allocation: dproj goes as soon as dW_hr is summed from it, before dW_hh is allocated
        dproj = Arena.allocate(self.dtype, {"dproj": N * P})
        dhw = Arena.allocate(self.dtype, {"dhw": N * G}).view("dhw", N, G) if ln else dgates
        dh_state, dc_state = work.view("dh_state", B, ho), work.view("dc_state", B, H)
        dh_state.copy_(dh_n)
        dc_state.copy_(dc_n)
        p = self.plan(arena, masks, save=True)
        packed_t = [None, None]
        packs = threads.packs(lay.steps, lay.batch, self.threads)
        self.point_w_hh(p, packs)
        if packs:
            w_hr = None if self.w_hr is None else _panels(self.w_hr)
            if self.bfloat16_products():  # dh_in = dhw W_hh with dhw rounded to bfloat16 for the product
                w_hh_bf16_t, operand = self.bfloat16_operands(p, self.w_hh)
                p.w_hh_bf16_t = w_hh_bf16_t.data_ptr()
                packed_t = [None, w_hr, w_hh_bf16_t, operand]
            else:
                packed_t = [_panels(self.wide_w_hh()), w_hr]

        p.dy, p.ld_dy = dy.data_ptr() + d * ho * dy.element_size(), dy.stride(0)
        p.dh_state, p.dc_state = dh_state.data_ptr(), dc_state.data_ptr()
        p.dgates, p.ld_dgates = dgates.data_ptr(), dxg.stride(0)
        p.dhw, p.ld_dhw = dhw.data_ptr(), dhw.stride(0)
        p.dproj, p.dm, p.dh_in = dproj.ptr("dproj"), work.ptr("dm"), work.ptr("dh_in")
        p.w_hh_packed_t, p.w_hr_packed_t = (kernels.pointer(t) for t in packed_t[:2])
        team = self.team(p)
        # each plan of a team accumulates its own parameter-gradient sums and has its own scratch
        sums = []
        for q in team:
            # (work: 2H, and the row's gates widened from half precision: 4H more)
            acc = Arena.allocate(self.dtype, {"work": (2 if self.half is None else 6) * H,
                                              "dpeep": 3 * H if self.peep is not None else 0, "dln_hh": G if ln else 0,
                                              "dln_c_w": H if ln else 0, "dln_c_b": H if ln else 0}, zero=True)
            acc.point(q, ("work", "dpeep", "dln_hh", "dln_c_w", "dln_c_b"))
            sums.append(acc)
        kernels.module().backward_all(tuple(kernels.address(q) for q in team))
        del packed_t, team  # not needed by the weight GEMMs below, which allocate their results

        grads: dict[str, Tensor | None] = {"h0": dh_state, "c0": dc_state}
        product = functools.partial(gemm.gradient_product, half=self.half)
        grads["weight_hr"] = product(dproj.view("dproj", N, P), arena.view("m", N, H)) if P else None  # [P, H]
        del dproj
        grads["weight_hh"] = product(dhw, arena.view("h_in", N, ho))  # [4H, H_out], K = N
        grads["bias_ih"] = grads["bias_hh"] = dgates.sum(0) if self.bias is not None else None
        sums_of = {"weight_peephole": ("dpeep", 3 * H), "layer_norm_hh_weight": ("dln_hh", G),
                   "layer_norm_cell_weight": ("dln_c_w", H), "layer_norm_cell_bias": ("dln_c_b", H)}
        for field, (name, size) in sums_of.items():
            present = sums[0].ptr(name) is not None
            grads[field] = sum(acc.view(name, size) for acc in sums) if present else None
        return grads


def forward(call: LayerCall, inputs: LayerInputs, saved: list[Tensor], *,
            half: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's ``(y, h_n, c_n)``; ``half``: the call's half precision (``inputs`` float32), the
    dtype of ``y``."""
    xg, layout = inputs.x.contiguous(), inputs.layout
    D, ho = len(inputs.weights), inputs.h0.shape[2]
    y = inputs.h0.new_empty(layout.total, D * ho, dtype=half or inputs.h0.dtype)
    h_n, c_n = inputs.h0.clone(memory_format=torch.contiguous_format), inputs.c0.clone(memory_format=torch.contiguous_format)
    # (a sequence of length 0, from lengths=: no step reaches the last rows of the per-step scratch
    # kept in the float arena, and what the op returns must not be leftover memory)
    unreached = call.save and not layout.full and int(layout.batch_sizes[0]) < layout.batch
    for d in range(D):
        direction = Direction(call, inputs, d, half)
        if call.save:
            floats, uint8 = direction.sizes(save=True)
            arena = Arena(saved[2 * d].zero_() if unreached else saved[2 * d], arena_layout(floats)[0])
            masks = Arena(saved[2 * d + 1], arena_layout(uint8)[0])
        else:
            floats, uint8 = direction.sizes(save=False)
            arena, masks = Arena.allocate(direction.dtype, floats), Arena.allocate(torch.uint8, uint8)
        direction.forward(xg, y, h_n[d], c_n[d], arena, masks, save=call.save)
    return y, h_n, c_n


def backward(call: LayerCall, inputs: LayerInputs, y: Tensor | None, saved: list[Tensor], dy: Tensor, dh_n: Tensor,
             dc_n: Tensor, *, needs_x: bool, half: torch.dtype | None = None) -> LayerGrads:
    """The layer's gradients; ``half`` as for :func:`forward` (``dy`` in it)."""
    layout, D, h0, c0 = inputs.layout, len(inputs.weights), inputs.h0, inputs.c0
    G = inputs.weights[0].weight_hh.shape[0]
    dy_dtype = half or h0.dtype
    if dy is None:  # (no output gradient: one row of zeros that every row reads, its row stride 0)
        dy = h0.new_zeros(1, D * h0.shape[2], dtype=dy_dtype).expand(layout.total, -1)
    else:
        dy = dy.to(dy_dtype).contiguous()
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
    dxg = h0.new_empty(layout.total, D * G)
    per_direction = []
    for d in range(D):
        direction = Direction(call, inputs, d, half)
        floats, uint8 = direction.sizes(save=True)
        arena = Arena(saved[2 * d].contiguous(), arena_layout(floats)[0])
        masks = Arena(saved[2 * d + 1].contiguous(), arena_layout(uint8)[0])
        per_direction.append(direction.backward(arena, masks, dy, dh_n[d], dc_n[d], dxg))
    weights = [DirectionWeights(*(g.get(f) if t is not None else None for f, t in zip(DirectionWeights._fields, w)))
               for g, w in zip(per_direction, inputs.weights)]
    return LayerGrads(dxg if needs_x else None, torch.stack([g["h0"] for g in per_direction]),
                      torch.stack([g["c0"] for g in per_direction]), weights)
