"""One layer on the GPU: the kernels' tensors from the engine contract's inputs, and the host side of
the forward and the backward (the weight products after BPTT).

Shape legend as in :mod:`fastlstm.engines.triton`; ``N`` rows of the layout, ``NB`` batch blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...options import LSTMOptions
from ...reference import LAYER_NORM_EPS
from ...weights import DirectionWeights, accumulation_dtype
from ..contract import LayerCall, LayerGrads, LayerInputs
from .backward_kernel import BACKWARD, backward_kernel
from .forward_kernel import FORWARD, forward_kernel
from .grid import INTERPRET, Grid, choose_grid, hidden_pad, pow2
from .launch import launch

ACTIVATION_CODES = {"sigmoid": 0, "hard_sigmoid": 1, "tanh": 2, "softsign": 3, "relu": 4, "hardsigmoid": 5}
ZONEOUT_OFF, ZONEOUT_MASK, ZONEOUT_CONSTANT = 0, 1, 2
_TL_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def empty(like: Tensor, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
    """Every buffer a kernel must fill comes from here, so that tests can poison them (NaN) and catch
    an element the kernel never wrote."""
    return like.new_empty(shape, dtype=dtype)


def _or_dummy(t: Tensor | None, like: Tensor) -> Tensor:
    """Triton needs a pointer for every argument; a flag keeps an absent tensor from being read."""
    return like.new_empty(1) if t is None else t


def _stacked(tensors: Sequence[Tensor | None], dtype: torch.dtype) -> Tensor | None:
    """``[D, ...]`` of the directions' tensors (one direction: a view, no copy)."""
    if tensors[0] is None:
        return None
    stacked = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))
    return stacked.to(dtype).contiguous()


