"""The shell around the engines: layout, masks, input projection, layers, engine choice.

Everything an engine should not have to repeat is done here, once per call:

* the one variable-length layout (:class:`fastlstm.packing.Layout`): the input as rows sorted by
  length, the states and masks in that order, the outputs back in the user's form;
* the masks: drawn (or checked) in the user's order, then put in rows;
* DropConnect applied to ``weight_hh`` and the input projection ``x W_ih^T`` (layer-normalised
  under ``layer_norm``) computed for every step and direction at once, both as plain torch ops, so
  autograd differentiates them and compile and export see them;
* the engine: picked by ``backend=``, then one :func:`fastlstm.engines.contract.run` per layer
  (the reference engine is plain torch and is called directly); inter-layer dropout between layers.

The modules call :func:`lstm` and :func:`lstm_cell` after they have parsed the user's input:
padded, time-major ``x [T, B, I]`` with optional ``lengths [B]``, or a ``PackedSequence``; states
``h0 [L * D, B, H_out]``, ``c0 [L * D, B, H]`` in the user's batch order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import engines, exporting, packing
from .engines import contract
from .masks import DirectionMasks, LSTMMasks, sample_direction_masks, sample_masks
from .options import LSTMOptions
from .reference import LAYER_NORM_EPS
from .weights import DirectionWeights, accumulation_dtype


def lstm(
    input: Tensor | PackedSequence,
    lengths: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[Sequence[DirectionWeights]],
    options: LSTMOptions,
    *,
    dropout: float,
    training: bool,
    masks: LSTMMasks | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """A multi-layer, possibly bidirectional LSTM.

    Args:
        input: padded, time-major ``[T, B, I]`` (with ``lengths [B]`` int64, or None when every
            sequence has length ``T``), or a ``PackedSequence``.
        h0: ``[L * D, B, H_out]``, layer-major then direction, user batch order; c0: ``[L * D, B, H]``.
        weights: ``weights[layer][direction]``.
        dropout: probability of the inter-layer dropout (training only, not after the last layer).
        masks: training masks to replay; any that are missing are drawn from torch's RNG.

    Returns:
        ``(y, h_n [L * D, B, H_out], c_n [L * D, B, H])``; ``y`` is ``[T, B, D * H_out]``, or the
        packed rows ``[N, D * H_out]`` for a PackedSequence input.
    """
    if torch.jit.is_tracing():
        raise RuntimeError(
            "fastlstm.LSTM cannot be traced by torch.jit.trace: a trace would fix the number of steps and "
            "silently compute wrong results for other lengths; use torch.export.export (T and B dynamic) or "
            "torch.compile, and for ONNX fastlstm.onnx.export (torch.onnx.export with dynamo=False traces)"
        )
    packed = isinstance(input, PackedSequence)
    if exporting.onnx_exporting():  # (graph ops ONNX can express, T and B dynamic: exporting.py)
        exporting.check_exportable(options, training=training, dropout=dropout if len(weights) > 1 else 0.0,
                                   packed=packed)
        return exporting.lstm(input, lengths, h0, c0, weights, options)
    data = input.data if packed else input
    engine = engines.select_engine(backend, data.device, data.dtype, options)
    layout = packing.layout_of(input, lengths)
    masks = draw_masks(layout, data, h0, weights, options, dropout=dropout, training=training, given=masks)
    num_layers, num_directions = len(weights), len(weights[0])
    rows = data if packed else layout.rows(input)
    h0, c0 = layout.sort(h0, 1), layout.sort(c0, 1)
    h_n, c_n = [], []
    for layer in range(num_layers):
        states = slice(layer * num_directions, (layer + 1) * num_directions)
        y, h, c = layer_rows(engine, rows, layout, h0[states], c0[states], weights[layer], options,
                             None if masks is None else masks.layers[layer], training=training)
        h_n.append(h)
        c_n.append(c)
        if masks is not None and layer < num_layers - 1 and masks.inter_layer[layer] is not None:
            y = (y * layout.rows(masks.inter_layer[layer])).to(y.dtype)
        rows = y
    h_n = h_n[0] if num_layers == 1 else torch.cat(h_n)
    c_n = c_n[0] if num_layers == 1 else torch.cat(c_n)
    return (rows if packed else layout.padded(rows)), layout.unsort(h_n, 1), layout.unsort(c_n, 1)


def lstm_cell(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: DirectionWeights,
    options: LSTMOptions,
    *,
    training: bool,
    masks: DirectionMasks | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One LSTM step: ``x [B, I]``, ``h0 [B, H]``, ``c0 [B, H]`` -> ``(h_1 [B, H], c_1 [B, H])``.

    In training, each call draws fresh masks for the stochastic options unless ``masks`` gives
    them (with ``T = 1``); pass the same ``recurrent`` mask to every call of a sequence for
    Gal & Ghahramani's per-sequence dropout.
    """
    exported = exporting.onnx_exporting()
    if exported:
        exporting.check_exportable(options, training=training)
    masks = draw_cell_masks(x, weights, options, training=training, given=masks)
    # torch.jit.trace and ONNX export record torch ops: the reference's step (a step has no length to fix)
    traced = exported or torch.jit.is_tracing()
    engine = engines.select_engine("reference" if traced else backend, x.device, x.dtype, options)
    layout = packing.Layout.of_full(1, x.shape[0], x.device)
    if engine != "reference" and not contract.transformed() and engines.load(engine).fuses_input(layout, [weights],
                                                                                                 options):
        # a step that the engine takes whole (its input projection inside, [B, .] states as they are):
        # where Python's cost per call is most of the step's, nothing else is prepared for it
        if masks is None:
            return contract.run_step(engine, options, training, x, layout, h0, c0, weights)
        _, h, c = layer_rows(engine, x, layout, h0, c0, [weights], options, [masks], training=training)
        return h, c
    _, h, c = layer_rows(engine, x, layout, h0.unsqueeze(0), c0.unsqueeze(0), [weights], options,
                         None if masks is None else [masks], training=training)
    return h[0], c[0]


