"""The parameters of one layer direction, as engines see them, and the names modules give them.

Shape legend: ``I`` input features, ``H`` hidden size, ``P`` projection size,
``H_out = P if P > 0 else H`` (the size of ``h``), ``G = 4`` gates in the order ``i, f, g, o``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DirectionWeights(NamedTuple):
    """One direction of one layer. Unused parameters are ``None``.

    The field order is the registration order: torch's five first, then the variants'.
    """

    weight_ih: Tensor  # [4H, I]
    weight_hh: Tensor  # [4H, H_out]
    bias_ih: Tensor | None = None  # [4H]
    bias_hh: Tensor | None = None  # [4H]
    weight_hr: Tensor | None = None  # [P, H]
    weight_peephole: Tensor | None = None  # [3H], ordered (i, f, o)
    layer_norm_ih_weight: Tensor | None = None  # [4H]
    layer_norm_hh_weight: Tensor | None = None  # [4H]
    layer_norm_cell_weight: Tensor | None = None  # [H]
    layer_norm_cell_bias: Tensor | None = None  # [H]


TORCH_FIELDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
"""Fields that ``torch.nn.LSTM`` also has, under the same names."""


def direction_shapes(
    input_size: int,
    hidden_size: int,
    proj_size: int,
    *,
    bias: bool,
    peephole: bool,
    layer_norm: bool,
) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter a direction owns, keyed by field, in registration order."""
    gates = 4 * hidden_size
    h_out = proj_size if proj_size > 0 else hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "weight_ih": (gates, input_size),
        "weight_hh": (gates, h_out),
    }
    if bias:
        shapes["bias_ih"] = (gates,)
        shapes["bias_hh"] = (gates,)
    if proj_size > 0:
        shapes["weight_hr"] = (proj_size, hidden_size)
    if peephole:
        shapes["weight_peephole"] = (3 * hidden_size,)
    if layer_norm:
        shapes["layer_norm_ih_weight"] = (gates,)
        shapes["layer_norm_hh_weight"] = (gates,)
        shapes["layer_norm_cell_weight"] = (hidden_size,)
        shapes["layer_norm_cell_bias"] = (hidden_size,)
    return shapes


def parameter_name(field: str, layer: int | None, reverse: bool) -> str:
    """torch's naming: ``weight_ih_l0``, ``weight_hh_l1_reverse``; a cell (``layer=None``) has no suffix."""
    if layer is None:
        return field
    return f"{field}_l{layer}{'_reverse' if reverse else ''}"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype engines compute and keep the cell state in: at least float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def names_by_field(shapes: dict, layer: int | None, reverse: bool) -> tuple[str | None, ...]:
    """Each DirectionWeights field's parameter name (None where ``shapes`` has no such parameter)."""
    return tuple(parameter_name(f, layer, reverse) if f in shapes else None for f in DirectionWeights._fields)


def shapes_by_field(shapes: dict) -> tuple:
    """Each DirectionWeights field's shape (None where ``shapes`` has no such parameter)."""
    return tuple(shapes.get(f) for f in DirectionWeights._fields)
