"""The reference engine in the rows layout: :mod:`fastlstm.reference`'s padded time loop, run on the
layout's sorted slots (plain torch ops, so autograd, compile, export and ``torch.func`` see through
it and no custom op is needed).

It is also the compiled engines' higher-order gradient: :func:`layer_of_call` re-runs one of their
calls here with grad mode on (:mod:`fastlstm.engines.contract`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from ..masks import DirectionMasks
from ..options import LSTMOptions
from ..packing import Layout
from ..weights import DirectionWeights

name = "reference"


def supports(device: torch.device, dtype: torch.dtype, options: LSTMOptions | None) -> bool:
    return True


def layer(x: Tensor, layout: Layout, h0: Tensor, c0: Tensor, weights: Sequence[DirectionWeights],
          options: LSTMOptions, masks: Sequence[DirectionMasks] | None, *, training: bool,
          from_input_gates: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One layer: rows ``x [N, I]`` (or, with ``from_input_gates``, its input gates ``[N, D*4H]``),
    states and per-sequence masks in sorted order, zoneout masks in rows ->
    ``(y [N, D*H_out], h_n, c_n)``."""
    padded = layout.padded(x, sorted_slots=True)
    lengths = None if layout.full else layout.lengths().to(x.device)
    if masks is not None:
        masks = [DirectionMasks(*(None if m is None else layout.padded(m, sorted_slots=True) for m in
                                  (d.zoneout_h, d.zoneout_c)), d.recurrent, d.weight_hh) for d in masks]
    run = reference.recurrence if from_input_gates else reference.lstm_layer
    y, h_n, c_n = run(padded, lengths, h0, c0, weights, options, masks, training=training)
    return layout.rows(y, sorted_slots=True), h_n, c_n


def layer_of_call(call, inputs) -> tuple[Tensor, Tensor, Tensor]:
    """A compiled engine's layer call (:class:`fastlstm.engines.contract.LayerCall` and its inputs)
    computed here, differentiably."""
    # the call's weight_hh has DropConnect applied already (by the shell, as a torch op)
    options = dataclasses.replace(call.options, weight_drop=0.0) if call.options.weight_drop else call.options
    masks = inputs.masks if call.training and options.is_stochastic else None
    cell = inputs.h0.dim() == 2  # (a single step's states, [B, .])
    h0, c0 = (inputs.h0.unsqueeze(0), inputs.c0.unsqueeze(0)) if cell else (inputs.h0, inputs.c0)
    y, h_n, c_n = layer(inputs.x, inputs.layout, h0, c0, inputs.weights, options, masks, training=call.training,
                        from_input_gates=not call.fused_input)
    return (y, h_n[0], c_n[0]) if cell else (y, h_n, c_n)


def fuses_input(layout: Layout, weights: Sequence[DirectionWeights], options: LSTMOptions) -> bool:
    return False