def precision(dtype: torch.dtype, device: torch.device) -> str:
    """float32 products as torch.nn.LSTM's on the GPU: cuDNN's recurrence runs in TF32 while
    ``torch.backends.cudnn.allow_tf32`` is on (torch's default), IEEE when a user turns it off.
    (Measured on an H200, B=16 T=512 H=1024: torch's float32 LSTM 7.85 ms forward with the flag on,
    14.98 ms off.) Triton's interpreter (CPU tensors) always takes IEEE."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


@dataclass
class Call:
    """Everything one layer's kernels need, in kernel layout. ``D`` directions share one launch.
    ``varlen``: the sequences have different lengths (the kernels then address each step's rows
    through ``offsets`` and skip a batch block's steps past all of its sequences' ends)."""

    steps: int
    batch: int
    hidden: int
    directions: int
    dtype: torch.dtype
    acc: torch.dtype
    h_size: int  # P: the size of h, proj_size or H
    options: LSTMOptions
    varlen: bool
    lengths: Tensor | None  # [B] the sorted sequences' lengths, on the device (varlen)
    offsets: Tensor | None  # [T] each step's first row, on the device (varlen)
    batch_sizes: Tensor | None  # [T] on the CPU (varlen)
    w_hh: Tensor | None  # [D, 4H, P], DropConnect applied
    bias: Tensor | None  # [D, 4H] acc: b_ih + b_hh
    peephole: Tensor | None  # [D, 3H] acc
    rec_mask: Tensor | None  # [D, B, P] acc
    zh_mask: Tensor | None  # [D, T, B, P] acc (sorted batch order)
    zc_mask: Tensor | None  # [D, T, B, H] acc
    zoneout_h: int
    zoneout_c: int
    ln_hh: Tensor | None  # [D, 4H] acc: layer-norm weights
    ln_cell_w: Tensor | None  # [D, H]
    ln_cell_b: Tensor | None  # [D, H]
    w_hr: Tensor | None  # [D, P, H]: the projection
    # where the kernels run (the float32 products' precision depends on it); the sm_90 build checks
    # (build.py) describe a CUDA launch without tensors
    device: torch.device = torch.device("cuda")

    @property
    def layer_norm(self) -> bool:
        return self.options.layer_norm

    @property
    def projection(self) -> bool:
        return self.w_hr is not None

    @property
    def phases(self) -> int:
        """Phases (barriers) per step: layer norm adds two exchanges, the projection one."""
        return 1 + 2 * self.layer_norm + self.projection

    def constants(self, grid: Grid) -> dict:
        """The kernels' constexpr arguments shared by both (arguments.SHARED_CONSTANTS)."""
        o, P, programs = self.options, self.h_size, triton.cdiv(self.hidden, grid.hb)
        return dict(
            H=self.hidden, D=self.directions, H_PAD=hidden_pad(self.hidden), HB=grid.hb, BB=grid.bb,
            ACC=getattr(tl, _TL_DTYPES[self.acc]), PRECISION=precision(self.dtype, self.device),
            DOT_IN_FP32=INTERPRET and self.dtype == torch.bfloat16,
            ACT_GATE=ACTIVATION_CODES[o.activations[0]], ACT_IN=ACTIVATION_CODES[o.activations[1]],
            ACT_OUT=ACTIVATION_CODES[o.activations[2]], PEEPHOLE=o.peephole, HAS_CLIP=o.clip is not None,
            COUPLED=o.coupled_input_forget, HAS_CELL_CLIP=o.cell_clip is not None, ZONEOUT_H=self.zoneout_h,
            ZONEOUT_C=self.zoneout_c, HAS_REC_MASK=self.rec_mask is not None, VARLEN=self.varlen,
            W_AS_A=grid.w_as_a, K_CHUNK=grid.k_chunk,
            # layer norm's exchange: the group's programs, and slots for every grid the launcher may
            # switch to (HB >= 4)
            LAYER_NORM=o.layer_norm, NP_PAD=max(2, pow2(programs)), LN_SLOTS=ln_slots(self.hidden),
            # the size P of h, and PB, the units of h a program owns: HB without projection; with
            # it, P spread over the group's programs (tl.dot needs at least 16)
            PROJ=self.projection, P=P, P_PAD=hidden_pad(P),
            PB=max(16, pow2(triton.cdiv(P, programs))) if self.projection else grid.hb, PROJ_K=32,
            HAS_PROJ_CLIP=self.projection and o.proj_clip is not None,
        )

    def grid(self, kind: str, device: torch.device) -> Grid:
        return self.fitted(kind, choose_grid(kind, self.batch, self.hidden, self.directions, self.dtype, device))

    def fitted(self, kind: str, grid: Grid) -> Grid:
        """``grid`` for this call: with a projection the forward's recurrent product reduces over
        ``P <= H``, so its whole reduction may fit in one chunk."""
        if kind == "forward" and self.projection:
            grid = dataclasses.replace(grid, k_chunk=min(grid.k_chunk, hidden_pad(self.h_size)))
        return grid


def ln_slots(hidden: int) -> int:
    """Slots per row of the layer-norm exchange: one per program of a group, for every grid (the
    launcher may switch grids; ``HB >= 4``)."""
    return max(2, pow2(triton.cdiv(hidden, 4)))


def zoneout_modes(call: LayerCall, masks) -> tuple[int, int]:
    """The kernels' zoneout modes for h and c: off, Bernoulli masks (training) or expectation (eval)."""
    o = call.options

    def mode(present: bool, probability: float) -> int:
        if call.training:
            return ZONEOUT_MASK if present else ZONEOUT_OFF
        return ZONEOUT_CONSTANT if probability > 0 else ZONEOUT_OFF

    return mode(masks[0].zoneout_h is not None, o.zoneout_h), mode(masks[0].zoneout_c is not None, o.zoneout_c)


