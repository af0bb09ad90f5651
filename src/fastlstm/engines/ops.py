"""The fast engines as ``torch.library`` custom ops, so that ``torch.compile`` traces a model that
contains fastlstm without graph breaks.

The reference engine is plain torch and needs nothing: dynamo traces it as it is. The compiled
engines (C++ through ctypes, Triton launches) are opaque to dynamo; under ``torch.compile`` each
layer call becomes one ``fastlstm::layer`` op, with a fake implementation that gives the output
shapes, and ``fastlstm::layer_backward`` for its gradient.

The backward op recomputes the layer's forward and runs the engine's own hand-written backward,
both as plain functions (a custom op's body runs below autograd; the engines expose
``layer_gradients`` for this): a custom op's saved state must be tensors, and the engines keep
theirs in Python objects. So a compiled training step runs each layer's forward twice (eager runs
it once).

Shape legend as in :mod:`fastlstm.reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence

import torch
from torch import Tensor

from ..masks import MASK_FIELDS, DirectionMasks
from ..options import LSTMOptions
from ..weights import DirectionWeights

_WEIGHT_FIELDS = DirectionWeights._fields
_MASK_FIELDS = MASK_FIELDS

AVAILABLE = hasattr(torch, "library") and hasattr(torch.library, "custom_op")  # torch >= 2.4


def is_compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check and check())


def _encode(options: LSTMOptions, weight_layout: tuple[bool, ...], mask_layout: tuple[bool, ...]) -> str:
    """The call's static description as one string (a custom op's non-tensor arguments are
    primitives): the options, and which DirectionWeights / DirectionMasks fields the op's tensor
    lists fill (lists of optional tensors carry no gradients)."""
    return json.dumps({"options": dataclasses.asdict(options), "weights": weight_layout, "masks": mask_layout},
                      sort_keys=True)


# Fixed per module: dynamo calls this eagerly and keeps the string as a constant.
_assume_constant = getattr(getattr(torch, "compiler", None), "assume_constant_result", lambda f: f)
encode = _assume_constant(_encode)


@functools.lru_cache(maxsize=256)
def decode(text: str) -> tuple[LSTMOptions, tuple[bool, ...], tuple[bool, ...]]:
    meta = json.loads(text)
    fields = meta["options"]
    fields["activations"] = tuple(fields["activations"])
    fields["zoneout"] = tuple(fields["zoneout"])
    return LSTMOptions(**fields), tuple(meta["weights"]), tuple(meta["masks"])


def _weights(present: Sequence[Tensor], layout: Sequence[bool]) -> list[DirectionWeights]:
    """Each direction's DirectionWeights from the tensors that are there and where they go."""
    values = iter(present)
    flat = [next(values) if there else None for there in layout]
    n = len(_WEIGHT_FIELDS)
    return [DirectionWeights(*flat[d * n : (d + 1) * n]) for d in range(len(flat) // n)]


def _masks(present: Sequence[Tensor], layout: Sequence[bool]) -> list[DirectionMasks] | None:
    if not layout:
        return None
    values = iter(present)
    flat = [next(values) if there else None for there in layout]
    n = len(_MASK_FIELDS)
    return [DirectionMasks(*flat[d * n : (d + 1) * n]) for d in range(len(flat) // n)]


class PlainContext:
    """What an ``autograd.Function``'s forward and backward use of ``ctx``, so that an engine can run
    them as plain functions (inside a custom op, where autograd does not record)."""

    def __init__(self, needs_input_grad: Sequence[bool]):
        self.needs_input_grad = tuple(needs_input_grad)
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


def _engine(name: str):
    from . import ENGINES  # this module is imported by the registry

    return ENGINES[name]


def _run(engine: str, x, lengths, h0, c0, weights, masks, meta: str, training: bool):
    options, weight_layout, mask_layout = decode(meta)
    return _engine(engine).layer(x, lengths, h0, c0, _weights(weights, weight_layout), options,
                                 _masks(masks, mask_layout), training=training)


if AVAILABLE:

    @torch.library.custom_op("fastlstm::layer", mutates_args=())
    def _layer_op(
        engine: str,
        x: Tensor,
        lengths: Tensor | None,
        h0: Tensor,
        c0: Tensor,
        weights: list[Tensor],
        masks: list[Tensor],
        meta: str,
        training: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One layer on ``engine``: ``x [T, B, I]`` -> ``(y [T, B, D*H_out], h_n [D, B, H_out], c_n [D, B, H])``.
        ``weights`` and ``masks`` hold the tensors that exist; ``meta`` (:func:`encode`) says where."""
        with torch.no_grad():
            y, h, c = _run(engine, x, lengths, h0, c0, weights, masks, meta, training)
        return y.clone(), h.clone(), c.clone()  # outputs must not alias each other or the inputs

    @_layer_op.register_fake
    def _layer_fake(engine, x, lengths, h0, c0, weights, masks, meta, training):
        steps, batch, directions = x.shape[0], x.shape[1], h0.shape[0]
        return (x.new_empty(steps, batch, directions * h0.shape[2]), x.new_empty(h0.shape),
                x.new_empty(c0.shape))

    @torch.library.custom_op("fastlstm::layer_backward", mutates_args=())
    def _layer_backward_op(
        engine: str,
        x: Tensor,
        lengths: Tensor | None,
        h0: Tensor,
        c0: Tensor,
        weights: list[Tensor],
        masks: list[Tensor],
        meta: str,
        training: bool,
        dy: Tensor,
        dh_n: Tensor,
        dc_n: Tensor,
    ) -> list[Tensor]:
        """Gradients of ``x``, ``h0``, ``c0`` and of each of ``weights``, in that order: the layer's
        forward recomputed, then the engine's backward."""
        options, weight_layout, mask_layout = decode(meta)
        grads = _engine(engine).gradients(x, lengths, h0, c0, _weights(weights, weight_layout), options,
                                          _masks(masks, mask_layout), training=training, cotangents=(dy, dh_n, dc_n))
        kept = grads[:3] + [g for g, there in zip(grads[3:], weight_layout) if there]
        # engines may hand out views of one buffer (bias_ih and bias_hh share theirs): op outputs must not alias
        return [torch.zeros_like(t) if g is None else g.clone(memory_format=torch.contiguous_format)
                for g, t in zip(kept, [x, h0, c0, *weights])]

    @_layer_backward_op.register_fake
    def _layer_backward_fake(engine, x, lengths, h0, c0, weights, masks, meta, training, dy, dh_n, dc_n):
        return [torch.empty_like(t) for t in (x, h0, c0, *weights)]

    def _setup_context(ctx, inputs, output):
        engine, x, lengths, h0, c0, weights, masks, meta, training = inputs
        ctx.call = (engine, len(weights), meta, training)
        ctx.save_for_backward(x, h0, c0, lengths, *weights, *masks)

    def _backward(ctx, dy, dh_n, dc_n):
        engine, n_weights, meta, training = ctx.call
        x, h0, c0, lengths, *rest = ctx.saved_tensors
        weights, masks = list(rest[:n_weights]), list(rest[n_weights:])
        grads = _layer_backward_op(engine, x, lengths, h0, c0, weights, masks, meta, training, dy.contiguous(),
                                   dh_n.contiguous(), dc_n.contiguous())
        # the masks are constants: no gradient
        return None, grads[0], None, grads[1], grads[2], list(grads[3:]), [None] * len(masks), None, None

    _layer_op.register_autograd(_backward, setup_context=_setup_context)


def layer_as_op(engine: str):
    """``engine``'s layer entry point (the signature of :func:`fastlstm.reference.lstm_layer`) as a
    call of the ``fastlstm::layer`` custom op."""

    def layer(x, lengths, h0, c0, weights, options, masks, *, training):
        flat = [t for w in weights for t in w]
        flat_masks = [] if masks is None else [getattr(m, f) for m in masks for f in _MASK_FIELDS]
        meta = encode(options, tuple(t is not None for t in flat), tuple(m is not None for m in flat_masks))
        return torch.ops.fastlstm.layer(engine, x, lengths, h0, c0, [t for t in flat if t is not None],
                                        [m for m in flat_masks if m is not None], meta, training)

    return layer
