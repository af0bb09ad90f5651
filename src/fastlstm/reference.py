"""The specification: one readable LSTM cell step and one time loop, in plain PyTorch.

Every faster engine is tested against this file, and this file is tested against
``torch.nn.LSTM`` (float64) and onnxruntime's LSTM operator. Autograd gives the gradients.
The equations, with their sources, are in ``docs/equations.md``; the comments below refer to them.

Shape legend: ``T`` steps, ``B`` batch, ``I`` input features, ``H`` hidden size,
``H_out`` size of ``h`` (``P`` with a projection, else ``H``), ``D`` directions,
gates in the order ``i, f, g, o``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import DirectionMasks
from .options import LSTMOptions
from .weights import DirectionWeights, accumulation_dtype

LAYER_NORM_EPS = 1e-5


def hard_sigmoid(x: Tensor) -> Tensor:
    """``clip(0.2 x + 0.5, 0, 1)``: ONNX's HardSigmoid with its default alpha and beta."""
    return (0.2 * x + 0.5).clamp(0.0, 1.0)


def hardsigmoid(x: Tensor) -> Tensor:
    """``relu6(x + 3) / 6``: torch's Hardsigmoid and Keras 3's ``hard_sigmoid``. Written with clamp
    rather than ``F.hardsigmoid``, whose backward multiplies float64 gradients by ``1.0f / 6``
    rounded to float32 (a relative error of 1e-7 where the derivative is 1/6)."""
    return (x + 3.0).clamp(0.0, 6.0) / 6.0


ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "tanh": torch.tanh,
    "softsign": F.softsign,
    "relu": torch.relu,
    "hardsigmoid": hardsigmoid,
}


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LAYER_NORM_EPS)