def call_of(layer_call: LayerCall, inputs: LayerInputs) -> Call:
    """The kernels' view of one layer call."""
    weights, masks, layout, h0 = inputs.weights, inputs.masks, inputs.layout, inputs.h0
    dtype, acc = h0.dtype, accumulation_dtype(h0.dtype)
    device = h0.device
    varlen = not layout.full

    def padded(rows: Tensor | None) -> Tensor | None:  # zoneout masks: rows -> [T, B, .], sorted slots
        return None if rows is None else layout.padded(rows, sorted_slots=True)

    zoneout_h, zoneout_c = zoneout_modes(layer_call, masks)
    return Call(
        steps=layout.steps, batch=layout.batch, hidden=weights[0].weight_hh.shape[0] // 4, directions=len(weights),
        dtype=dtype, acc=acc, h_size=h0.shape[2], options=layer_call.options, varlen=varlen,
        lengths=layout.lengths().to(device) if varlen else None,
        offsets=layout.offsets().to(device) if varlen else None,
        batch_sizes=layout.batch_sizes if varlen else None,
        w_hh=_stacked([w.weight_hh for w in weights], dtype),
        bias=None if weights[0].bias_ih is None else _stacked([w.bias_ih + w.bias_hh for w in weights], acc),
        peephole=_stacked([w.weight_peephole for w in weights], acc),
        rec_mask=_stacked([m.recurrent for m in masks], acc),
        zh_mask=_stacked([padded(m.zoneout_h) for m in masks], acc),
        zc_mask=_stacked([padded(m.zoneout_c) for m in masks], acc),
        zoneout_h=zoneout_h, zoneout_c=zoneout_c,
        ln_hh=_stacked([w.layer_norm_hh_weight for w in weights], acc),
        ln_cell_w=_stacked([w.layer_norm_cell_weight for w in weights], acc),
        ln_cell_b=_stacked([w.layer_norm_cell_bias for w in weights], acc),
        w_hr=_stacked([w.weight_hr for w in weights], dtype),
        device=device,
    )


# -- what the forward keeps ---------------------------------------------------------------------------


