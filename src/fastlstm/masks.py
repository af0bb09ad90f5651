"""Random masks for the stochastic options, drawn outside the engines so that runs can be replayed.

Every mask is drawn from torch's default generator on the input's device, so ``torch.manual_seed``
reproduces a run. A module's ``sample_masks(input)`` returns exactly the masks its next
training-mode ``forward(input)`` would draw; passing them back with ``forward(input, masks=...)``
replays that run, and lets a test feed the same masks to an independent oracle.

Shape legend: ``T`` steps, ``B`` batch (in the user's batch order, also for packed input),
``H`` hidden size, ``H_out`` size of ``h`` (the projection size when there is one), ``D``
directions. Masks are time-major whatever ``batch_first`` says.

Mask values:
    zoneout masks are 1 where the state keeps its previous value, else 0;
    dropout masks (recurrent, weight, inter-layer) are 0 or ``1 / (1 - p)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .options import LSTMOptions


@dataclass
class DirectionMasks:
    """The masks of one direction of one layer (or of an LSTMCell call, with ``T = 1``)."""

    zoneout_h: Tensor | None = None  # [T, B, H_out]
    zoneout_c: Tensor | None = None  # [T, B, H]
    recurrent: Tensor | None = None  # [B, H_out]
    weight_hh: Tensor | None = None  # [4H, H_out]


MASK_FIELDS = tuple(f.name for f in fields(DirectionMasks))
"""DirectionMasks' fields in order (a constant: torch.compile traces a loop over it, not ``fields()``)."""


@dataclass
class LSTMMasks:
    """All masks of one ``LSTM`` forward call."""

    layers: list[list[DirectionMasks]] = field(default_factory=list)  # [num_layers][D]
    inter_layer: list[Tensor | None] = field(default_factory=list)  # num_layers - 1 x [T, B, D * H_out]


def _keep_mask(shape, p_keep: float, device, dtype) -> Tensor:
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(p_keep)


def _dropout_mask(shape, p_drop: float, device, dtype) -> Tensor:
    if p_drop >= 1.0:
        return torch.zeros(shape, device=device, dtype=dtype)
    keep = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p_drop)
    return keep.div_(1.0 - p_drop)


def _checked(name: str, mask, shape: tuple[int, ...], device, dtype) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} should be a Tensor of shape {list(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} should have shape {list(shape)}, got {list(mask.shape)}")
    if not mask.is_floating_point():
        raise ValueError(f"{name} should be a floating-point tensor, got dtype {mask.dtype}")
    if mask.device != torch.device(device):
        raise ValueError(f"{name} should be on device {device}, got {mask.device}")
    return mask.to(dtype)


def sample_direction_masks(
    options: LSTMOptions,
    *,
    steps: int,
    batch: int,
    hidden_size: int,
    h_out: int,
    device,
    dtype,
    given: DirectionMasks | None = None,
    name: str = "masks",
) -> DirectionMasks:
    """Draw (or check and keep the ``given``) masks of one direction, in field order."""
    given = given if given is not None else DirectionMasks()
    plan = {
        "zoneout_h": (options.zoneout_h, (steps, batch, h_out), _keep_mask),
        "zoneout_c": (options.zoneout_c, (steps, batch, hidden_size), _keep_mask),
        "recurrent": (options.recurrent_dropout, (batch, h_out), _dropout_mask),
        "weight_hh": (options.weight_drop, (4 * hidden_size, h_out), _dropout_mask),
    }
    out = {}
    for field_name in MASK_FIELDS:
        p, shape, draw = plan[field_name]
        supplied = getattr(given, field_name)
        if p == 0.0:
            if supplied is not None:
                raise ValueError(f"{name}.{field_name} was given but its option is off (probability 0)")
            out[field_name] = None
        elif supplied is not None:
            out[field_name] = _checked(f"{name}.{field_name}", supplied, shape, device, dtype)
        else:
            out[field_name] = draw(shape, p, device, dtype)
    return DirectionMasks(**out)


def sample_masks(
    options: LSTMOptions,
    *,
    num_layers: int,
    num_directions: int,
    dropout: float,
    steps: int,
    batch: int,
    hidden_size: int,
    proj_size: int,
    device,
    dtype,
    given: LSTMMasks | None = None,
    rows: tuple[int, Callable[[Tensor], Tensor]] | None = None,
) -> LSTMMasks:
    """Draw every training-mode mask of an ``LSTM`` call, layer by layer, keeping any ``given`` one.

    Draw order: for each layer, each direction's masks (``DirectionMasks`` field order), then the
    dropout mask on that layer's output if another layer follows. ``rows``: ``(N, padded)`` for a
    call whose sequences differ in length (a PackedSequence, ``lengths=``): the dropout mask is drawn
    over its ``N`` rows, as torch draws it on a PackedSequence's data, and ``padded`` lays it out
    ``[T, B, .]``.
    """
    h_out = proj_size if proj_size > 0 else hidden_size
    if given is not None:
        if len(given.layers) not in (0, num_layers):
            raise ValueError(f"masks.layers should hold {num_layers} layers, got {len(given.layers)}")
        if len(given.inter_layer) not in (0, num_layers - 1):
            raise ValueError(
                f"masks.inter_layer should hold {num_layers - 1} masks, got {len(given.inter_layer)}"
            )
    layers: list[list[DirectionMasks]] = []
    inter_layer: list[Tensor | None] = []
    for layer in range(num_layers):
        given_dirs = given.layers[layer] if given is not None and given.layers else []
        if given_dirs and len(given_dirs) != num_directions:
            raise ValueError(
                f"masks.layers[{layer}] should hold {num_directions} directions, got {len(given_dirs)}"
            )
        layers.append(
            [
                sample_direction_masks(
                    options,
                    steps=steps,
                    batch=batch,
                    hidden_size=hidden_size,
                    h_out=h_out,
                    device=device,
                    dtype=dtype,
                    given=given_dirs[d] if given_dirs else None,
                    name=f"masks.layers[{layer}][{d}]",
                )
                for d in range(num_directions)
            ]
        )
        if layer < num_layers - 1:
            name = f"masks.inter_layer[{layer}]"
            supplied = given.inter_layer[layer] if given is not None and given.inter_layer else None
            shape = (steps, batch, num_directions * h_out)
            if dropout == 0.0:
                if supplied is not None:
                    raise ValueError(f"{name} was given but dropout is 0")
                inter_layer.append(None)
            elif supplied is not None:
                inter_layer.append(_checked(name, supplied, shape, device, dtype))
            elif rows is not None:
                inter_layer.append(rows[1](_dropout_mask((rows[0], shape[-1]), dropout, device, dtype)))
            else:
                inter_layer.append(_dropout_mask(shape, dropout, device, dtype))
    return LSTMMasks(layers=layers, inter_layer=inter_layer)
