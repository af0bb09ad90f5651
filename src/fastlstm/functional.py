"""Layers x directions: draws the masks, picks an engine, applies dropout between layers.

The modules call these after they have parsed the user's input: padded, time-major
``x [T, B, I]`` with optional ``lengths [B]`` (user batch order), or a ``PackedSequence``; and
states ``h0 [L * D, B, H_out]``, ``c0 [L * D, B, H]`` in the user's batch order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import packing
from .engines import for_tracing, select_engine
from .masks import DirectionMasks, LSTMMasks, sample_direction_masks, sample_masks
from .options import LSTMOptions
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
            sequence has length ``T``), or a ``PackedSequence``. Engines that take packed rows
            get them as they are (no padding is ever built); the others get them padded.
        h0: ``[L * D, B, H_out]``, layer-major then direction, user batch order; c0: ``[L * D, B, H]``.
        weights: ``weights[layer][direction]``.
        dropout: probability of the inter-layer dropout (training only, not after the last layer).
        masks: training masks to replay; any that are missing are drawn from torch's RNG.

    Returns:
        ``(y, h_n [L * D, B, H_out], c_n [L * D, B, H])``; ``y`` is ``[T, B, D * H_out]``, or the
        packed rows ``[N, D * H_out]`` for a PackedSequence input.
    """
    num_layers, num_directions = len(weights), len(weights[0])
    data = input.data if isinstance(input, PackedSequence) else input
    steps, batch = extent(input)
    masks = draw_masks(steps, batch, data, h0, weights, options, dropout=dropout, training=training, given=masks)
    engine = for_tracing(select_engine(backend, data.device, data.dtype, options), weights[0], options)

    layout = None
    if isinstance(input, PackedSequence):
        layout = packing.layout_of(input)
        if engine.packed_layer is None:  # this engine takes padded input: pad once, pack at the end
            data, lengths = packing.unpack(input.data, layout), layout.lengths

    h_n, c_n = [], []
    layer_input = data
    for layer in range(num_layers):
        states = slice(layer * num_directions, (layer + 1) * num_directions)
        layer_masks = None if masks is None else masks.layers[layer]
        if layout is not None and engine.packed_layer is not None:
            y, h, c = engine.packed_layer(
                layer_input, input.batch_sizes, input.sorted_indices, h0[states], c0[states], weights[layer],
                options, layer_masks, training=training,
            )
        else:
            y, h, c = engine.layer(
                layer_input, lengths, h0[states], c0[states], weights[layer], options, layer_masks, training=training
            )
        h_n.append(h)
        c_n.append(c)
        if masks is not None and layer < num_layers - 1 and masks.inter_layer[layer] is not None:
            mask = masks.inter_layer[layer]
            if layout is not None and engine.packed_layer is not None:
                mask = packing.pack(mask, layout)
            y = (y * mask).to(y.dtype)
        layer_input = y
    if layout is not None and engine.packed_layer is None:
        layer_input = packing.pack(layer_input, layout)
    return layer_input, torch.cat(h_n), torch.cat(c_n)


def extent(input: Tensor | PackedSequence) -> tuple[int, int]:
    """``(T, B)`` of a padded, time-major tensor or of a PackedSequence."""
    if isinstance(input, PackedSequence):
        return len(input.batch_sizes), int(input.batch_sizes[0])
    return input.shape[0], input.shape[1]


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
    masks = draw_cell_masks(x, weights, options, training=training, given=masks)
    engine = for_tracing(select_engine(backend, x.device, x.dtype, options), [weights], options)
    if engine.cell is not None:
        return engine.cell(x, h0, c0, weights, options, masks, training=training)
    _, h, c = engine.layer(
        x.unsqueeze(0), None, h0.unsqueeze(0), c0.unsqueeze(0), (weights,), options,
        None if masks is None else (masks,), training=training,
    )
    return h[0], c[0]


def draw_masks(
    steps: int,
    batch: int,
    like: Tensor,
    h0: Tensor,
    weights: Sequence[Sequence[DirectionWeights]],
    options: LSTMOptions,
    *,
    dropout: float,
    training: bool,
    given: LSTMMasks | None = None,
) -> LSTMMasks | None:
    """The masks :func:`lstm` uses for ``T = steps``, ``B = batch`` and input ``like`` (for its device
    and dtype): ``given`` ones kept, missing ones drawn. Masks are time-major and padded (``[T, B, .]``)
    whatever the input's form.

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
        steps=steps,
        batch=batch,
        hidden_size=hidden_size,
        proj_size=h_out if h_out != hidden_size else 0,
        device=like.device,
        dtype=accumulation_dtype(like.dtype),
        given=given,
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