def lstm_layer(
    x: Tensor | PackedSequence,
    lengths: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[DirectionWeights],
    options: LSTMOptions,
    masks: Sequence[DirectionMasks] | None,
    *,
    training: bool,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer on ``backend``, with the signature and semantics of
    :func:`fastlstm.reference.lstm_layer` (padded ``x [T, B, I]`` and ``lengths``, or a
    PackedSequence, whose output is then its rows ``[N, D * H_out]``); masks as there, every one
    the options need, in the user's order."""
    if masks is not None and not training:
        raise ValueError("masks are only used in training mode; eval mode uses their expectations")
    if masks is None and training and options.is_stochastic:
        raise ValueError("training-mode forward needs the masks of its stochastic options; draw them with fastlstm.masks")
    packed = isinstance(x, PackedSequence)
    data = x.data if packed else x
    layout = packing.layout_of(x, lengths)
    rows = data if packed else layout.rows(x)
    engine = engines.select_engine(backend, data.device, data.dtype, options)
    y, h_n, c_n = layer_rows(engine, rows, layout, layout.sort(h0, 1), layout.sort(c0, 1), weights, options, masks,
                             training=training)
    return (y if packed else layout.padded(y)), layout.unsort(h_n, 1), layout.unsort(c_n, 1)


def layer_rows(engine: str, x: Tensor, layout: packing.Layout, h0: Tensor, c0: Tensor,
               weights: Sequence[DirectionWeights], options: LSTMOptions, masks: Sequence[DirectionMasks] | None, *,
               training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One layer on ``engine`` in the layout: rows ``x [N, I]``, sorted ``h0 [D, B, H_out]`` and
    ``c0 [D, B, H]``, masks in the user's order -> ``(y [N, D * H_out], h_n, c_n)`` (sorted)."""
    weights = list(weights)
    if masks is not None:
        masks = [_mask_rows(layout, m) for m in masks]
    if engine == "reference" or contract.transformed():
        return engines.load("reference").layer(x, layout, h0, c0, weights, options, masks, training=training)
    if masks is None:
        masks = [_NO_MASKS] * len(weights)
    else:  # DropConnect is applied here, as a torch op (autograd carries its mask to weight_hh's gradient)
        weights = [w if m.weight_hh is None else w._replace(weight_hh=(w.weight_hh * m.weight_hh).to(w.weight_hh.dtype))
                   for w, m in zip(weights, masks)]
        masks = [m if m.weight_hh is None else dataclasses.replace(m, weight_hh=None) for m in masks]
    module = engines.load(engine)
    fused = module.fuses_input(layout, weights, options)
    source = None
    if not fused:  # (an engine may choose its GEMM for eager calls; traced ones take F.linear, or _one_column_linear)
        source = contract.GatesSource(x, weights)
        eager_linear = getattr(module, "linear", None)
        traced = contract.traced()
        linear = (_one_column_linear if x.shape[1] == 1 else F.linear) if traced else eager_linear or F.linear
        x = input_gates(x, weights, options, linear=linear)
        weights = [w._replace(weight_ih=None, layer_norm_ih_weight=None) for w in weights]
    flat = contract.flat_weights(weights)
    save = torch.is_grad_enabled() and (x.requires_grad or h0.requires_grad or c0.requires_grad
                                        or any(t.requires_grad for t in flat))
    call = contract.LayerCall(engine, options, training, save, fused, contract.presence(weights),
                              _NO_MASKS_PRESENT[len(masks)] if masks[0] is _NO_MASKS else contract.presence(masks))
    return contract.run(call, contract.LayerInputs(x, layout, h0, c0, weights, masks), flat, source)


def _one_column_linear(x: Tensor, w: Tensor) -> Tensor:
    """``x w^T`` for one-column rows ``x [N, 1]`` as the outer product it is (each product rounded
    once, as a GEMM's). Traced, a GEMM's backward asks whether its one-column operand is column-major
    (stride 1 == N), which a compiler cannot answer where N is data (the rows of ``lengths=``)."""
    return x * w.reshape(1, -1)


_NO_MASKS = DirectionMasks()  # (never changed: masks are replaced, not edited)
_NO_MASKS_PRESENT = {d: (False,) * len(contract.MASK_FIELDS) * d for d in (1, 2)}


def input_gates(x: Tensor, weights: Sequence[DirectionWeights], options: LSTMOptions, *,
                linear=F.linear) -> Tensor:
    """Every direction's ``x W_ih^T`` for rows ``x [N, I]`` at once -> ``[N, D * 4H]``; under
    ``layer_norm`` each direction's is layer-normalised with its gain, in the accumulation dtype
    (docs/equations.md, section 5). No bias: the engines add ``b_ih + b_hh``. ``linear(x, w)``
    computes ``x w^T`` (the engine's GEMM)."""
    if not options.layer_norm:
        w_ih = weights[0].weight_ih if len(weights) == 1 else torch.cat([w.weight_ih for w in weights])
        return linear(x, w_ih)
    acc = accumulation_dtype(x.dtype)
    gates = [F.layer_norm(linear(x, w.weight_ih).to(acc), (w.weight_ih.shape[0],),
                          w.layer_norm_ih_weight.to(acc), None, LAYER_NORM_EPS) for w in weights]
    return gates[0] if len(gates) == 1 else torch.cat(gates, 1)


def _mask_rows(layout: packing.Layout, masks: DirectionMasks) -> DirectionMasks:
    """A direction's masks (user order, ``[T, B, .]``) in the layout: zoneout masks as rows, the
    per-sequence recurrent mask sorted."""
    def rows(m):
        return None if m is None else layout.rows(m)

    return DirectionMasks(rows(masks.zoneout_h), rows(masks.zoneout_c),
                          None if masks.recurrent is None else layout.sort(masks.recurrent, 0), masks.weight_hh)


def layout_of(input: Tensor | PackedSequence, lengths: Tensor | None) -> packing.Layout:
    """The call's layout (:func:`fastlstm.packing.layout_of`), for the modules' ``sample_masks``."""
    return packing.layout_of(input, lengths)


def draw_masks(
    layout: packing.Layout,
    like: Tensor,
    h0: Tensor,
    weights: Sequence[Sequence[DirectionWeights]],
    options: LSTMOptions,
    *,
    dropout: float,
    training: bool,
    given: LSTMMasks | None = None,
) -> LSTMMasks | None:
    """The masks :func:`lstm` uses for a call of ``layout`` (its ``T`` and ``B``) and input ``like``
    (for its device and dtype): ``given`` ones kept, missing ones drawn. Masks are time-major and
    padded (``[T, B, .]``) whatever the input's form; where sequences differ in length, the
    inter-layer dropout is drawn over the layout's rows, as torch draws it for a PackedSequence.

    Returns None when the call is deterministic (eval mode, or no stochastic option).
    """
    num_layers, num_directions = len(weights), len(weights[0])
    hidden_size = weights[0][0].weight_hh.shape[0] // 4
    h_out = h0.shape[-1]
    inter_layer_dropout = dropout if num_layers > 1 else 0.0
    if not training or not (options.is_stochastic or inter_layer_dropout > 0):
        if given is not None:
            raise ValueError("masks are only used in training mode with a stochastic option or dropout")
        return None
    return sample_masks(
        options,
        num_layers=num_layers,
        num_directions=num_directions,
        dropout=inter_layer_dropout,
        steps=layout.steps,
        batch=layout.batch,
        hidden_size=hidden_size,
        proj_size=h_out if h_out != hidden_size else 0,
        device=like.device,
        dtype=accumulation_dtype(like.dtype),
        given=given,
        rows=None if layout.full else (layout.total, layout.padded),
    )


def draw_cell_masks(
    x: Tensor,
    weights: DirectionWeights,
    options: LSTMOptions,
    *,
    training: bool,
    given: DirectionMasks | None = None,
) -> DirectionMasks | None:
    """The masks :func:`lstm_cell` uses for ``x [B, I]`` (``T = 1``); None when deterministic."""
    if not training or not options.is_stochastic:
        if given is not None:
            raise ValueError("masks are only used in training mode with a stochastic option")
        return None
    hidden_size = weights.weight_hh.shape[0] // 4
    return sample_direction_masks(
        options,
        steps=1,
        batch=x.shape[0],
        hidden_size=hidden_size,
        h_out=hidden_size,
        device=x.device,
        dtype=accumulation_dtype(x.dtype),
        given=given,
    )
