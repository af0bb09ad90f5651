"""What "correct" means for fastlstm, written once, and the random layers and inputs its tests use.

Used by ``tests/``, ``gpu_tests/`` and the benchmark's correctness check (:mod:`fastlstm.bench`).

The rule (flash-attention's, for any precision below float64): a result may be off the float64 truth
by at most twice as much as a trusted computation at the same precision (torch's own ops, or the
reference engine), plus a floor of a few units in the last place at the truth's scale, because at
that point both errors are rounding noise and one lucky rounding of the trusted result would make
the ratio meaningless::

    error(ours) <= 2 * error(base) + ULPS[dtype] * eps(dtype) * max(1, max |truth|)

Shape legend as in :mod:`fastlstm.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import DirectionMasks, sample_direction_masks
from .options import LSTMOptions, make_options
from .weights import DirectionWeights, direction_shapes

# The floor in units of the dtype's epsilon, at the truth's scale. float32: the errors of long
# recurrences are a few ulps of the largest value (gradients summed over every token reach 10-20);
# 16-bit floats: one ulp is already 0.1-0.8% of the value, and torch's own error is many of them.
# float64 is its own truth: where two float64 implementations are compared the trusted one is the
# oracle itself (error 0), and a long recurrence's sums taken in another order differ by up to
# 2^20 ulps (2.3e-10, the float64 tolerance of the tests).
ULPS = {torch.float64: 1 << 20, torch.float32: 16, torch.float16: 2, torch.bfloat16: 2}


def error(value: Tensor, truth: Tensor) -> float:
    """The largest absolute difference, computed in float64."""
    if value.numel() == 0:
        return 0.0
    return (value.double() - truth.double()).abs().max().item()


def relative_floor(dtype: torch.dtype) -> float:
    """The floor relative to the truth's largest value (for errors already divided by it)."""
    return ULPS[dtype] * torch.finfo(dtype).eps


def floor(dtype: torch.dtype, truth: Tensor) -> float:
    scale = truth.abs().max().item() if truth.numel() else 0.0
    return relative_floor(dtype) * max(1.0, scale)


def bound(base: Tensor, truth: Tensor, dtype: torch.dtype | None = None) -> float:
    """The most ``ours`` may be off ``truth`` where ``base`` is the trusted result in ``dtype``."""
    return 2 * error(base, truth) + floor(dtype or base.dtype, truth)


def assert_within_twice(ours: Tensor, base: Tensor, truth: Tensor, *, name: str = "",
                        dtype: torch.dtype | None = None) -> None:
    """The rule above, with a message that names the tensor and gives both errors."""
    limit = bound(base, truth, dtype or ours.dtype)
    err = error(ours, truth)
    assert err <= limit, (f"{name}: error {err:.3g} against float64, above twice the trusted result's "
                          f"({error(base, truth):.3g}) plus the floor ({floor(dtype or ours.dtype, truth):.3g})")


# -- random layers and inputs ----------------------------------------------------------------------

OPTIONS = {
    "plain": {},
    "activations": dict(activations=("hard_sigmoid", "softsign", "relu")),
    "activations2": dict(activations=("tanh", "hardsigmoid", "hard_sigmoid")),
    "peephole": dict(peephole=True),
    "clip": dict(clip=0.4),
    "coupled": dict(coupled_input_forget=True),
    "coupled-peephole-clip": dict(coupled_input_forget=True, peephole=True, clip=0.8),
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=(0.3, 0.6)),
    "zoneout_h_only": dict(zoneout=(0.4, 0.0)),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "weight_drop": dict(weight_drop=0.4),
    "cell_clip": dict(cell_clip=0.3),
    "everything": dict(
        activations=("sigmoid", "tanh", "softsign"), peephole=True, clip=1.5, layer_norm=True,
        zoneout=(0.2, 0.3), recurrent_dropout=0.3, weight_drop=0.3, cell_clip=0.8,
    ),
}
"""Option sets every engine is tested with, by name."""

