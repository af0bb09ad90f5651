"""The CPU engine: a compiled time loop and a hand-written backward (BPTT), float32 and float64.

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

from torch import Tensor

from ...options import LSTMOptions
from ...packing import Layout
from ...weights import DirectionWeights
from ..contract import LayerCall, LayerGrads, LayerInputs
from . import layer, step
from .gemm import linear

name = "cpu"

__all__ = ["name", "fuses_input", "reads", "linear", "allocate", "forward", "backward"]


def fuses_input(layout: Layout, weights: list[DirectionWeights], options: LSTMOptions) -> bool:
    """A single step takes its input rows and ``weight_ih`` (its projection costs as much as a call)."""
    return step.takes(layout, weights, options)


def reads(call: LayerCall) -> tuple[bool, bool]:
    """The backward reads the input (a step's, for ``dx`` and ``dW_ih``), never the output."""
    return call.fused_input, False


def allocate(call: LayerCall, inputs: LayerInputs) -> list[Tensor]:
    return (step if call.fused_input else layer).allocate(call, inputs)


def forward(call: LayerCall, inputs: LayerInputs, saved: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return (step if call.fused_input else layer).forward(call, inputs, saved)


def backward(call: LayerCall, inputs: LayerInputs, y: Tensor | None, saved: list[Tensor], dy: Tensor | None,
             dh_n: Tensor | None, dc_n: Tensor | None, *, needs_x: bool) -> LayerGrads:
    return (step if call.fused_input else layer).backward(call, inputs, y, saved, dy, dh_n, dc_n, needs_x=needs_x)
