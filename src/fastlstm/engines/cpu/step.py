"""A single step on the CPU (``LSTMCell``, streaming calls): the engine's ``fused_input`` form.

Where Python overhead is most of the cost, one step is one C++ call (the input product, the step,
the states) with few allocations, from a plan template cached per configuration (only pointers
change between calls); its backward is one more C++ call on the same plan (the step's BPTT, then
``dx``, ``dW_ih``, ``dW_hh`` and the bias sum as outer-product updates over the step's few rows).
For one direction without projection or layer norm (:func:`takes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...masks import MASK_FIELDS, DirectionMasks
from ...options import LSTMOptions
from ...packing import Layout
from ...weights import DirectionWeights
from ..contract import LayerCall, LayerGrads, LayerInputs
from . import kernels
from .arena import Arena, arena_layout
from .layer import _FLOAT_BUFFERS, _MASK_BUFFERS, Direction, carries_cell


def takes(layout: Layout, weights: list[DirectionWeights], options: LSTMOptions) -> bool:
    """Whether a call is one step of this form: T = 1 without lengths, one direction, no projection,
    no layer norm."""
    return bool(_one_step(layout.steps) and layout.full and len(weights) == 1 and weights[0].weight_hr is None
                and not options.layer_norm)


def _one_step(steps) -> bool:
    """``steps == 1`` as a plain bool. Under torch.compile with dynamic shapes ``T`` is symbolic
    (T = 1 is specialised to a constant there): a symbolic ``T`` takes the layer's form, with no guard
    on its value (the comparison would be a symbolic bool, which the op's constant argument refuses)."""
    if not torch.compiler.is_compiling():
        return steps == 1
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # (imports sympy: compiling has)

    return statically_known_true(steps == 1)


@dataclass
class _Template:
    """What every step of one configuration shares: the plan's constant fields, the layout it points
    into (held: the plan points at its tensors), where each arena's buffers lie, and which plan
    fields point where: ``(arena, field, byte offset)``."""

    plan: object
    layout: Layout
    kept: tuple[dict[str, int | None], int]  # what the backward reads (with autograd)
    scratch: tuple[dict[str, int | None], int]  # the input and recurrent products, gone when the step returns
    pointers: tuple[tuple[int, str, int], ...]
    work: tuple[dict[str, int | None], int]  # the backward's: state gradients, dgates, scratch, peephole sums
    call: LayerCall  # (held: its identity keys the template)


_TEMPLATES: dict[tuple, _Template] = {}


def _keeps_h_in(call: LayerCall) -> bool:
    """Whether the recurrent product's input differs from ``h0`` (a recurrent-dropout mask scales it),
    so the backward reads a kept copy; otherwise it reads ``h0``, which the contract saves anyway."""
    return dict(zip(MASK_FIELDS, call.masks))["recurrent"]


def _kept_sizes(call: LayerCall, batch: int, hidden: int, carried: bool, item: int) -> dict[str, int]:
    o, G = call.options, 4 * hidden
    return {
        "gates": batch * G, "c_fresh": batch * hidden, "h_in": batch * hidden if _keeps_h_in(call) else 0,
        "c_carried": batch * hidden if carried and call.save else 0,
        "clip_mask": -(-batch * G // item) if o.clip is not None else 0,  # uint8 masks, in elements
        "cclip_mask": -(-batch * hidden // item) if o.cell_clip is not None else 0,
    }


def _template(call: LayerCall, inputs: LayerInputs) -> _Template:
    dtype, batch = inputs.h0.dtype, inputs.x.shape[0]
    hidden = inputs.weights[0].weight_hh.shape[0] // 4
    # keyed by the call's identity where it can be (contract.run_step's calls are made once per
    # configuration and live as long as it caches them), else by the call: hashing the options is
    # a tenth of a step's Python (the call says which masks are given, so it fixes everything else)
    template = _TEMPLATES.get((id(call), dtype, batch, hidden))
    if template is not None and template.call is call:
        return template
    key = (call, dtype, batch, hidden)
    template = _TEMPLATES.get(key)
    if template is not None:
        return template
    carried = carries_cell(call, inputs.masks[0])
    layout = Layout.of_full(1, batch, torch.device("cpu"))
    layout.offsets()
    direction = Direction(call, inputs._replace(layout=layout, h0=inputs.h0.reshape(1, batch, hidden),
                                                c0=inputs.c0.reshape(1, batch, hidden)), 0)
    empty = Arena(torch.empty(1, dtype=dtype), {name: None for name in _FLOAT_BUFFERS + _MASK_BUFFERS})
    plan = direction.plan(empty, empty, save=call.save)
    plan.w_hh = plan.w_hr = plan.peep = plan.rec_mask = plan.zh_mask = plan.zc_mask = plan.c0 = None
    plan.column_threads = 1  # a step runs on the caller's thread
    G = 4 * hidden
    plan.ld_xg, plan.ld_hw, plan.ld_y, plan.ld_dy = G, G, hidden, hidden
    item = torch.empty((), dtype=dtype).element_size()
    kept = arena_layout(_kept_sizes(call, batch, hidden, carried, item))
    scratch = arena_layout({"xg": batch * G, "hw": batch * G, "h_in": 0 if _keeps_h_in(call) else batch * hidden})
    pointers = tuple((k, name, offset * item) for k, (offsets, _) in enumerate((kept, scratch))
                     for name, offset in offsets.items() if offset is not None)
    work = arena_layout({"dgates": batch * G, "dm": batch * hidden, "dh_in": batch * hidden, "work": 2 * hidden})
    template = _TEMPLATES.setdefault(key, _Template(plan, layout, kept, scratch, pointers, work, call))
    _TEMPLATES[(id(call), dtype, batch, hidden)] = template
    return template


def allocate(call: LayerCall, inputs: LayerInputs) -> list[Tensor]:
    if not call.save:
        return []
    batch, hidden = inputs.x.shape[0], inputs.weights[0].weight_hh.shape[0] // 4
    symbolic = not (isinstance(batch, int) and isinstance(hidden, int))  # (fake tensors' SymInts: no hash)
    template = None if symbolic else _TEMPLATES.get((id(call), inputs.h0.dtype, batch, hidden))
    if template is not None and template.call is call:  # (a step's forward already ran on this call)
        total = template.kept[1]
    else:  # (fake tensors too: no plan is built for them)
        item = torch.empty((), dtype=inputs.h0.dtype).element_size()
        sizes = _kept_sizes(call, batch, hidden, carries_cell(call, inputs.masks[0]), item)
        total = arena_layout(sizes)[1]
    # the step writes every element but the last bytes of an element where a uint8 clip mask ends:
    # zeroed then (what the custom op returns must not depend on leftover memory)
    o = call.options
    return [inputs.h0.new_zeros(total) if o.clip is not None or o.cell_clip is not None
            else inputs.h0.new_empty(total)]


def _plan(template: _Template, kept: int, scratch: int | None, w: DirectionWeights, masks: DirectionMasks,
          c0: Tensor, keep: list):
    """The template's plan pointed at this step's buffers (base addresses ``kept`` and ``scratch``)
    and tensors (those copied to be dense are appended to ``keep``, which must outlive the C++ call)."""
    p = kernels.copy_plan(template.plan)
    for k, name, offset in template.pointers:
        if k == 0:
            setattr(p, name, kept + offset)
        elif scratch is not None:
            setattr(p, name, scratch + offset)
    w_hh, c0 = w.weight_hh.contiguous(), c0.contiguous()
    keep += (w_hh, c0)
    p.w_hh, p.c0 = w_hh.data_ptr(), c0.data_ptr()
    for field, t in (("peep", w.weight_peephole), ("rec_mask", masks.recurrent), ("zh_mask", masks.zoneout_h),
                     ("zc_mask", masks.zoneout_c)):
        if t is not None:
            t = t.contiguous()
            keep.append(t)
            setattr(p, field, t.data_ptr())
    return p


def forward(call: LayerCall, inputs: LayerInputs, saved: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``x [B, I]`` (the input rows), ``h0``/``c0 [1, B, H]`` or ``[B, H]`` -> ``(y [B, H], h_n, c_n)``
    (the states shaped as they came)."""
    template = _template(call, inputs)
    w, x = inputs.weights[0], inputs.x.contiguous()
    batch, hidden = x.shape[0], w.weight_hh.shape[0] // 4
    kept_total, scratch_total = template.kept[1], template.scratch[1]
    if call.save:
        kept = saved[0].data_ptr()
        scratch_tensor = torch.empty(scratch_total, dtype=x.dtype)
        scratch = scratch_tensor.data_ptr()
    else:  # one allocation for both
        scratch_tensor = torch.empty(kept_total + scratch_total, dtype=x.dtype)
        kept = scratch_tensor.data_ptr()
        scratch = kept + kept_total * scratch_tensor.element_size()
    keep: list = [scratch_tensor]
    p = _plan(template, kept, scratch, w, inputs.masks[0], inputs.c0, keep)
    # (sizes as ints: a torch.Size takes torch's slow argument parsing, a fifth of a step's cost)
    states = (batch, hidden) if inputs.h0.dim() == 2 else (1, batch, hidden)
    y, h_n, c_n = x.new_empty(batch, hidden), x.new_empty(*states), x.new_empty(*states)
    p.y, p.h_state, p.c_state = y.data_ptr(), h_n.data_ptr(), c_n.data_ptr()
    h0, w_ih = inputs.h0.contiguous(), w.weight_ih.contiguous()
    b_ih = b_hh = 0  # 0: no bias
    if w.bias_ih is not None:
        b_ih, b_hh = w.bias_ih.contiguous(), w.bias_hh.contiguous()
        keep += (b_ih, b_hh)
        b_ih, b_hh = b_ih.data_ptr(), b_hh.data_ptr()
    kernels.module().single_step(kernels.address(p), x.data_ptr(), x.shape[1], w_ih.data_ptr(), b_ih, b_hh,
                                 h0.data_ptr(), p.c0 or 0)
    return y, h_n, c_n


def backward(call: LayerCall, inputs: LayerInputs, y: Tensor | None, saved: list[Tensor], dy: Tensor, dh_n: Tensor,
             dc_n: Tensor, *, needs_x: bool) -> LayerGrads:
    """The step's gradients from ``dy [B, H]`` and ``dh_n``/``dc_n [1, B, H]``: one C++ call on the
    plan, the step's BPTT and then ``dx = da W_ih``, ``dW_ih = da^T x``, ``dW_hh = da^T h_0`` and the
    bias sum, ``da [B, 4H]`` the pre-activations' gradient."""
    w, x = inputs.weights[0], inputs.x.contiguous()
    B, I, H = x.shape[0], x.shape[1], w.weight_hh.shape[0] // 4
    G, has_bias, peephole = 4 * H, w.bias_ih is not None, w.weight_peephole is not None
    if B == 0:  # no rows: nothing flows (and no buffer to hand the C++ loops)
        zeros = x.new_zeros
        d_bias = zeros(G) if has_bias else None
        return LayerGrads(x.new_empty(0, I) if needs_x else None, zeros(inputs.h0.shape), zeros(inputs.c0.shape),
                          [DirectionWeights(zeros(G, I), zeros(G, H), d_bias, d_bias, None,
                                            zeros(3 * H) if peephole else None)])
    kept = saved[0].contiguous()
    keep: list = [kept]
    template = _template(call, inputs)
    p = _plan(template, kept.data_ptr(), None, w, inputs.masks[0], inputs.c0, keep)
    if template.kept[0]["h_in"] is None:  # (dW_hh's operand is h0 itself: _keeps_h_in)
        h0 = inputs.h0.contiguous()
        keep.append(h0)
        p.h_in = h0.data_ptr()
    # the gradients handed back are allocations of their own (as views of the scratch they would keep
    # all of it, dgates included, alive while a caller holds h0.grad); the zeroed scratch ends here
    offsets, total = template.work
    work = Arena(torch.zeros(total, dtype=x.dtype), offsets)
    dh_state = x.new_zeros(inputs.h0.shape) if dh_n is None else x.new_empty(inputs.h0.shape).copy_(dh_n)
    dc_state = x.new_zeros(inputs.c0.shape) if dc_n is None else x.new_empty(inputs.c0.shape).copy_(dc_n)
    d_peep = x.new_zeros(3 * H) if peephole else None
    if dy is None:  # (no output gradient: one row of zeros that every row reads)
        dy, p.ld_dy = x.new_zeros(H), 0
    else:
        dy = dy.contiguous()
    keep.append(dy)
    p.dy = dy.data_ptr()
    p.dh_state, p.dc_state = dh_state.data_ptr(), dc_state.data_ptr()
    p.dgates = p.dhw = work.ptr("dgates")
    p.ld_dgates = p.ld_dhw = G
    p.dproj, p.dm, p.dh_in = None, work.ptr("dm"), work.ptr("dh_in")
    p.w_hh_packed_t, p.w_hr_packed_t = None, None
    p.work, p.dpeep = work.ptr("work"), kernels.pointer(d_peep)
    w_ih = w.weight_ih.contiguous()
    d_x = x.new_empty(B, I) if needs_x else None
    d_w_ih, d_w_hh = x.new_empty(G, I), x.new_empty(G, H)
    d_bias = x.new_empty(G) if has_bias else None
    kernels.module().step_backward(kernels.address(p), x.data_ptr(), I, w_ih.data_ptr(), kernels.pointer(d_x) or 0,
                                   d_w_ih.data_ptr(), d_w_hh.data_ptr(), kernels.pointer(d_bias) or 0)
    return LayerGrads(d_x, dh_state, dc_state, [DirectionWeights(d_w_ih, d_w_hh, d_bias, d_bias, None, d_peep)])