ARCHS = {
    "uni": dict(directions=1, proj=0, bias=True),
    "bi-proj": dict(directions=2, proj=3, bias=True),
    "bi-nobias": dict(directions=2, proj=0, bias=False),
    "uni-proj-nobias": dict(directions=1, proj=2, bias=False),
}
"""Layer architectures (directions, projection size, bias) every engine is tested with."""


def make_layer(arch: dict, cfg: dict, *, input_size: int = 4, hidden: int = 5, dtype: torch.dtype = torch.float64,
               seed: int = 0) -> tuple[LSTMOptions, list[DirectionWeights]]:
    """Random weights for one layer (every direction) with the options' parameters, as leaves that
    require grad; layer-norm gains near 1. With ``cell_clip`` and a projection, ``proj_clip`` too."""
    g = torch.Generator().manual_seed(seed)
    options = make_options(**cfg, has_bias=arch["bias"], has_projection=arch["proj"] > 0,
                           proj_clip=0.2 if (arch["proj"] and "cell_clip" in cfg) else None)
    shapes = direction_shapes(input_size, hidden, arch["proj"], bias=arch["bias"], peephole=options.peephole,
                              layer_norm=options.layer_norm)
    weights = []
    for _ in range(arch["directions"]):
        params = {}
        for name, shape in shapes.items():
            scale = 0.3 if name.startswith("layer_norm") else 0.6
            base = 1.0 if name.startswith("layer_norm") and "bias" not in name else 0.0
            params[name] = (base + scale * (2 * torch.rand(shape, generator=g, dtype=dtype) - 1)).requires_grad_()
        weights.append(DirectionWeights(**params))
    return options, weights


def layer_inputs(arch: dict, cfg: dict, dtype: torch.dtype, *, steps: int = 6, batch: int = 4, training: bool = False,
                 hidden: int = 5, input_size: int = 4, seed: int = 1):
    """``(options, weights, x [T, B, I], h0, c0, masks)`` of one random layer; ``masks`` (one
    ``DirectionMasks`` per direction) only in training with a stochastic option."""
    options, weights = make_layer(arch, cfg, dtype=dtype, hidden=hidden, input_size=input_size)
    d, h_out = arch["directions"], arch["proj"] or hidden
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, input_size, generator=g, dtype=dtype).requires_grad_()
    h0 = torch.randn(d, batch, h_out, generator=g, dtype=dtype).requires_grad_()
    c0 = torch.randn(d, batch, hidden, generator=g, dtype=dtype).requires_grad_()
    masks: list[DirectionMasks] | None = None
    if training and options.is_stochastic:
        masks = [sample_direction_masks(options, steps=steps, batch=batch, hidden_size=hidden, h_out=h_out,
                                        device="cpu", dtype=dtype) for _ in range(d)]
    return options, weights, x, h0, c0, masks


def outputs_and_gradients(layer, x, lengths, h0, c0, weights, options, masks, training, *, seed: int = 9) -> list[Tensor]:
    """``[y, h_n, c_n, dx, dh0, dc0, *every present weight's gradient]`` of ``layer`` (the signature
    of :func:`fastlstm.reference.lstm_layer`) under random cotangents on every output (drawn in
    float64, so that every dtype gets the same ones); padding of ``y`` must be zero."""
    leaves = [x, h0, c0] + [p for w in weights for p in w if p is not None]
    y, h, c = layer(x, lengths, h0, c0, weights, options, masks, training=training)
    if lengths is not None:
        valid = (torch.arange(x.shape[0]).unsqueeze(1) < lengths).unsqueeze(-1)
        assert (y.masked_select(~valid) == 0).all(), "padding of the output must be zero"
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in (y, h, c))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [y, h, c] + [torch.zeros_like(leaf) if gr is None else gr for gr, leaf in zip(grads, leaves)]


def gradient_names(weights: list[DirectionWeights]) -> list[str]:
    """The names of :func:`outputs_and_gradients`' entries."""
    return ["output", "h_n", "c_n", "x", "h0", "c0"] + [
        f"dir{k}.{f}" for k, w in enumerate(weights) for f, p in zip(DirectionWeights._fields, w) if p is not None
    ]
