"""The LSTM variant options: validated once, immutable.

Every option defaults to the value that reproduces ``torch.nn.LSTM`` exactly. Engines read an
:class:`LSTMOptions` but never parse user arguments; the modules build it once, through
:func:`make_options`, which raises a clear error that names the offending argument.

The equations of every option are in ``docs/equations.md``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

GATE_ACTIVATIONS = ("sigmoid", "hard_sigmoid", "tanh", "softsign", "relu", "hardsigmoid")
"""Names accepted by ``activations``; the same set is accepted in each of the three slots."""

DEFAULT_ACTIVATIONS = ("sigmoid", "tanh", "tanh")


@dataclass(frozen=True)
class LSTMOptions:
    """The variant options of one LSTM or LSTMCell, already validated.

    Attributes:
        activations: functions for (gates i, f, o), (cell input g), (cell output).
        peephole: add ``p * c`` to the i, f (with ``c_{t-1}``) and o (with ``c_t``) pre-activations.
        clip: clip every gate pre-activation to ``[-clip, clip]`` (after the peephole term).
        coupled_input_forget: ``f = 1 - i``.
        layer_norm: layer-normalise the two gate products and the cell output.
        zoneout: ``(z_h, z_c)``, probabilities of keeping the previous h and c.
        recurrent_dropout: drop probability of the per-sequence mask on ``h_{t-1}``.
        weight_drop: DropConnect probability on ``weight_hh``, one mask per forward call.
        cell_clip: clip ``c_t`` to ``[-cell_clip, cell_clip]`` after its update.
        proj_clip: clip the projected ``h_t`` to ``[-proj_clip, proj_clip]``.
        forget_bias: initial value of the forget slice of ``bias_ih`` (``bias_hh``'s slice is 0).
    """

    activations: tuple[str, str, str] = DEFAULT_ACTIVATIONS
    peephole: bool = False
    clip: float | None = None
    coupled_input_forget: bool = False
    layer_norm: bool = False
    zoneout: tuple[float, float] = (0.0, 0.0)
    recurrent_dropout: float = 0.0
    weight_drop: float = 0.0
    cell_clip: float | None = None
    proj_clip: float | None = None
    forget_bias: float | None = None

    @property
    def zoneout_h(self) -> float:
        return self.zoneout[0]

    @property
    def zoneout_c(self) -> float:
        return self.zoneout[1]

    @property
    def has_zoneout(self) -> bool:
        return self.zoneout != (0.0, 0.0)

    @property
    def is_stochastic(self) -> bool:
        """Whether training-mode forward draws random masks (besides inter-layer dropout)."""
        return self.has_zoneout or self.recurrent_dropout > 0 or self.weight_drop > 0

    def non_defaults(self) -> dict[str, object]:
        """The options that differ from their default, in declaration order (for ``extra_repr``)."""
        default = LSTMOptions()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _probability(name: str, value, *, allow_one: bool = True) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} should be a number in [0, 1], got: {type(value).__name__}")
    value = float(value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 <= value and upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} should be a number in {bound}, got {value}")
    return value


def _positive_or_none(name: str, value) -> float | None:
    if value is None:
        return None
    if not _is_real(value):
        raise TypeError(f"{name} should be None or a positive number, got: {type(value).__name__}")
    value = float(value)
    if not value > 0.0:  # also rejects NaN
        raise ValueError(f"{name} should be None or a positive number, got {value}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    return value


def make_options(
    *,
    activations=DEFAULT_ACTIVATIONS,
    peephole=False,
    clip=None,
    coupled_input_forget=False,
    layer_norm=False,
    zoneout=0.0,
    recurrent_dropout=0.0,
    weight_drop=0.0,
    cell_clip=None,
    proj_clip=None,
    forget_bias=None,
    has_bias: bool = True,
    has_projection: bool = False,
) -> LSTMOptions:
    """Validate user-facing option values and return the immutable :class:`LSTMOptions`.

    ``has_bias`` and ``has_projection`` describe the layer the options are for, so that options
    that cannot take effect (``forget_bias`` without biases, ``proj_clip`` without a projection)
    are refused instead of silently ignored.
    """
    if isinstance(activations, str) or not isinstance(activations, (tuple, list)):
        raise TypeError(
            "activations should be a sequence of 3 names (gates, cell input, cell output), "
            f"got: {type(activations).__name__}"
        )
    if len(activations) != 3:
        raise ValueError(
            "activations should hold 3 names (gates i/f/o, cell input g, cell output), "
            f"got {len(activations)}"
        )
    for slot, name in zip(("gates", "cell input", "cell output"), activations):
        if name not in GATE_ACTIVATIONS:
            raise ValueError(
                f"activations: unknown {slot} activation {name!r}; "
                f"expected one of {', '.join(GATE_ACTIVATIONS)}"
            )

    if _is_real(zoneout):
        zoneout_pair = (zoneout, zoneout)
    elif isinstance(zoneout, (tuple, list)) and len(zoneout) == 2:
        zoneout_pair = tuple(zoneout)
    else:
        raise TypeError(
            f"zoneout should be a number or a pair (z_h, z_c), got: {type(zoneout).__name__}"
        )
    zoneout_pair = (
        _probability("zoneout (z_h)", zoneout_pair[0]),
        _probability("zoneout (z_c)", zoneout_pair[1]),
    )

    if forget_bias is not None:
        if not _is_real(forget_bias):
            raise TypeError(
                f"forget_bias should be None or a number, got: {type(forget_bias).__name__}"
            )
        forget_bias = float(forget_bias)
        if forget_bias != forget_bias:
            raise ValueError("forget_bias should be None or a finite number, got nan")
        if not has_bias:
            raise ValueError("forget_bias needs bias=True: there is no bias to initialise")
        if coupled_input_forget is True:
            raise ValueError("forget_bias has no effect with coupled_input_forget=True (f = 1 - i)")

    proj_clip = _positive_or_none("proj_clip", proj_clip)
    if proj_clip is not None and not has_projection:
        raise ValueError("proj_clip needs proj_size > 0: there is no projection to clip")

    return LSTMOptions(
        activations=tuple(activations),
        peephole=_flag("peephole", peephole),
        clip=_positive_or_none("clip", clip),
        coupled_input_forget=_flag("coupled_input_forget", coupled_input_forget),
        layer_norm=_flag("layer_norm", layer_norm),
        zoneout=zoneout_pair,
        recurrent_dropout=_probability("recurrent_dropout", recurrent_dropout),
        weight_drop=_probability("weight_drop", weight_drop),
        cell_clip=_positive_or_none("cell_clip", cell_clip),
        proj_clip=proj_clip,
        forget_bias=forget_bias,
    )