def _saved_shapes(layer_call: LayerCall, inputs: LayerInputs) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The per-row buffers the backward reads, by name, in order (only those the call has)."""
    o, h0, w = layer_call.options, inputs.h0, inputs.weights[0]
    N, D, P = inputs.x.shape[0], len(inputs.weights), h0.shape[2]
    H = w.weight_hh.shape[0] // 4
    G, dtype, acc = 4 * H, h0.dtype, accumulation_dtype(h0.dtype)
    proj = w.weight_hr is not None
    present = {
        "gates": ((N, D * G), dtype, True),
        "c_fresh": ((N, D * H), acc, True),
        "c_carried": ((N, D * H), acc, zoneout_modes(layer_call, inputs.masks)[1] != ZONEOUT_OFF),
        "clip": ((N, D * G), torch.int8, o.clip is not None),
        "cell_clip": ((N, D * H), torch.int8, o.cell_clip is not None),
        "hh_hat": ((N, D * G), acc, o.layer_norm),
        "ln_rows": ((N, D * 3), acc, o.layer_norm),
        "m": ((N, D * H), dtype, proj),
        "proj_clip": ((N, D * P), torch.int8, proj and o.proj_clip is not None),
    }
    return {name: (shape, kind) for name, (shape, kind, there) in present.items() if there}


def allocate(layer_call: LayerCall, inputs: LayerInputs) -> list[Tensor]:
    if not layer_call.save:
        return []
    return [empty(inputs.h0, *shape, dtype=dtype) for shape, dtype in _saved_shapes(layer_call, inputs).values()]


def _named(layer_call: LayerCall, inputs: LayerInputs, saved: Sequence[Tensor]) -> dict[str, Tensor | None]:
    names = list(_saved_shapes(layer_call, inputs)) if saved else []
    named = dict(zip(names, saved))
    return {name: named.get(name) for name in ("gates", "c_fresh", "c_carried", "clip", "cell_clip", "hh_hat",
                                               "ln_rows", "m", "proj_clip")}


def _ln_stats(call: Call, like: Tensor) -> Tensor:
    """Where the programs of a group exchange their layer-norm moments: ``[2, D, B, LN_SLOTS, 2]``."""
    if not call.layer_norm:
        return like.new_empty(1, dtype=call.acc)
    return like.new_zeros(2, call.directions, call.batch, ln_slots(call.hidden), 2, dtype=call.acc)


# -- forward ----------------------------------------------------------------------------------------


def forward(layer_call: LayerCall, inputs: LayerInputs, saved: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``xg [N, D*4H]`` (input gates), ``h0``, ``c0`` -> ``y [N, D*P]``, ``h_n``, ``c_n``."""
    call, h0 = call_of(layer_call, inputs), inputs.h0
    D, B, P, N = call.directions, call.batch, call.h_size, inputs.x.shape[0]
    keep = _named(layer_call, inputs, saved)
    h_buf = empty(h0, 2, D, B, P)
    h_buf.copy_(h0.unsqueeze(0).expand(2, D, B, P))  # a direction that skips its first steps starts in either slot
    c_state = inputs.c0.to(call.acc).contiguous().clone()
    y = empty(h0, N, D * P)
    grid = call.grid("forward", h0.device)
    counters = torch.zeros(D, triton.cdiv(B, grid.bb), dtype=torch.int32, device=h0.device)
    error = torch.zeros(1, dtype=torch.int32, device=h0.device)
    dummy, o = h0.new_empty(1, dtype=call.acc), call.options
    values = dict(
        xg=inputs.x.contiguous(), bias=_or_dummy(call.bias, dummy), w_hh=call.w_hh,
        peephole=_or_dummy(call.peephole, dummy), lengths=_or_dummy(call.lengths, counters),
        offsets=_or_dummy(call.offsets, counters), rec_mask=_or_dummy(call.rec_mask, dummy),
        zh_mask=_or_dummy(call.zh_mask, dummy), zc_mask=_or_dummy(call.zc_mask, dummy), h_buf=h_buf,
        c_state=c_state, y=y, gates_out=_or_dummy(keep["gates"], y), c_fresh_out=_or_dummy(keep["c_fresh"], dummy),
        c_carried_out=_or_dummy(keep["c_carried"], dummy), clip_out=_or_dummy(keep["clip"], error),
        cell_clip_out=_or_dummy(keep["cell_clip"], error), ln_hh=_or_dummy(call.ln_hh, dummy),
        ln_cell_w=_or_dummy(call.ln_cell_w, dummy), ln_cell_b=_or_dummy(call.ln_cell_b, dummy),
        ln_stats=_ln_stats(call, h0), hh_hat_out=_or_dummy(keep["hh_hat"], dummy),
        ln_rows_out=_or_dummy(keep["ln_rows"], dummy), w_hr=_or_dummy(call.w_hr, y),
        m_buf=h0.new_empty(D, B, call.hidden) if call.projection else y, m_out=_or_dummy(keep["m"], y),
        proj_clip_out=_or_dummy(keep["proj_clip"], error), counters=counters, error=error, T=call.steps, B=B,
        clip=o.clip or 0.0, cell_clip=o.cell_clip or 0.0, z_h=o.zoneout_h, z_c=o.zoneout_c, ln_eps=LAYER_NORM_EPS,
        proj_clip=o.proj_clip or 0.0,
        HAS_BIAS=call.bias is not None, NEEDS_H_PREV=call.zoneout_h != ZONEOUT_OFF or call.varlen,
        SAVE=layer_call.save,
    )
    launch(forward_kernel, FORWARD, call, grid, values, error, backward=False)
    return y, _final_h(h_buf, call, grid.bb), c_state.to(inputs.c0.dtype)


def _final_h(h_buf: Tensor, call: Call, bb: int) -> Tensor:
    """``h_n [D, B, P]`` from the ping-pong buffer ``[2, D, B, P]``: step ``s`` writes slot
    ``(s + 1) % 2``, so a block that ran its last step ``hi - 1`` left ``h`` in slot ``hi % 2`` (``hi`` is
    ``T`` except for the forward direction of a block whose sequences all end early)."""
    T, B, D = call.steps, call.batch, call.directions
    if not call.varlen:
        return h_buf[T % 2].clone()
    padded = torch.zeros(triton.cdiv(B, bb) * bb, dtype=torch.int64, device=h_buf.device)
    padded[:B] = call.lengths
    longest = padded.view(-1, bb).amax(1).repeat_interleave(bb)[:B]  # [B]: the max length of each row's block
    slots = torch.stack([longest % 2, torch.full_like(longest, T % 2)][:D])  # [D, B]
    return h_buf.gather(0, slots[None, :, :, None].expand(1, D, B, h_buf.shape[-1]))[0]


