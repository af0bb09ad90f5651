"""Correctness before any timing: every implementation of a row against a float64 oracle, held to
fastlstm's one rule (:mod:`fastlstm.testing`: at most twice the error of the baseline computed in the
row's dtype, plus a floor of a few units in the last place), here on errors relative to the oracle's
largest element."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .. import testing
from .impls import DTYPES, EAGER, FWD, FWD_BWD, TORCH, Impl, Inputs, layer_options, trains
from .presets import Config


class CheckFailed(RuntimeError):
    """An implementation disagreed with the oracle; its row is not timed."""


def fwd_bwd_mode(config: Config) -> tuple[bool, str]:
    """``(train, description)`` of the forward+backward runs of a row."""
    if layer_options(config).is_stochastic:
        return False, "eval mode with autograd (stochastic options at their deterministic eval-mode expectation)"
    return True, "train mode, autograd on"


FWD_DETAIL = "eval mode, torch.no_grad"


def _padded(y: Tensor | PackedSequence, steps: int) -> Tensor:
    if isinstance(y, PackedSequence):
        return pad_packed_sequence(y, total_length=steps)[0]
    return y


def _input_grad(impl: Impl, inputs: Inputs) -> Tensor | None:
    grad = impl.input_leaf(inputs).grad
    if grad is None or not impl.takes_packed:
        return grad
    p = inputs.packed
    return pad_packed_sequence(PackedSequence(grad, p.batch_sizes, p.sorted_indices, p.unsorted_indices),
                               total_length=impl.config.steps)[0]


def run_for_check(impl: Impl, inputs: Inputs, mode: str, cotangents: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """Outputs (and in fwd+bwd mode every gradient) of one run, as float64, keyed by name.

    The backward uses random cotangents for the output and both final states, so a wrong
    gradient path through ``h_n`` or ``c_n`` shows too.
    """
    impl.clear_grads(inputs)
    if mode == FWD:
        impl.module.eval()
        with torch.no_grad():
            y, h, c = impl.call(inputs)
        return {"output": _padded(y, impl.config.steps).double(), "h_n": h.double(), "c_n": c.double()}
    train, _ = fwd_bwd_mode(impl.config)
    impl.module.train(trains(impl, train))
    y, h, c = impl.call(inputs)
    y = _padded(y, impl.config.steps)
    g_y, g_h, g_c = (g.to(y.dtype) for g in cotangents)
    ((y * g_y).sum() + (h * g_h).sum() + (c * g_c).sum()).backward()
    result = {"output": y.detach().double(), "h_n": h.detach().double(), "c_n": c.detach().double()}
    result["grad input"] = _input_grad(impl, inputs)
    for name, p in impl.named_parameters().items():
        result[f"grad {name}"] = p.grad
    missing = [name for name, value in result.items() if value is None]
    if missing:
        raise CheckFailed(f"{impl.name} on {impl.config.label}: no gradient for {', '.join(missing)}")
    result = {name: value.double() for name, value in result.items()}
    impl.clear_grads(inputs)
    return result


def relative_error(value: Tensor, oracle: Tensor) -> float:
    """Largest absolute difference relative to the oracle's largest element (NaN if either has NaN)."""
    if value.shape != oracle.shape:
        return math.inf
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    diff = (value - oracle).abs().max().item() if oracle.numel() else 0.0
    return diff / (scale if scale > 0 else 1.0)


@dataclass
class CheckResult:
    oracle: str
    worst: dict[str, tuple[float, float]]  # impl name -> (err, bound) of its tensor closest to failing


# A layer-norm LSTM at the bench's initialisation is chaotic: LN rescales h W_hh to unit variance
# every step, so a perturbation of 1e-7 in the input grew to 95% of the output's largest element
# in 255 steps (float32 reference engine against itself, B=16, H=768). Past a few dozen steps no
# precision's answer can be checked against float64 (the reference's own bfloat16 error reached 54%
# at step 64), so such rows are checked on their first steps: every kernel path still runs.
CHAOTIC_CHECK_STEPS = 16


def check_steps(config: Config) -> int:
    """How many steps of a row the correctness check runs: all of them, unless the row's model is
    chaotic (layer norm; see :data:`CHAOTIC_CHECK_STEPS`)."""
    if config.kind != "cell" and layer_options(config).layer_norm:
        return min(config.steps, CHAOTIC_CHECK_STEPS)
    return config.steps


