"""Layers x directions: draws the masks, picks an engine, applies dropout between layers.

The modules call these after they have parsed the user's input into the engines' form:
padded, time-major ``x [T, B, I]`` with optional ``lengths [B]`` (user batch order), and states
``h0 [L * D, B, H_out]``, ``c0 [L * D, B, H]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .engines import select_engine
from .masks import DirectionMasks, LSTMMasks, sample_direction_masks, sample_masks
from .options import LSTMOptions
from .weights import DirectionWeights, accumulation_dtype


def lstm(
    x: Tensor,
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
    """A multi-layer, possibly bidirectional LSTM over a padded, time-major sequence.

    Args:
        x: ``[T, B, I]``.
        lengths: ``[B]`` int64 or None (all sequences of length ``T``).
        h0: ``[L * D, B, H_out]``, layer-major then direction; c0: ``[L * D, B, H]``.
        weights: ``weights[layer][direction]``.
        dropout: probability of the inter-layer dropout (training only, not after the last layer).
        masks: training masks to replay; any that are missing are drawn from torch's RNG.

    Returns:
        ``(y [T, B, D * H_out], h_n [L * D, B, H_out], c_n [L * D, B, H])``.
    """
    num_layers, num_directions = len(weights), len(weights[0])
    masks = draw_masks(x, h0, weights, options, dropout=dropout, training=training, given=masks)

    engine = select_engine(backend, x.device, x.dtype, options)
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        states = slice(layer * num_directions, (layer + 1) * num_directions)
        y, h, c = engine.layer(
            layer_input,
            lengths,
            h0[states],
            c0[states],
            weights[layer],
            options,
            None if masks is None else masks.layers[layer],
            training=training,
        )
        h_n.append(h)
        c_n.append(c)
        if masks is not None and layer < num_layers - 1 and masks.inter_layer[layer] is not None:
            y = (y * masks.inter_layer[layer]).to(y.dtype)
        layer_input = y
    return layer_input, torch.cat(h_n), torch.cat(c_n)


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
    engine = select_engine(backend, x.device, x.dtype, options)
    if engine.cell is not None:
        return engine.cell(x, h0, c0, weights, options, masks, training=training)
    _, h, c = engine.layer(
        x.unsqueeze(0), None, h0.unsqueeze(0), c0.unsqueeze(0), (weights,), options,
        None if masks is None else (masks,), training=training,
    )
    return h[0], c[0]


def draw_masks(
    x: Tensor,
    h0: Tensor,
    weights: Sequence[Sequence[DirectionWeights]],
    options: LSTMOptions,
    *,
    dropout: float,
    training: bool,
    given: LSTMMasks | None = None,
) -> LSTMMasks | None:
    """The masks :func:`lstm` uses for these arguments: ``given`` ones kept, missing ones drawn.

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
        steps=x.shape[0],
        batch=x.shape[1],
        hidden_size=hidden_size,
        proj_size=h_out if h_out != hidden_size else 0,
        device=x.device,
        dtype=accumulation_dtype(x.dtype),
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