def _clip(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


def _zoneout(keep: Tensor | float | None, previous: Tensor, fresh: Tensor) -> Tensor:
    """``keep * previous + (1 - keep) * fresh``: a Bernoulli mask in training, ``z`` in eval."""
    if keep is None:
        return fresh
    return keep * previous + (1.0 - keep) * fresh


def input_gates(x: Tensor, w: DirectionWeights, options: LSTMOptions) -> Tensor:
    """Every step's input term at once: ``x W_ih^T`` ``[T, B, 4H]`` from ``x [T, B, I]``, layer-normalised
    with its gain under ``layer_norm`` (docs/equations.md, section 5); no bias."""
    x_proj = x @ w.weight_ih.t()
    return _layer_norm(x_proj, w.layer_norm_ih_weight) if options.layer_norm else x_proj


def cell_step(
    x_gates: Tensor,
    h_prev: Tensor,
    c_prev: Tensor,
    w: DirectionWeights,
    weight_hh: Tensor,
    options: LSTMOptions,
    *,
    recurrent_mask: Tensor | None = None,
    zoneout_h: Tensor | float | None = None,
    zoneout_c: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step.

    Args:
        x_gates: step ``t`` of :func:`input_gates`, ``[B, 4H]``.
        h_prev: ``[B, H_out]``; c_prev: ``[B, H]``.
        w: the direction's parameters.
        weight_hh: ``[4H, H_out]``, ``w.weight_hh`` or its DropConnect-masked copy.
        recurrent_mask: ``[B, H_out]`` variational dropout mask on ``h_prev``, or None.
        zoneout_h, zoneout_c: keep masks (``[B, H_out]``, ``[B, H]``), eval-mode probabilities, or None.

    Returns:
        ``(h_t [B, H_out], c_t [B, H])``.
    """
    gate_act, cell_in_act, cell_out_act = (ACTIVATIONS[name] for name in options.activations)

    h_in = h_prev if recurrent_mask is None else h_prev * recurrent_mask
    h_proj = h_in @ weight_hh.t()
    if options.layer_norm:
        gates = x_gates + _layer_norm(h_proj, w.layer_norm_hh_weight)
    else:
        gates = x_gates + h_proj
    if w.bias_ih is not None:
        gates = gates + w.bias_ih + w.bias_hh
    a_i, a_f, a_g, a_o = gates.chunk(4, dim=1)

    if options.peephole:
        p_i, p_f, p_o = w.weight_peephole.chunk(3)
        a_i = a_i + p_i * c_prev
        a_f = a_f + p_f * c_prev

    i = gate_act(_clip(a_i, options.clip))
    f = 1.0 - i if options.coupled_input_forget else gate_act(_clip(a_f, options.clip))
    g = cell_in_act(_clip(a_g, options.clip))

    c_fresh = _clip(f * c_prev + i * g, options.cell_clip)

    if options.peephole:
        a_o = a_o + p_o * c_fresh
    o = gate_act(_clip(a_o, options.clip))

    c_out = _layer_norm(c_fresh, w.layer_norm_cell_weight, w.layer_norm_cell_bias) if options.layer_norm else c_fresh
    m = o * cell_out_act(c_out)
    h_fresh = m if w.weight_hr is None else _clip(m @ w.weight_hr.t(), options.proj_clip)

    return _zoneout(zoneout_h, h_prev, h_fresh), _zoneout(zoneout_c, c_prev, c_fresh)


def lstm_direction(
    x_gates: Tensor,
    lengths: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w: DirectionWeights,
    options: LSTMOptions,
    masks: DirectionMasks | None,
    *,
    training: bool,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction over a padded, time-major sequence, from its input gates.

    Args:
        x_gates: ``[T, B, 4H]``, :func:`input_gates` of the direction's input ``[T, B, I]``.
        lengths: ``[B]`` int64 true lengths, or None when every sequence has length ``T``.
            Steps at or past a sequence's length leave its state unchanged and output zeros, so the
            reverse direction starts at each sequence's own end.
        h0: ``[B, H_out]``; c0: ``[B, H]``.
        masks: this direction's training masks (required for the stochastic options in training).

    Returns:
        ``(y [T, B, H_out], h_n [B, H_out], c_n [B, H])``.
    """
    if masks is not None and not training:
        raise ValueError("masks are only used in training mode; eval mode uses their expectations")
    masks = masks if masks is not None else DirectionMasks()
    if training and options.is_stochastic:
        _require_masks(options, masks)

    weight_hh = w.weight_hh if masks.weight_hh is None else w.weight_hh * masks.weight_hh

    steps = range(x_gates.shape[0] - 1, -1, -1) if reverse else range(x_gates.shape[0])
    h, c = h0, c0
    outputs: list[Tensor] = [x_gates.new_empty(0)] * x_gates.shape[0]
    for t in steps:
        if training:
            keep_h = None if masks.zoneout_h is None else masks.zoneout_h[t]
            keep_c = None if masks.zoneout_c is None else masks.zoneout_c[t]
        else:
            keep_h = options.zoneout_h or None
            keep_c = options.zoneout_c or None
        h_new, c_new = cell_step(
            x_gates[t],
            h,
            c,
            w,
            weight_hh,
            options,
            recurrent_mask=masks.recurrent,
            zoneout_h=keep_h,
            zoneout_c=keep_c,
        )
        if lengths is None:
            h, c = h_new, c_new
            outputs[t] = h
        else:
            active = (lengths > t).unsqueeze(1)  # [B, 1]
            h = torch.where(active, h_new, h)
            c = torch.where(active, c_new, c)
            outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, c


def _require_masks(options: LSTMOptions, masks: DirectionMasks) -> None:
    needed = {
        "zoneout_h": options.zoneout_h > 0,
        "zoneout_c": options.zoneout_c > 0,
        "recurrent": options.recurrent_dropout > 0,
        "weight_hh": options.weight_drop > 0,
    }
    missing = [name for name, need in needed.items() if need and getattr(masks, name) is None]
    if missing:
        raise ValueError(f"training-mode forward needs the masks {missing}; draw them with fastlstm.masks")


def lstm_layer(
    x: Tensor,
    lengths: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[DirectionWeights],
    options: LSTMOptions,
    masks: Sequence[DirectionMasks] | None,
    *,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, all directions: the engine entry point.

    Half-precision inputs are computed in float32 (the cell state included) and cast back.

    Args:
        x: ``[T, B, I]``; lengths: ``[B]`` or None; h0: ``[D, B, H_out]``; c0: ``[D, B, H]``.
        weights, masks: one entry per direction (forward first).

    Returns:
        ``(y [T, B, D * H_out], h_n [D, B, H_out], c_n [D, B, H])`` in ``x.dtype``.
    """
    acc = accumulation_dtype(x.dtype)
    x_gates = torch.cat([input_gates(x.to(acc), _to(w, acc), options) for w in weights], dim=2)
    return recurrence(x_gates, lengths, h0, c0, weights, options, masks, training=training)


def recurrence(
    x_gates: Tensor,
    lengths: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[DirectionWeights],
    options: LSTMOptions,
    masks: Sequence[DirectionMasks] | None,
    *,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lstm_layer` from its input gates ``x_gates [T, B, D * 4H]`` (each direction's
    :func:`input_gates`); ``weight_ih`` and ``layer_norm_ih_weight`` are not read. Computes in the
    accumulation dtype; returns ``(y, h_n)`` in ``h0.dtype`` and ``c_n`` in ``c0.dtype`` (float32 for a
    half-precision call that carries its cell state in float32)."""
    acc, G = accumulation_dtype(h0.dtype), weights[0].weight_hh.shape[0]
    outputs, h_n, c_n = [], [], []
    for d, w in enumerate(weights):
        y, h, c = lstm_direction(
            x_gates[..., d * G : (d + 1) * G].to(acc),
            lengths,
            h0[d].to(acc),
            c0[d].to(acc),
            _to(w, acc),
            options,
            None if masks is None else masks[d],
            training=training,
            reverse=d == 1,
        )
        outputs.append(y)
        h_n.append(h)
        c_n.append(c)
    return (
        torch.cat(outputs, dim=2).to(h0.dtype),
        torch.stack(h_n).to(h0.dtype),
        torch.stack(c_n).to(c0.dtype),
    )


def _to(w: DirectionWeights, dtype: torch.dtype) -> DirectionWeights:
    return DirectionWeights(*(None if p is None else p.to(dtype) for p in w))
