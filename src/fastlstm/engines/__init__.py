"""The engines that compute an LSTM layer, and how ``backend=`` picks one.

An engine is a function with the signature of :func:`fastlstm.reference.lstm_layer`::

    layer(x [T, B, I], lengths [B] | None, h0 [D, B, H_out], c0 [D, B, H],
          weights: per-direction DirectionWeights, options, masks: per-direction DirectionMasks | None,
          *, training) -> (y [T, B, D * H_out], h_n [D, B, H_out], c_n [D, B, H])

plus a predicate saying which inputs it supports. ``"reference"`` supports everything and is the
fallback of ``"auto"``; faster engines register in front of it, and may also offer a single-step
entry point and one that takes a PackedSequence's rows without padding them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import reference
from ..options import LSTMOptions
from . import cpu, ops, triton_lstm

LayerFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Engine:
    name: str
    layer: LayerFn
    supports: Callable[[torch.device, torch.dtype, LSTMOptions], bool]
    # Optional single-step entry point (x [B, I], h0, c0 [B, H], weights, options, masks, *, training)
    # -> (h_1, c_1); without one, a step is the layer with T = 1.
    cell: Callable | None = None
    # Optional packed entry point (data [N, I], batch_sizes, sorted_indices, h0, c0, weights, options,
    # masks, *, training) -> (y [N, D * H_out], h_n, c_n): a PackedSequence's rows as they are;
    # without one, packed input is padded for `layer`.
    packed_layer: Callable | None = None
    # For torch.compile (engines/ops.py): the layer's forward and backward as plain functions,
    # (x, lengths, h0, c0, weights, options, masks, *, training, cotangents) -> [dx, dh0, dc0, then
    # each direction's DirectionWeights fields' gradients (None where absent)]; and which layers
    # the engine computes itself rather than handing to the reference.
    gradients: Callable | None = None
    covers: Callable[[Sequence, LSTMOptions], bool] | None = None


def _always(device: torch.device, dtype: torch.dtype, options: LSTMOptions) -> bool:
    return True


# Priority order for "auto": the first engine that supports the call computes it.
ENGINES: dict[str, Engine] = {
    "cpu": Engine("cpu", cpu.lstm_layer, cpu.supports, cpu.lstm_cell, cpu.lstm_layer_packed,
                  gradients=cpu.layer_gradients),
    "triton": Engine("triton", triton_lstm.lstm_layer, triton_lstm.supports,
                     packed_layer=triton_lstm.lstm_layer_packed, gradients=triton_lstm.layer_gradients),
    "reference": Engine("reference", reference.lstm_layer, _always),
}

BACKENDS = ("auto", *ENGINES)


def check_backend(backend) -> str:
    """Validate a user's ``backend=`` argument."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend should be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def select_engine(backend: str, device: torch.device, dtype: torch.dtype, options: LSTMOptions) -> Engine:
    """The engine that computes a call: the named one, or for ``"auto"`` the first that supports it."""
    if backend == "auto":
        for engine in ENGINES.values():
            if engine.supports(device, dtype, options):
                return engine
        raise AssertionError("the reference engine supports every call")  # pragma: no cover
    engine = ENGINES[check_backend(backend)]
    if not engine.supports(device, dtype, options):
        raise ValueError(
            f"backend={backend!r} does not support device {device} with dtype {dtype} and these options; "
            "use backend='auto' or 'reference'"
        )
    return engine


def for_tracing(engine: Engine, weights: Sequence, options: LSTMOptions) -> Engine:
    """``engine`` itself, or under ``torch.compile`` its layer as a custom op: the compiled engines
    are opaque to dynamo, while the reference is plain torch and is traced as it is (also for the
    layers an engine hands to it)."""
    if engine.gradients is None or not ops.AVAILABLE or not ops.is_compiling():
        return engine
    if engine.covers is not None and not engine.covers(weights, options):
        return ENGINES["reference"]
    return Engine(engine.name, ops.layer_as_op(engine.name), engine.supports)