# -- backward ---------------------------------------------------------------------------------------


def _previous_states(y: Tensor, h0: Tensor, call: Call) -> Tensor:
    """``h_{t-1}`` as each row's step saw it, ``[N, D, P]``, rebuilt from ``y [N, D*P]`` and ``h0``.
    Row ``(t, b)``'s forward direction saw row ``(t - 1, b)`` (or ``h_0``), its reverse direction row
    ``(t + 1, b)`` if sequence ``b`` reaches step ``t + 1`` (else ``h_0``)."""
    N, D, P = y.shape[0], h0.shape[0], h0.shape[2]
    if not call.varlen:
        T, B = call.steps, call.batch
        y4 = y.view(T, B, D, P)
        h_prev = torch.empty_like(y4)
        h_prev[0, :, 0] = h0[0]
        h_prev[1:, :, 0] = y4[:-1, :, 0]
        if D == 2:
            h_prev[T - 1, :, 1] = h0[1]
            h_prev[: T - 1, :, 1] = y4[1:, :, 1]
        return h_prev.view(N, D, P)
    batch_sizes, T = call.batch_sizes, call.steps
    first = torch.cumsum(batch_sizes, 0) - batch_sizes
    step = torch.repeat_interleave(torch.arange(T), batch_sizes)
    slot = torch.arange(N) - first[step]
    initial = N + slot  # row of h_0 in cat([y_d, h_0[d]])
    sources = [torch.where(step > 0, first[(step - 1).clamp(min=0)] + slot, initial)]
    if D == 2:
        nxt = (step + 1).clamp(max=T - 1)
        has_next = (step + 1 < T) & (slot < batch_sizes[nxt])
        sources.append(torch.where(has_next, first[nxt] + slot, initial))
    y3 = y.view(N, D, P)
    return torch.stack([torch.cat([y3[:, d], h0[d].to(y.dtype)]).index_select(0, src.to(y.device))
                        for d, src in enumerate(sources)], 1)


