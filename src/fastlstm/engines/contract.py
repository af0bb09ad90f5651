"""The engine contract, and the one custom op every compiled engine runs behind.

An engine computes one layer (every direction) in the :mod:`fastlstm.packing` layout as two pure
functions, with everything that passes between them in tensors::

    allocate(call, inputs)                          -> saved: list[Tensor]    what the forward keeps
    forward(call, inputs, saved)                    -> (y [N, D*H_out], h_n [D, B, H_out], c_n [D, B, H])
    backward(call, inputs, y, saved, dy, dh_n, dc_n, *, needs_x) -> LayerGrads   (a cotangent may be None: zeros)

plus ``supports(device, dtype, options)``, ``fuses_input(layout, weights, options)`` (whether it
takes the layer's input rows and ``weight_ih`` itself instead of the input gates) and
``reads(call) -> (x, y)`` (which of its input and output its backward reads). ``call``
(:class:`LayerCall`) is everything static; it travels as one string.

This module registers that pair once, as ``fastlstm::lstm_layer`` and ``fastlstm::lstm_layer_backward``
(``torch.library`` custom ops, with fake implementations built from ``allocate``, so their shapes
agree by construction, and ``register_autograd``). ``torch.compile`` and ``torch.export`` see one op
per layer and nothing in Python objects. Eager calls run the same functions through
:class:`_EagerLayer`, an ``autograd.Function`` without the dispatcher (a Python custom op costs
40-100 us per call through it, as much as a whole single step), with the same saving and the same
backward. The places to attach the other transforms:

* higher-order gradients and batched cotangents (``create_graph=True``, ``is_grads_batched=True``):
  :func:`_gradients` re-runs the layer on the reference engine, differentiably. Where the engine's
  backward does not read its input gates, the eager layer keeps their source instead (the layer's
  input rows and ``weight_ih``, which the input projection's own node keeps anyway) and recomputes
  them;
* ``torch.func`` transforms (grad, vjp, jvp, vmap, jacrev) and forward-mode AD
  (``torch.autograd.forward_ad``): :func:`transformed` sends the shell to the reference engine,
  which functorch transforms (and forward AD differentiates) as plain torch ops, to any order
  (torch 2.13's ``register_autograd`` generates no ``setup_context``, which functorch requires:
  pytorch/pytorch#170834; the engines have no tangent formulas);
* export lowerings (ONNX): the op's schema, with the options in ``call``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import reference
from ..masks import MASK_FIELDS, DirectionMasks
from ..options import LSTMOptions
from ..packing import Layout, check_batch_sizes
from ..weights import DirectionWeights
from . import constant_result, load

WEIGHT_FIELDS = DirectionWeights._fields


class LayerCall(NamedTuple):
    """What one layer call computes apart from its tensors: fixed for a module, so compile and
    export keep it as a constant.

    Attributes:
        engine: the engine's name.
        training: the masks are Bernoulli draws (else zoneout uses its expectation).
        save: autograd records the call: the forward keeps what its backward reads.
        fused_input: ``x`` is the layer's input rows and ``weight_ih`` is among the weights (the
            engine projects them itself); otherwise ``x`` is the input gates.
        weights: which ``DirectionWeights`` fields are present, for each direction in turn.
        masks: which ``DirectionMasks`` fields are present, for each direction in turn.
    """

    engine: str
    options: LSTMOptions
    training: bool
    save: bool
    fused_input: bool
    weights: tuple[bool, ...]
    masks: tuple[bool, ...]

    @property
    def directions(self) -> int:
        return len(self.weights) // len(WEIGHT_FIELDS)


class LayerInputs(NamedTuple):
    """The tensors of one layer call, in the layout's sorted order.

    Attributes:
        x: the input gates ``[N, D*4H]`` (each direction's ``x W_ih^T``, layer-normalised with its
            gain under ``layer_norm``; no bias), or with ``fused_input`` the input rows ``[N, I]``.
        layout: the rows' :class:`fastlstm.packing.Layout`.
        h0: ``[D, B, H_out]``; c0: ``[D, B, H]``; with ``fused_input`` (one direction) also ``[B, .]``,
            so that a cell's states pass as they are (and ``h_n``, ``c_n`` come back so).
        weights: per direction; ``weight_hh`` has DropConnect applied; ``weight_ih`` only with
            ``fused_input``; ``layer_norm_ih_weight`` never (it is in the input gates).
        masks: per direction, in rows: ``zoneout_h [N, H_out]``, ``zoneout_c [N, H]``,
            ``recurrent [B, H_out]``; ``weight_hh`` None (applied).
    """

    x: Tensor
    layout: Layout
    h0: Tensor
    c0: Tensor
    weights: list[DirectionWeights]
    masks: list[DirectionMasks]


class LayerGrads(NamedTuple):
    """Gradients of one layer call: of ``x``, ``h0``, ``c0`` and of each direction's weights (None
    where a field is absent, or for ``x`` where it was not asked for)."""

    x: Tensor | None
    h0: Tensor
    c0: Tensor
    weights: list[DirectionWeights]


def engine_of(call: LayerCall):
    return load(call.engine)


# -- flat tensor lists (a custom op takes lists of tensors, not records) ------------------------------


def flat_weights(weights: Sequence[DirectionWeights]) -> list[Tensor]:
    return [t for w in weights for t in w if t is not None]


def flat_masks(masks: Sequence[DirectionMasks]) -> list[Tensor]:
    flat = [getattr(masks_d, f) for masks_d in masks for f in MASK_FIELDS]
    return [m for m in flat if m is not None]


def presence(records: Sequence) -> tuple[bool, ...]:
    """Which fields of each record (``DirectionWeights`` or ``DirectionMasks``) hold a tensor, in turn."""
    if isinstance(records[0], DirectionWeights):
        return tuple(t is not None for w in records for t in w)
    return tuple(getattr(m, f) is not None for m in records for f in MASK_FIELDS)


def _unflatten(present: Sequence[bool], tensors: Sequence[Tensor], record, fields) -> list:
    values = iter(tensors)
    flat = [next(values) if there else None for there in present]
    n = len(fields)
    return [record(*flat[k : k + n]) for k in range(0, len(flat), n)]


def unflatten_weights(call: LayerCall, tensors: Sequence[Tensor]) -> list[DirectionWeights]:
    return _unflatten(call.weights, tensors, DirectionWeights, WEIGHT_FIELDS)


def unflatten_masks(call: LayerCall, tensors: Sequence[Tensor]) -> list[DirectionMasks]:
    return _unflatten(call.masks, tensors, DirectionMasks, MASK_FIELDS)


# -- the call as the op's one string argument ---------------------------------------------------------


def _encode(engine, options, training, save, fused_input, weights, masks) -> str:
    fields = LayerCall(engine, dataclasses.asdict(options), training, save, fused_input, weights, masks)._asdict()
    return json.dumps(fields, sort_keys=True)


# dynamo calls this eagerly (on the call's fields: it cannot rebuild the record itself) and keeps the
# string as a constant of the graph
_encode_constant = constant_result(_encode)


def encode(call: LayerCall) -> str:
    return _encode_constant(*call)


@functools.lru_cache(maxsize=512)
def decode(text: str) -> LayerCall:
    fields = json.loads(text)
    options = fields.pop("options")
    options["activations"] = tuple(options["activations"])
    options["zoneout"] = tuple(options["zoneout"])
    return LayerCall(options=LSTMOptions(**options), weights=tuple(fields.pop("weights")),
                     masks=tuple(fields.pop("masks")), **fields)


def _inputs(call: LayerCall, x, batch_sizes, h0, c0, weights, masks, rows: int) -> LayerInputs:
    layout = Layout.of_batch_sizes(batch_sizes, h0.shape[-2], rows, h0.device)
    return LayerInputs(x, layout, h0, c0, unflatten_weights(call, weights), unflatten_masks(call, masks))


def _outputs_like(call: LayerCall, inputs: LayerInputs) -> tuple[Tensor, Tensor, Tensor]:
    h0, c0 = inputs.h0, inputs.c0
    y = h0.new_empty(inputs.x.shape[0], call.directions * h0.shape[-1])
    return y, torch.empty_like(h0), torch.empty_like(c0)


def _unaliased(outputs: Sequence[Tensor], inputs: Sequence[Tensor | None]) -> list[Tensor]:
    """A custom op's outputs may alias neither its inputs nor each other: engines hand out views of
    one buffer (both biases' gradients are one tensor), which are copied here."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    fresh = []
    for t in outputs:
        key = t.untyped_storage().data_ptr() if t.numel() else None
        fresh.append(t.clone() if key in seen else t)
        seen.add(key)
    return fresh


# -- the ops -------------------------------------------------------------------------------------------


@torch.library.custom_op("fastlstm::lstm_layer", mutates_args=())
def _layer_op(call: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor, weights: list[Tensor],
              masks: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """One layer on ``call``'s engine -> ``(y [N, D*H_out], h_n, c_n, saved)``; see :class:`LayerInputs`."""
    layer_call = decode(call)
    # (a traced PackedSequence's were not checked; lengths= below T leave steps without rows at the end)
    check_batch_sizes(batch_sizes, x.shape[0], trailing_zeros=True)
    inputs = _inputs(layer_call, x, batch_sizes, h0, c0, weights, masks, x.shape[0])
    engine = engine_of(layer_call)
    saved = engine.allocate(layer_call, inputs)
    y, h_n, c_n = engine.forward(layer_call, inputs, saved)
    y, h_n, c_n, *saved = _unaliased([y, h_n, c_n, *saved], [x, h0, c0, *weights, *masks])
    return y, h_n, c_n, saved


@_layer_op.register_fake
def _layer_fake(call, x, batch_sizes, h0, c0, weights, masks):
    layer_call = decode(call)
    inputs = _inputs(layer_call, x, batch_sizes, h0, c0, weights, masks, x.shape[0])
    return (*_outputs_like(layer_call, inputs), engine_of(layer_call).allocate(layer_call, inputs))


@torch.library.custom_op("fastlstm::lstm_layer_backward", mutates_args=())
def _layer_backward_op(call: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor,
                       weights: list[Tensor], masks: list[Tensor], y: Tensor | None, saved: list[Tensor],
                       dy: Tensor, dh_n: Tensor, dc_n: Tensor, needs_x: bool) -> list[Tensor]:
    """Gradients of ``x`` (empty unless ``needs_x``), ``h0``, ``c0`` and of each of ``weights``. Where
    the engine does not read ``x``, ``x`` is a stand-in of no rows (its width and dtype are dx's)."""
    layer_call = decode(call)
    inputs = _inputs(layer_call, x, batch_sizes, h0, c0, weights, masks, dy.shape[0])
    grads = engine_of(layer_call).backward(layer_call, inputs, y, saved, dy, dh_n, dc_n, needs_x=needs_x)
    flat = [grads.x if grads.x is not None else dy.new_empty(0), grads.h0, grads.c0]
    flat += [g for gw, w in zip(grads.weights, inputs.weights) for g, t in zip(gw, w) if t is not None]
    return _unaliased(flat, [x, h0, c0, *weights, *masks, y, *saved, dy, dh_n, dc_n])


@_layer_backward_op.register_fake
def _layer_backward_fake(call, x, batch_sizes, h0, c0, weights, masks, y, saved, dy, dh_n, dc_n, needs_x):
    dx = x.new_empty(dy.shape[0], x.shape[1]) if needs_x else dy.new_empty(0)
    return [dx, torch.empty_like(h0), torch.empty_like(c0), *(torch.empty_like(w) for w in weights)]


# -- autograd: what the forward keeps, and the backward (shared by the op and the eager Function) -----


class GatesSource(NamedTuple):
    """Where a layer's input gates came from (:func:`fastlstm.functional.input_gates`): its input
    rows ``[N, I]`` and each direction's ``weight_ih`` and ``layer_norm_ih_weight`` (or None)."""

    rows: Tensor
    weights: list[DirectionWeights]

    def tensors(self) -> list[Tensor]:
        return [self.rows, *(t for w in self.weights for t in (w.weight_ih, w.layer_norm_ih_weight) if t is not None)]

    @staticmethod
    def of_tensors(options: LSTMOptions, tensors: Sequence[Tensor]) -> GatesSource:
        rows, *rest = tensors
        step = 2 if options.layer_norm else 1
        return GatesSource(rows, [DirectionWeights(weight_ih=rest[k], weight_hh=None,
                                                   layer_norm_ih_weight=rest[k + 1] if step == 2 else None)
                                  for k in range(0, len(rest), step)])

    def gates(self, options: LSTMOptions) -> Tensor:
        """The input gates ``[N, D*4H]`` again, differentiably (the reference's projection)."""
        gates = [reference.input_gates(self.rows, w, options) for w in self.weights]
        return gates[0] if len(gates) == 1 else torch.cat(gates, -1)


def _remember(ctx, call: LayerCall, inputs: LayerInputs, y: Tensor, saved: Sequence[Tensor],
              weights: Sequence[Tensor], masks: Sequence[Tensor], source: GatesSource | None = None) -> None:
    """What the backward needs: tensors in autograd's saved tensors (so that saved-tensor hooks see
    them and autograd checks them for in-place changes), the rest static. ``source``: where the input
    gates came from, kept where the engine does not keep the gates themselves (for higher-order
    gradients; the input projection's node keeps the same tensors, so they cost no memory)."""
    reads_x, reads_y = engine_of(call).reads(call)
    source = [] if reads_x or source is None else source.tensors()
    ctx.call, ctx.layout = call, inputs.layout
    ctx.counts = (len(weights), len(masks), len(source))
    ctx.x_like = (inputs.x.shape[1], inputs.x.dtype)  # where x is not kept, dx's width and dtype
    ctx.needs = (inputs.x.requires_grad, [t.requires_grad for t in weights])
    # c0 is kept even where the backward reads it through a pointer: autograd then sees it changed in place
    ctx.save_for_backward(inputs.x if reads_x else None, inputs.h0, inputs.c0, y if reads_y else None, *weights,
                          *masks, *source, *saved)


def _recall(ctx) -> tuple[LayerInputs, list[Tensor], Tensor | None, list[Tensor], GatesSource | None]:
    """The layer's inputs, its flat weights, ``y``, the engine's saved tensors and the gates' source."""
    x, h0, c0, y, *rest = ctx.saved_tensors
    n_weights, n_masks, n_source = ctx.counts
    if x is None:  # a stand-in of no rows: the engine does not read x, the op's fake sizes dx from it
        width, dtype = ctx.x_like
        x = h0.new_empty(0, width, dtype=dtype)
    weights, masks = rest[:n_weights], rest[n_weights : n_weights + n_masks]
    source, saved = rest[n_weights + n_masks : n_weights + n_masks + n_source], rest[n_weights + n_masks + n_source :]
    unmasked = [_NO_MASKS] * ctx.call.directions if not n_masks else unflatten_masks(ctx.call, masks)
    inputs = LayerInputs(x, ctx.layout, h0, c0, unflatten_weights(ctx.call, weights), unmasked)
    return inputs, list(weights), y, list(saved), GatesSource.of_tensors(ctx.call.options, source) if source else None


_NO_MASKS = DirectionMasks()  # (never changed)


def _gradients(ctx, dy: Tensor, dh_n: Tensor, dc_n: Tensor, *, through_op: bool) -> tuple:
    """``(dx, dh0, dc0, weight gradients (flat))`` for autograd."""
    inputs, weights, y, saved, source = _recall(ctx)
    call = ctx.call
    needs_x, needs_weights = ctx.needs
    # create_graph (a backward that autograd can differentiate again), or cotangents batched by vmap
    # (is_grads_batched, jacobian(vectorize=True)), which the engines' kernels cannot take
    if torch.is_grad_enabled() or transformed() or _batched(dy, dh_n, dc_n):
        return _differentiable_gradients(call, inputs, weights, source, (dy, dh_n, dc_n))
    if through_op:
        dy, dh_n, dc_n = dy.contiguous(), dh_n.contiguous(), dc_n.contiguous()
        flat = torch.ops.fastlstm.lstm_layer_backward(
            encode(call), inputs.x, inputs.layout.batch_sizes, inputs.h0, inputs.c0, weights,
            flat_masks(inputs.masks), y, saved, dy, dh_n, dc_n, needs_x)
        dx, dh0, dc0, *weight_grads = flat
        dx = dx if needs_x else None
    else:
        grads = engine_of(call).backward(call, inputs, y, saved, dy, dh_n, dc_n, needs_x=needs_x)
        dx, dh0, dc0 = grads.x, grads.h0, grads.c0
        weight_grads = [g for gw, w in zip(grads.weights, inputs.weights) for g, t in zip(gw, w) if t is not None]
    weight_grads = [g if wanted else None for g, wanted in zip(weight_grads, needs_weights)]
    if dy is None and dh_n is None and ctx.layout.steps == 1:
        # one step and no gradient on h: the projection's output reached nothing the loss reads, and
        # torch's autograd leaves the gradient of a weight that reached nothing None, not zeros
        fields = [WEIGHT_FIELDS[k % len(WEIGHT_FIELDS)] for k, there in enumerate(call.weights) if there]
        weight_grads = [None if field == "weight_hr" else g for g, field in zip(weight_grads, fields)]
    return dx, dh0, dc0, weight_grads


def _differentiable_gradients(call: LayerCall, inputs: LayerInputs, weights: list[Tensor],
                              source: GatesSource | None, cotangents) -> tuple:
    """The layer re-run on the reference engine (plain torch ops) and differentiated with
    ``create_graph``: gradients that autograd can differentiate again (and that vmap can batch)."""
    kept = engine_of(call).reads(call)[0]  # (else x is _recall's stand-in, of no rows, as is a layer of no rows)
    if not kept and source is None:  # (only the op, under a dispatch mode, neither keeps x nor knows its source)
        raise RuntimeError(
            f"fastlstm: the {call.engine} engine's op does not keep its layer's input gates, so it cannot give "
            "higher-order or batched gradients here; run the model eagerly or with backend='reference'"
        )
    from .reference import layer_of_call

    with torch.enable_grad():
        x = inputs.x if kept else source.gates(call.options)
        # each operand through a view of its own: the gradients asked for are the layer's partials. Asked
        # of the tensors themselves, autograd.grad also follows the paths between them (an h0 that an
        # earlier call computed from these weights, one tensor passed as h0 and c0, gates from a bias
        # the layer reads too), which the outer backward then counts again. The views keep the graph
        # to the tensors, so the gradients stay differentiable in them.
        leaves = [t.view_as(t) for t in (x, inputs.h0, inputs.c0, *weights)]
        x, h0, c0, *layer_weights = leaves
        outputs = layer_of_call(call, inputs._replace(x=x, h0=h0, c0=c0,
                                                      weights=unflatten_weights(call, layer_weights)))
        used = [(o, g) for o, g in zip(outputs, cotangents) if g is not None]
        grads = torch.autograd.grad([o for o, _ in used], [t for t in leaves if t.requires_grad], [g for _, g in used],
                                    create_graph=True, allow_unused=True)
    it = iter(grads)
    dx, dh0, dc0, *weight_grads = [next(it) if t.requires_grad else None for t in leaves]
    return dx, dh0, dc0, weight_grads


def _setup_context(ctx, inputs, output) -> None:
    text, x, batch_sizes, h0, c0, weights, masks = inputs
    y, _, _, saved = output
    call = decode(text)
    layout = Layout.of_batch_sizes(batch_sizes, h0.shape[-2], x.shape[0], x.device)
    _remember(ctx, call, LayerInputs(x, layout, h0, c0, unflatten_weights(call, weights),
                                     unflatten_masks(call, masks)), y, saved, weights, masks)


def _op_backward(ctx, dy, dh_n, dc_n, _saved_grads):
    dx, dh0, dc0, weight_grads = _gradients(ctx, dy, dh_n, dc_n, through_op=True)
    return None, dx, None, dh0, dc0, weight_grads, [None] * ctx.counts[1]


_layer_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """The op's forward and backward, called directly (eager mode, where the dispatcher's cost per
    call is not worth paying). Inputs: the call, its inputs as records, then their tensors for
    autograd: ``x, h0, c0``, the flat weights and the flat masks. Cotangents of outputs that
    nothing used arrive as None (engines take them as zeros)."""

    @staticmethod
    def forward(ctx, call, inputs, source, n_weights, x, h0, c0, *tensors):
        ctx.set_materialize_grads(False)
        engine = engine_of(call)
        saved = engine.allocate(call, inputs)
        y, h_n, c_n = engine.forward(call, inputs, saved)
        _remember(ctx, call, inputs, y, saved, tensors[:n_weights], tensors[n_weights:], source)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        dx, dh0, dc0, weight_grads = _gradients(ctx, dy, dh_n, dc_n, through_op=False)
        return None, None, None, None, dx, dh0, dc0, *weight_grads, *([None] * ctx.counts[1])


# -- one layer call -----------------------------------------------------------------------------------


def transformed() -> bool:
    """Whether a ``torch.func`` transform or forward-mode AD is active: the layer then runs on the
    reference engine, whose torch ops carry tangents. (``torch.autograd.forward_ad`` keeps no public
    flag; its dual level counter is -1 outside ``dual_level()``. The compiled engines have no
    tangent formulas: under ``no_grad`` they would drop the tangents silently.)"""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _batched(*cotangents: Tensor | None) -> bool:
    """Whether autograd batches the cotangents (``is_grads_batched=True`` runs the backward under
    torch's older vmap, which functorch's flag does not report)."""
    return any(t is not None and torch._C._functorch.is_legacy_batchedtensor(t) for t in cotangents)


def traced() -> bool:
    """Whether this call is being traced or transformed (compile, export, torch.func, a dispatch
    mode): then the layer must be the op."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or _get_current_dispatch_mode() is not None)


def run(call: LayerCall, inputs: LayerInputs, weights: list[Tensor] | None = None,
        source: GatesSource | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One layer on ``call.engine``: ``(y [N, D*H_out], h_n [D, B, H_out], c_n [D, B, H])``;
    ``weights``: ``flat_weights(inputs.weights)`` where the caller has it; ``source``: where the
    input gates came from (higher-order gradients recompute them)."""
    weights = flat_weights(inputs.weights) if weights is None else weights
    masks = flat_masks(inputs.masks) if True in call.masks else []
    if traced():
        y, h_n, c_n, _ = torch.ops.fastlstm.lstm_layer(encode(call), inputs.x, inputs.layout.batch_sizes, inputs.h0,
                                                       inputs.c0, weights, masks)
        return y, h_n, c_n
    if not call.save:  # nothing requires grad: no graph is recorded, nothing is kept
        return engine_of(call).forward(call, inputs, [])
    return _EagerLayer.apply(call, inputs, source, len(weights), inputs.x, inputs.h0, inputs.c0, *weights, *masks)


_STEP_CALLS: dict[tuple, LayerCall] = {}


def _step_call(engine: str, options: LSTMOptions, training: bool, save: bool, weights: tuple[bool, ...]) -> LayerCall:
    """The call of a step, made once per configuration: keyed by the options' identity (each module
    holds its own; hashing them costs a tenth of a step), each entry holding its options alive."""
    key = (engine, id(options), training, save, weights)
    call = _STEP_CALLS.get(key)
    if call is None or call.options is not options:
        if len(_STEP_CALLS) >= 1024:  # (modules made and dropped in a loop)
            _STEP_CALLS.clear()
        call = _STEP_CALLS[key] = LayerCall(engine, options, training, save, True, weights,
                                            (False,) * len(MASK_FIELDS))
    return call


_NO_MASKS_1 = [_NO_MASKS]


def run_step(engine: str, options: LSTMOptions, training: bool, x: Tensor, layout: Layout, h0: Tensor, c0: Tensor,
             w: DirectionWeights) -> tuple[Tensor, Tensor]:
    """One step that ``engine`` takes whole (``fused_input``; one direction, no masks): ``x [B, I]``,
    ``h0``/``c0 [B, H]`` -> ``(h_1, c_1)``. :func:`run` with the call prepared once per configuration."""
    # (list comprehensions, not generators: this runs once per step, where every call counts)
    flat = [t for t in w if t is not None]
    save = torch.is_grad_enabled() and (x.requires_grad or h0.requires_grad or c0.requires_grad
                                        or True in [t.requires_grad for t in flat])
    call = _step_call(engine, options, training, save, tuple([t is not None for t in w]))
    _, h_1, c_1 = run(call, LayerInputs(x, layout, h0, c0, [w], _NO_MASKS_1), flat)
    return h_1, c_1