def check_row(impls: list[Impl], inputs: Inputs, generator: torch.Generator) -> CheckResult:
    """Compare every implementation with the float64 oracle; raise :class:`CheckFailed` on a mismatch.

    The baseline (whose float64 twin is the oracle) is torch for plain rows and the reference
    engine for option rows; torch is not checked on option rows (it runs a different, plain model).
    The eager loop computes in the row's dtype throughout (fastlstm keeps float32 inside half
    precision calls), so at half precision its math is checked in float64 instead: its rounding
    there is what users of such a loop get, not a bug. That same rounding is the half-precision
    option rows' baseline error: the reference engine computes in float32 inside a bfloat16 call,
    which is not torch's accuracy at that precision (flash-attention's rule); an engine's bound there
    is ``2 * max(err(reference), err(eager loop in the row dtype)) + floor``.
    """
    # The check is of the math: float32 products are IEEE in every implementation while it runs
    # (torch.nn.LSTM's cuDNN recurrence and fastlstm's Triton kernels would otherwise take TF32,
    # torch's default, and the reference engine's matmuls would not). Timing keeps the user's setting.
    # (cudnn's flags() context, not an assignment: torch's test utilities forbid bare assignments
    # to these flags once imported, and a test process may have imported them)
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        return _check_row(impls, inputs, generator)


def _check_row(impls: list[Impl], inputs: Inputs, generator: torch.Generator) -> CheckResult:
    config = impls[0].config
    dtype = DTYPES[config.dtype]
    if config.options:
        baseline = next(i for i in impls if i.name == "fastlstm:reference")
        checked = [i for i in impls if i.role != TORCH]
    else:
        baseline, checked = impls[0], impls
    cotangents = _cotangents(config, generator, inputs.x.device)
    wide = inputs.to(torch.float64)
    oracle = _outputs(_float64_twin(baseline), wide, cotangents)
    in_float64 = {i.name for i in checked if i.role == EAGER and dtype in (torch.float16, torch.bfloat16)}
    errors = {
        i.name: _errors(
            _outputs(_float64_twin(i), wide, cotangents) if i.name in in_float64 else _outputs(i, inputs, cotangents),
            oracle,
        )
        for i in checked
    }

    eager_in_dtype = {}
    if in_float64:
        eager = next(i for i in checked if i.name in in_float64)
        eager_in_dtype = _errors(_outputs(eager, inputs, cotangents), oracle)

    worst: dict[str, tuple[float, float]] = {}
    for impl in checked:
        for (mode, name), err in errors[impl.name].items():
            base, base_name = errors[baseline.name][mode, name], baseline.name
            # (a NaN or inf of the half-precision loop leaves the reference's error as the baseline)
            loop_err = eager_in_dtype.get((mode, name), 0.0)
            if impl.name not in in_float64 and math.isfinite(loop_err) and loop_err > base:
                base, base_name = loop_err, f"the eager loop in {config.dtype}"
            if impl.name in in_float64:
                base = 0.0
            floor = testing.relative_floor(torch.float64 if impl.name in in_float64 else dtype)
            bound = 2 * base + floor
            if not err <= bound:  # also catches NaN
                raise CheckFailed(
                    f"{impl.name} is wrong on [{config.label}] ({mode}): {name} differs from the float64 "
                    f"{baseline.name} oracle by {err:.3g} relative to its largest element; the bound is "
                    f"{bound:.3g} = 2 x {base_name}'s own error {base:.3g} + {floor:g}. Not timing this row."
                )
            if impl.name not in worst or err / bound > worst[impl.name][0] / worst[impl.name][1]:
                worst[impl.name] = (err, bound)
    return CheckResult(f"float64 {baseline.name}", worst)


def _float64_twin(impl: Impl) -> Impl:
    module = copy.deepcopy(impl.module).double()
    if isinstance(module, nn.LSTM):
        module.flatten_parameters()  # cuDNN otherwise re-packs (and warns about) the converted weights
    return replace(impl, module=module, config=replace(impl.config, autocast=False))


def _outputs(impl: Impl, inputs: Inputs, cotangents) -> dict[tuple[str, str], Tensor]:
    """Both modes' outputs (and gradients), keyed by ``(mode, name)``."""
    return {
        (mode, name): value
        for mode in (FWD, FWD_BWD)
        for name, value in run_for_check(impl, inputs, mode, cotangents).items()
    }


def _errors(result: dict, oracle: dict) -> dict[tuple[str, str], float]:
    return {key: relative_error(result[key], value) if key in result else math.inf for key, value in oracle.items()}


def _cotangents(config: Config, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    h_out = config.proj_size or config.hidden
    if config.kind == "cell":
        shapes = [(config.batch, h_out), (config.batch, h_out), (config.batch, config.hidden)]
    else:
        states = config.layers * config.directions
        shapes = [(config.steps, config.batch, config.directions * h_out), (states, config.batch, h_out),
                  (states, config.batch, config.hidden)]
    return tuple(torch.randn(*s, generator=generator, dtype=torch.float64).to(device) for s in shapes)