def backward(layer_call: LayerCall, inputs: LayerInputs, y: Tensor, saved: list[Tensor], dy: Tensor | None,
             dh_n: Tensor | None, dc_n: Tensor | None, *, needs_x: bool) -> LayerGrads:
    """BPTT in the kernel, then the weight products: the gradients of the input gates, ``h0``, ``c0``
    and every recurrent weight (``weight_hh`` as the kernels read it: DropConnect applied)."""
    call, h0, c0 = call_of(layer_call, inputs), inputs.h0, inputs.c0
    B, H, D, dtype, acc = call.batch, call.hidden, call.directions, call.dtype, call.acc
    G, P, N = 4 * H, call.h_size, y.shape[0]
    keep = _named(layer_call, inputs, saved)
    dh_state = torch.zeros_like(h0, dtype=acc) if dh_n is None else dh_n.to(acc).contiguous().clone()
    dc_state = torch.zeros_like(c0, dtype=acc) if dc_n is None else dc_n.to(acc).contiguous().clone()
    dy = h0.new_zeros(N, D * P) if dy is None else dy.to(dtype).contiguous()
    dgates = empty(h0, N, D * G)
    da = empty(h0, N, D * G, dtype=acc) if call.layer_norm else None  # d a_t, the input gates' gradient
    grid = call.grid("backward", h0.device)
    blocks = triton.cdiv(B, grid.bb)
    dpeep = torch.zeros(blocks, D, 3 * H, dtype=acc, device=h0.device)
    dln = torch.zeros(blocks, D, 6 * H, dtype=acc, device=h0.device) if call.layer_norm else None
    d_proj = empty(h0, N, D * P) if call.projection else None  # d loss / d (m_t W_hr^T)
    counters = torch.zeros(D, blocks, dtype=torch.int32, device=h0.device)
    error = torch.zeros(1, dtype=torch.int32, device=h0.device)
    dummy = h0.new_empty(1, dtype=acc)
    values = dict(
        dy=dy, dh_state=dh_state, dc_state=dc_state, w_hh=call.w_hh, peephole=_or_dummy(call.peephole, dummy),
        lengths=_or_dummy(call.lengths, counters), offsets=_or_dummy(call.offsets, counters),
        rec_mask=_or_dummy(call.rec_mask, dummy), zh_mask=_or_dummy(call.zh_mask, dummy),
        zc_mask=_or_dummy(call.zc_mask, dummy), gates=keep["gates"], c_fresh=keep["c_fresh"],
        c_carried=_or_dummy(keep["c_carried"], dummy), c0=c0.to(acc).contiguous(),
        clip_in=_or_dummy(keep["clip"], error), cell_clip_in=_or_dummy(keep["cell_clip"], error),
        ln_hh=_or_dummy(call.ln_hh, dummy), ln_cell_w=_or_dummy(call.ln_cell_w, dummy),
        ln_cell_b=_or_dummy(call.ln_cell_b, dummy), hh_hat=_or_dummy(keep["hh_hat"], dummy),
        ln_rows=_or_dummy(keep["ln_rows"], dummy), ln_stats=_ln_stats(call, h0), da_out=_or_dummy(da, dummy),
        dln=_or_dummy(dln, dummy), dgates=dgates, dpeep=dpeep, w_hr=_or_dummy(call.w_hr, dgates),
        proj_clip_in=_or_dummy(keep["proj_clip"], error), dhp_out=_or_dummy(d_proj, dgates), counters=counters,
        error=error, T=call.steps, B=B, z_h=call.options.zoneout_h, z_c=call.options.zoneout_c,
    )
    launch(backward_kernel, BACKWARD, call, grid, values, error, backward=True)

    # h_{t-1} as each row's step saw it, the recurrent-dropout mask applied: [N, D, P]
    h_in = _previous_states(y, h0, call)
    if call.rec_mask is not None:  # each row's sequence's
        rec = call.rec_mask.transpose(0, 1)  # [B, D, P]
        if call.varlen:
            first = torch.cumsum(call.batch_sizes, 0) - call.batch_sizes
            rec = rec[(torch.arange(N) - torch.repeat_interleave(first, call.batch_sizes)).to(h0.device)]
            h_in = (h_in * rec).to(dtype)
        else:
            h_in = (h_in.view(call.steps, B, D, P) * rec).to(dtype).view(N, D, P)
    per_direction = dgates.view(N, D, G).transpose(0, 1)  # [D, N, 4H]
    d_w_hh = torch.bmm(per_direction.transpose(1, 2), h_in.transpose(0, 1))  # [D, 4H, P]
    d_w_hr = None
    if call.projection:  # d W_hr = sum over rows of d(m_t W_hr^T)^T m_t, per direction: [D, P, H]
        d_w_hr = torch.bmm(d_proj.view(N, D, P).permute(1, 2, 0), keep["m"].view(N, D, H).transpose(0, 1))
    d_gates = da if call.layer_norm else dgates  # d a_t: the gradient of the input gates
    d_bias = d_gates.view(N, D, G).sum(0, dtype=acc)
    d_ln = dln.sum(0) if call.layer_norm else None
    d_peep = dpeep.sum(0)
    grads = []
    for d, w in enumerate(inputs.weights):
        field = {
            "weight_hh": d_w_hh[d], "bias_ih": d_bias[d], "bias_hh": d_bias[d],
            "weight_hr": None if d_w_hr is None else d_w_hr[d], "weight_peephole": d_peep[d],
            "layer_norm_hh_weight": None if d_ln is None else d_ln[d, :G],
            "layer_norm_cell_weight": None if d_ln is None else d_ln[d, G : G + H],
            "layer_norm_cell_bias": None if d_ln is None else d_ln[d, G + H :],
        }
        grads.append(DirectionWeights(*(None if t is None else field[f].to(t.dtype)
                                        for f, t in zip(DirectionWeights._fields, w))))
    return LayerGrads(d_gates if needs_x else None, dh_state.to(dtype), dc_state.to(c0.dtype), grads)
