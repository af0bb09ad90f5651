"""The CPU engine: a compiled time loop and a hand-written backward (BPTT), float32 and float64;
bfloat16 and float16 calls computed in float32 (see :func:`widened`).

The engine contract (:mod:`fastlstm.engines.contract`) for two forms of a call:

* a layer (:mod:`.layer`): the input gates come from the input projection outside (one GEMM for
  every step and direction, oneDNN's or torch's by the rule of :mod:`.gemm`, which the shell asks
  for through :func:`linear`); per direction and step one recurrent GEMM of the kernels' own and one
  fused, vectorised pointwise update, threads splitting rows or columns by fixed rules
  (:mod:`.threads`);
* a single step (:mod:`.step`): the input product fused in, one C++ call each way.

The kernels (``kernels.cpp``, ``kernels.h``: plain C++ and the CPython API) are built at install and
imported on first use (:mod:`.kernels`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ...masks import MASK_FIELDS, DirectionMasks
from ...options import LSTMOptions
from ...packing import Layout
from ...weights import DirectionWeights
from ..contract import LayerCall, LayerGrads, LayerInputs
from . import layer, step, stream
from .gemm import linear

name = "cpu"

__all__ = ["name", "fuses_input", "reads", "linear", "allocate", "forward", "backward"]


def fuses_input(layout: Layout, weights: list[DirectionWeights], options: LSTMOptions) -> bool:
    """A single step takes its input rows and ``weight_ih`` (its projection costs as much as a call)."""
    return step.takes(layout, weights, options)


def reads(call: LayerCall) -> tuple[bool, bool]:
    """The backward reads the input (a step's, for ``dx`` and ``dW_ih``), never the output."""
    return call.fused_input, False


HALF = (torch.bfloat16, torch.float16)
"""The dtypes computed in float32: the house rule (fp32 accumulation, the cell state fp32) taken
whole. A call's states and weights are widened once (one pass each, against ``T`` steps of work),
the time loop and the BPTT run in float32, and outputs and gradients come back in their tensors'
dtypes. A layer (:mod:`.layer`) reads its input gates ``[N, D*4H]`` and its output's gradient in the
half precision, writes its output in it, and keeps its saved gate activations in it (the kernels
convert row by row); a single step widens its inputs, and its arena is float32."""


def _wide(t: Tensor | None) -> Tensor | None:
    return t.float() if t is not None and t.dtype in HALF else t


def widened(inputs: LayerInputs, *, layer: bool = False) -> LayerInputs:
    """``inputs`` with every bfloat16 / float16 tensor as float32 (the others as they are); for a
    ``layer``'s call the input gates ``x`` (which its kernels widen row by row), ``weight_ih`` (the
    input projection's, outside the engine; the layer never reads it) and ``weight_hh`` (the layer
    widens it where its kernels read float32, and packs bfloat16 products from it as it is) stay as
    they are."""
    # (this runs on every call, a single step's included: a tensor that is not half precision is not copied, and a
    # mask set without one is kept as it is; the weights' tuples are rebuilt by position, which costs next to nothing)
    return inputs._replace(
        x=inputs.x if layer else _wide(inputs.x), h0=_wide(inputs.h0), c0=_wide(inputs.c0),
        weights=[DirectionWeights(*(w[:2] if layer else map(_wide, w[:2])), *map(_wide, w[2:]))
                 for w in inputs.weights],
        masks=[_wide_masks(m) for m in inputs.masks])


def _wide_masks(masks: DirectionMasks) -> DirectionMasks:
    half = {f: t.float() for f in MASK_FIELDS if (t := getattr(masks, f)) is not None and t.dtype in HALF}
    return dataclasses.replace(masks, **half) if half else masks


def _narrowed(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    return t if t is None or like is None or t.dtype == like.dtype else t.to(like.dtype)


def _half(inputs: LayerInputs) -> dict:
    """The keywords of a layer's call for its dtype (a single step takes none)."""
    return {"half": inputs.h0.dtype if inputs.h0.dtype in HALF else None}


def allocate(call: LayerCall, inputs: LayerInputs) -> list[Tensor]:
    # (the arenas' sizes read shapes and h0's dtype only: widening the gates and weights here would
    # copy them for nothing, before the forward widens them)
    wide = inputs._replace(h0=_wide(inputs.h0))
    return step.allocate(call, wide) if call.fused_input else layer.allocate(call, wide, **_half(inputs))


def forward(call: LayerCall, inputs: LayerInputs, saved: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    if call.fused_input:
        y, h_n, c_n = step.forward(call, widened(inputs), saved)
    else:
        y, h_n, c_n = layer.forward(call, widened(inputs, layer=True), saved, **_half(inputs))
    return _narrowed(y, inputs.h0), _narrowed(h_n, inputs.h0), _narrowed(c_n, inputs.c0)


def backward(call: LayerCall, inputs: LayerInputs, y: Tensor | None, saved: list[Tensor], dy: Tensor | None,
             dh_n: Tensor | None, dc_n: Tensor | None, *, needs_x: bool) -> LayerGrads:
    if call.fused_input:
        grads = step.backward(call, widened(inputs), _wide(y), saved, _wide(dy), _wide(dh_n), _wide(dc_n),
                              needs_x=needs_x)
    else:  # (dy stays in the half precision: the kernels widen it row by row)
        grads = layer.backward(call, widened(inputs, layer=True), _wide(y), saved, dy, _wide(dh_n), _wide(dc_n),
                               needs_x=needs_x, **_half(inputs))
    return LayerGrads(_narrowed(grads.x, inputs.x), _narrowed(grads.h0, inputs.h0), _narrowed(grads.c0, inputs.c0),
                      [DirectionWeights(*(_narrowed(g, t) for g, t in zip(gw, w)))
                       for gw, w in zip(grads.weights, inputs.weights)])
