"""``fastlstm bench``: time fastlstm's engines against torch.nn.LSTM, in one process, on one device.

For every row (a :class:`~fastlstm.bench_presets.Config`), in this order:

1. **Build** ``torch.nn.LSTM`` (or ``LSTMCell``), one fastlstm module per engine of
   :data:`fastlstm.engines.ENGINES` whose ``supports(device, dtype, options)`` holds, and, for
   rows with variant options, the reference engine and an eager Python loop
   (:mod:`fastlstm.bench_eager`). Plain rows give torch's weights to every module; option rows
   give one fastlstm module's initialisation to the others and the eager loop (torch, which has
   no variants, runs plain at the same shape as a yardstick).
2. **Check** every implementation, at the benchmark shape and dtype, in both timed modes, against
   a float64 oracle: torch.nn.LSTM for plain rows, the reference engine for option rows. Each
   output, final state and gradient must satisfy
   ``err(impl) <= 2 * err(baseline) + floor(dtype)``, where ``err`` is the largest absolute
   difference relative to the oracle's largest element and the baseline is the oracle's own
   implementation run in the benchmark dtype (flash-attention's rule: as accurate as torch is at
   that precision; the floor is 1e-4 in float32, so a float32 row is held to ~1e-4 relative).
   Half-precision option rows take the larger of the reference's error and that of the eager
   loop computing in the row's dtype (the reference computes in float32 inside). Layer-norm rows
   are checked on their first :data:`CHAOTIC_CHECK_STEPS` steps (the model is chaotic).
   A failure aborts the row before anything in it is timed, and makes the command exit 1.
3. **Warm up**, then measure **peak memory** of one forward+backward per implementation.
4. **Time** forward (eval mode, ``torch.no_grad``) and forward+backward (autograd on,
   ``output.sum().backward()``; train mode, or eval mode when an option is stochastic so that
   the runs stay deterministic and comparable), interleaving the implementations' samples.

Shape legend: ``B`` batch, ``T`` steps, ``I`` input features, ``H`` hidden, ``P`` projection,
``H_out = P or H``, ``L`` layers, ``D`` directions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import __version__
from .bench_eager import EagerCell, EagerLSTM
from .bench_presets import PRESETS, Config, Preset, options
from .engines import ENGINES, select_engine
from .modules import LSTM, LSTMCell
from .options import make_options
from .weights import parameter_name

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

# err(impl) <= 2 * err(baseline) + floor: the floor is what a correct engine may differ by when
# the baseline happens to be (nearly) exact, e.g. float32 sums taken in another order.
_CHECK_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

FWD, FWD_BWD = "fwd", "fwd+bwd"
TORCH, ENGINE, EAGER = "torch", "engine", "eager"
_CPU_MEMORY_METHOD = (
    "torch.profiler allocation events of one fwd+bwd, summed in time order to their peak above the "
    "starting level (bytes through torch's CPU allocator; oneDNN/BLAS scratch is not counted)"
)
_CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during one fwd+bwd, minus the starting allocation"


class CheckFailed(RuntimeError):
    """An implementation disagreed with the oracle; its row is not timed."""


# --------------------------------------------------------------------------------------------
# What runs: the implementations of one row and their inputs
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One row's inputs, in one dtype.

    ``x [T, B, I]`` (cell: ``[B, I]``) and, for packed rows, ``packed`` (the same values packed,
    its ``data [N, I]`` a separate leaf) both require grad; ``h0 [L*D, B, H_out]``,
    ``c0 [L*D, B, H]`` (cell: ``[B, H]``) do not. ``lengths [B]`` is on the device.
    """

    x: Tensor
    h0: Tensor
    c0: Tensor
    lengths: Tensor | None = None
    packed: PackedSequence | None = None

    def to(self, dtype: torch.dtype) -> Inputs:
        """The same values in another dtype, as fresh leaves."""
        x = self.x.detach().to(dtype).requires_grad_()
        packed = None
        if self.packed is not None:
            p = self.packed
            data = p.data.detach().to(dtype).requires_grad_()
            packed = PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        return Inputs(x, self.h0.to(dtype), self.c0.to(dtype), self.lengths, packed)


@dataclass
class Impl:
    """One implementation of a row: torch's module, a fastlstm module on one engine, or the eager loop."""

    name: str
    role: str  # TORCH, ENGINE or EAGER
    module: nn.Module
    config: Config
    auto: bool = False  # whether backend="auto" picks this engine for the row

    @property
    def takes_packed(self) -> bool:
        return self.config.packed and self.role != EAGER

    def call(self, inputs: Inputs) -> tuple[Tensor | PackedSequence, Tensor, Tensor]:
        """Run the module: ``(output, h_n, c_n)``; ``output`` is packed when the input is."""
        hx = (inputs.h0, inputs.c0)
        if self.config.kind == "cell":
            h, c = self.module(inputs.x, hx)
            return h, h, c
        if self.role == EAGER:
            y, (h, c) = self.module(inputs.x, hx, inputs.lengths)
        else:
            y, (h, c) = self.module(inputs.packed if self.takes_packed else inputs.x, hx)
        return y, h, c

    def input_leaf(self, inputs: Inputs) -> Tensor:
        return inputs.packed.data if self.takes_packed else inputs.x

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters under torch's / fastlstm's names, so grads compare across implementations."""
        if self.role != EAGER:
            return dict(self.module.named_parameters())
        return _eager_parameters(self.module, self.config)

    def clear_grads(self, inputs: Inputs) -> None:
        self.module.zero_grad(set_to_none=True)
        self.input_leaf(inputs).grad = None


def _eager_parameters(module: nn.Module, config: Config) -> dict[str, nn.Parameter]:
    if config.kind == "cell":
        return module.torch_named_parameters()
    named = {}
    for k, cell in enumerate(module.cells):
        layer, direction = divmod(k, config.directions)
        for fieldname, p in cell.torch_named_parameters().items():
            named[parameter_name(fieldname, layer, direction == 1)] = p
    return named


def _module_kwargs(config: Config) -> dict[str, object]:
    if config.kind == "cell":
        return {}
    return {"num_layers": config.layers, "bidirectional": config.bidirectional, "proj_size": config.proj_size}


def _torch_module(config: Config, device, dtype) -> nn.Module:
    if config.kind == "cell":
        return torch.nn.LSTMCell(config.input_size, config.hidden, device=device, dtype=dtype)
    return torch.nn.LSTM(config.input_size, config.hidden, device=device, dtype=dtype, **_module_kwargs(config))


def _fastlstm_module(config: Config, device, dtype, backend: str) -> nn.Module:
    cls = LSTMCell if config.kind == "cell" else LSTM
    return cls(config.input_size, config.hidden, device=device, dtype=dtype, backend=backend,
               **_module_kwargs(config), **config.options_dict)


def _eager_module(config: Config, device, dtype) -> nn.Module:
    if config.kind == "cell":
        module = EagerCell(config.input_size, config.hidden, **config.options_dict)
    else:
        module = EagerLSTM(config.input_size, config.hidden, **_module_kwargs(config), **config.options_dict)
    return module.to(device=device, dtype=dtype)


def _load_named(target: dict[str, nn.Parameter], source: dict[str, nn.Parameter]) -> None:
    if target.keys() != source.keys():
        raise AssertionError(f"parameter names differ: {sorted(target.keys() ^ source.keys())}")
    with torch.no_grad():
        for name, p in target.items():
            p.copy_(source[name])


def engines_for(config: Config, device: torch.device, requested: list[str] | None = None) -> list[str]:
    """The fastlstm engines a row times, in ``ENGINES`` priority order.

    By default: every engine other than the reference that supports the row, or the reference
    when none does (it is then what ``backend="auto"`` runs). ``requested`` names them instead,
    still keeping only those that support the row. Option rows always add the reference: it is
    their "before" baseline and its float64 twin is their correctness oracle.
    """
    opts = _options(config)
    dtype = DTYPES[config.dtype]
    supported = [name for name, engine in ENGINES.items() if engine.supports(device, dtype, opts)]
    if requested is not None:
        chosen = [name for name in supported if name in requested]
    else:
        chosen = [name for name in supported if name != "reference"]
        if not chosen:
            chosen = ["reference"]
    if config.options and "reference" not in chosen:
        chosen.append("reference")
    return chosen


def _options(config: Config):
    return make_options(has_bias=True, has_projection=config.proj_size > 0, **config.options_dict)


def build_impls(config: Config, device: torch.device, requested: list[str] | None = None) -> list[Impl]:
    """torch first (the baseline of the ratios), then the engines, then (option rows) the eager loop.

    Plain rows give torch's weights to every module. Option rows have no torch weights that fit, so
    the first engine's initialisation goes to the other engines and the eager loop, and torch keeps
    its own (it only gives the plain model's time at the same shape).
    """
    dtype = DTYPES[config.dtype]
    auto = select_engine("auto", device, dtype, _options(config)).name
    torch_name = "torch.nn.LSTMCell" if config.kind == "cell" else "torch.nn.LSTM"
    impls = [Impl(torch_name, TORCH, _torch_module(config, device, dtype), config)]
    impls += [
        Impl(f"fastlstm:{name}", ENGINE, _fastlstm_module(config, device, dtype, name), config, auto=name == auto)
        for name in engines_for(config, device, requested)
    ]
    if config.options:
        impls.append(Impl("eager loop", EAGER, _eager_module(config, device, dtype), config))
    sharing = [impl for impl in impls if impl.role != TORCH or not config.options]
    for impl in sharing[1:]:
        _load_named(impl.named_parameters(), sharing[0].named_parameters())
    return impls


def make_inputs(config: Config, device: torch.device, generator: torch.Generator) -> Inputs:
    """Random inputs and initial states; lengths (packed rows) uniform in ``[T/4, T]``, seeded."""
    dtype = DTYPES[config.dtype]
    h_out = config.proj_size or config.hidden

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if config.kind == "cell":
        return Inputs(randn(config.batch, config.input_size).requires_grad_(), randn(config.batch, h_out),
                      randn(config.batch, config.hidden))
    states = config.layers * config.directions
    # A non-zero initial state makes weight_hh matter from the first step (T = 1 rows included).
    inputs = Inputs(
        randn(config.steps, config.batch, config.input_size).requires_grad_(),
        randn(states, config.batch, h_out),
        randn(states, config.batch, config.hidden),
    )
    if config.packed:
        low = max(1, config.steps // 4)
        lengths = torch.randint(low, config.steps + 1, (config.batch,), generator=generator)
        # The longest sequence spans all T steps, so padded (eager) and packed runs step alike.
        lengths[0] = config.steps
        packed = pack_padded_sequence(inputs.x.detach(), lengths, enforce_sorted=False)
        inputs.packed = PackedSequence(packed.data.requires_grad_(), packed.batch_sizes, packed.sorted_indices,
                                       packed.unsorted_indices)
        inputs.lengths = lengths.to(device)
    return inputs


# --------------------------------------------------------------------------------------------
# Correctness: every implementation against a float64 oracle, before any timing
# --------------------------------------------------------------------------------------------


def fwd_bwd_mode(config: Config) -> tuple[bool, str]:
    """``(train, description)`` of the forward+backward runs of a row."""
    if _options(config).is_stochastic:
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
    impl.module.train(_trains(impl, train))
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
    if config.kind != "cell" and _options(config).layer_norm:
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
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _check_row(impls, inputs, generator)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


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
            floor = _CHECK_FLOOR[torch.float64 if impl.name in in_float64 else dtype]
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
    return replace(impl, module=module)


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


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


def measure(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events around it on a GPU, else the wall clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_call(impl: Impl, inputs: Inputs, mode: str) -> Callable[[], None]:
    """What one timed sample runs: a no-grad forward, or a forward and ``output.sum().backward()``."""
    if mode == FWD:

        def forward() -> None:
            with torch.no_grad():
                impl.call(inputs)

        return forward

    def forward_backward() -> None:
        y, _, _ = impl.call(inputs)
        (y.data if isinstance(y, PackedSequence) else y).sum().backward()

    return forward_backward


def _enter_mode(impls: list[Impl], mode: str) -> None:
    train = mode == FWD_BWD and fwd_bwd_mode(impls[0].config)[0]
    for impl in impls:
        impl.module.train(_trains(impl, train) if mode == FWD_BWD else train)


def _trains(impl: Impl, train: bool) -> bool:
    """Whether a forward+backward run is in train mode. torch's baseline is a plain LSTM without
    dropout, the same function in either mode; its backward runs in train mode, since cuDNN refuses
    a backward in eval mode. (Forward-only runs are in eval mode, torch's too.)"""
    return train or impl.role == TORCH


def interleaved(counts: list[int]) -> list[int]:
    """The order of a phase's samples: implementation ``k``'s ``counts[k]`` samples spread evenly.

    Interleaving puts drift (thermal, other processes) on every implementation alike.
    """
    slots = sorted(((j + 0.5) / n, k) for k, n in enumerate(counts) for j in range(n))
    return [k for _, k in slots]


def peak_memory(impl: Impl, inputs: Inputs, device: torch.device) -> int | None:
    """Peak bytes allocated above the starting level during one forward+backward (grads included)."""
    run = timed_call(impl, inputs, FWD_BWD)
    impl.clear_grads(inputs)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
    else:
        with _quiet_stderr(), torch.autograd.profiler.profile(use_kineto=True, profile_memory=True) as prof:
            run()
        peak = _peak_from_events(prof)
    impl.clear_grads(inputs)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: kineto logs two lines there on every profiler start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_from_events(prof) -> int | None:
    """Running sum of the profiler's CPU allocation (+) and free (-) events in time order, at its peak."""
    from torch.autograd import DeviceType

    try:
        events = prof.kineto_results.events()
        deltas = [
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        ]
    except AttributeError:  # a torch whose profiler exposes no raw events: report no number, not a wrong one
        return None
    level = peak = 0
    for _, nbytes in sorted(deltas, key=lambda d: d[0]):  # stable: same-time events keep their order
        level += nbytes
        peak = max(peak, level)
    return peak


# --------------------------------------------------------------------------------------------
# One row, start to finish
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How many samples to take: ``repeats`` if given, else ``target_s`` / (one call's time), clamped."""

    target_s: float
    min_repeats: int
    max_repeats: int
    warmup: int
    repeats: int | None = None

    def repeats_for(self, estimate_s: float) -> int:
        if self.repeats is not None:
            return self.repeats
        return max(self.min_repeats, min(self.max_repeats, round(self.target_s / max(estimate_s, 1e-9))))


@dataclass
class Measurement:
    """The samples of one implementation in one mode, with what the check and the memory run found."""

    impl: str
    role: str
    auto: bool
    mode: str
    detail: str
    samples_s: list[float]
    peak_bytes: int | None = None  # fwd+bwd only
    check: tuple[float, float] | None = None  # (err, bound); None for torch on option rows (a different model)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_s) * 1e3

    def spread_ms(self) -> dict[str, float]:
        ms = sorted(s * 1e3 for s in self.samples_s)
        q25, _, q75 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0], ms[0], ms[0])
        return {"min_ms": ms[0], "q25_ms": q25, "q75_ms": q75, "max_ms": ms[-1]}


@dataclass
class RowResult:
    config: Config
    measurements: list[Measurement] = field(default_factory=list)
    oracle: str | None = None
    error: str | None = None
    load_avg_1m: float | None = None

    def median(self, mode: str, role: str | None = None, name: str | None = None) -> float | None:
        for m in self.measurements:
            if m.mode == mode and (role is None or m.role == role) and (name is None or m.impl == name):
                return m.median_ms
        return None


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, one line per row otherwise)."""

    def __init__(self, total: int, stream=None, width: int = 20) -> None:
        self.total, self.width = total, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.done, self.label, self.last_draw, self.last_len = 0, "", 0.0, 0

    def row(self, done: int, label: str) -> None:
        self.done, self.label = done, label
        if not self.tty:
            self.stream.write(f"[{done + 1}/{self.total}] {label}\n")
            self.stream.flush()
        self.phase("build")

    def phase(self, text: str, fraction: float = 0.0, force: bool = True) -> None:
        now = time.perf_counter()
        if not self.tty or (not force and now - self.last_draw < 0.1):
            return
        self.last_draw = now
        filled = round(self.width * (self.done + fraction) / max(self.total, 1))
        elapsed = int(now - self.start)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {elapsed // 60}:{elapsed % 60:02d} {self.label}: {text}"
        self.stream.write("\r" + line.ljust(self.last_len))
        self.stream.flush()
        self.last_len = len(line)

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.last_len:
            self.stream.write("\r" + " " * self.last_len + "\r")
            self.last_len = 0


def run_row(
    config: Config, device: torch.device, budget: Budget, progress: Progress,
    engines: list[str] | None = None, seed: int = 0,
) -> RowResult:
    """Check, warm up, measure memory, then time one row. Raises :class:`CheckFailed` before any timing."""
    torch.manual_seed(seed)  # the modules' initialisation
    generator = torch.Generator().manual_seed(seed)
    impls = build_impls(config, device, engines)
    inputs = make_inputs(config, device, generator)
    progress.phase("checking correctness")
    try:
        steps = check_steps(config)
        if steps == config.steps:
            check = check_row(impls, inputs, generator)
        else:
            short = replace(config, steps=steps)
            torch.manual_seed(seed)  # the same weights as the timed modules
            short_generator = torch.Generator().manual_seed(seed)
            check = check_row(build_impls(short, device, engines), make_inputs(short, device, short_generator),
                              short_generator)
            check = replace(check, oracle=f"{check.oracle}, first {steps} of {config.steps} steps (chaotic model)")
    except CheckFailed:
        raise
    except Exception as error:  # an engine that crashes is as unfit to time as a wrong one
        raise CheckFailed(
            f"[{config.label}] crashed during the correctness check: {type(error).__name__}: {error}\n"
            f"{traceback.format_exc()}"
        ) from error

    modes = (FWD, FWD_BWD)
    calls = {mode: [timed_call(impl, inputs, mode) for impl in impls] for mode in modes}
    estimates: dict[str, list[float]] = {}
    progress.phase("warming up")
    for mode in modes:
        _enter_mode(impls, mode)
        estimates[mode] = []
        for impl, call in zip(impls, calls[mode]):
            estimate = math.inf
            # An automatic repeat count needs one timed call to size itself on.
            for _ in range(max(budget.warmup, 1 if budget.repeats is None else 0)):
                impl.clear_grads(inputs)
                estimate = measure(call, device)
            estimates[mode].append(estimate)

    progress.phase("measuring peak memory")
    _enter_mode(impls, FWD_BWD)
    peaks = [peak_memory(impl, inputs, device) for impl in impls]

    result = RowResult(config, oracle=check.oracle)
    _, bwd_detail = fwd_bwd_mode(config)
    for phase, mode in enumerate(modes):
        counts = [budget.repeats_for(e) for e in estimates[mode]]
        samples: list[list[float]] = [[] for _ in impls]
        order = interleaved(counts)
        _enter_mode(impls, mode)
        for done, k in enumerate(order):
            fraction = (phase + done / len(order)) / len(modes)
            progress.phase(f"timing {mode} ({done}/{len(order)})", fraction=fraction, force=False)
            impls[k].clear_grads(inputs)  # outside the timer: every sample allocates fresh grads
            samples[k].append(measure(calls[mode][k], device))
        for k, impl in enumerate(impls):
            result.measurements.append(
                Measurement(
                    impl.name, impl.role, impl.auto, mode, FWD_DETAIL if mode == FWD else bwd_detail, samples[k],
                    peak_bytes=peaks[k] if mode == FWD_BWD else None,
                    check=check.worst.get(impl.name),
                )
            )
    result.load_avg_1m = _load_average()
    return result


def run_rows(
    configs: list[Config], device: torch.device, budget: Budget, engines: list[str] | None = None,
    seed: int = 0, stream=None, on_row: Callable[[list[RowResult]], None] | None = None,
) -> list[RowResult]:
    """Every row in turn; a row whose check fails, or that raises, is reported and skipped.
    ``on_row(results so far)`` runs after each row (e.g. to save them, in case a later row hangs)."""
    progress = Progress(len(configs), stream)
    results = []
    for done, config in enumerate(configs):
        progress.row(done, config.label)
        try:
            results.append(run_row(config, device, budget, progress, engines, seed))
        except CheckFailed as failure:
            progress.message(f"CHECK FAILED: {failure}")
            results.append(RowResult(config, error=str(failure)))
        except RuntimeError as crash:  # e.g. a kernel that failed to compile: the other rows still run
            progress.message(f"FAILED: {crash}")
            results.append(RowResult(config, error=f"raised {type(crash).__name__}: {crash}"))
        if on_row is not None:
            on_row(results)
    progress.done = len(configs)
    progress.phase("done")
    progress.clear()
    return results


# --------------------------------------------------------------------------------------------
# Where and with what: device, versions, git
# --------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"fastlstm": __version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def git_revision() -> tuple[str, bool | None]:
    """``(sha, dirty)`` of the checkout fastlstm runs from; ``("unknown", None)`` for an installed copy."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # A site-packages copy inside some other repository must not report that repository's sha.
    if top is None or Path(top).resolve() / "src" / "fastlstm" != package:
        return "unknown", None
    sha = git("rev-parse", "HEAD") or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    return sha, None if status is None else bool(status)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass
class RunInfo:
    """What every JSON row repeats about the run."""

    device: str
    device_name: str
    threads: int
    versions: dict[str, str | None]
    git_sha: str
    git_dirty: bool | None
    timestamp: str
    preset: str | None

    @classmethod
    def collect(cls, device: torch.device, preset: str | None) -> RunInfo:
        sha, dirty = git_revision()
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(str(device), device_name(device), torch.get_num_threads(), versions(), sha, dirty, now, preset)


# --------------------------------------------------------------------------------------------
# Output: table, JSON rows, plot
# --------------------------------------------------------------------------------------------


def _shape(config: Config) -> dict[str, object]:
    return {"B": config.batch, "T": config.steps if config.kind == "lstm" else 1, "I": config.input_size,
            "H": config.hidden, "layers": config.layers, "directions": config.directions,
            "proj": config.proj_size, "packed": config.packed}


def json_rows(results: list[RowResult], info: RunInfo) -> list[dict[str, object]]:
    """One row per (config, implementation, mode) measurement."""
    rows = []
    for result in results:
        config = result.config
        for m in result.measurements:
            torch_ms = result.median(m.mode, role=TORCH)
            rows.append({
                "preset": info.preset,
                "row": config.label,
                "kind": config.kind,
                "device": info.device,
                "device_name": info.device_name,
                "threads": info.threads,
                "dtype": config.dtype,
                "shape": _shape(config),
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in config.options},
                "engine": m.impl,
                "role": m.role,
                "auto": m.auto,
                "mode": m.mode,
                "mode_detail": m.detail,
                "median_ms": m.median_ms,
                "spread": m.spread_ms(),
                "repeats": len(m.samples_s),
                "us_per_step": m.median_ms * 1e3 / config.steps if config.kind == "lstm" else None,
                "ratio_vs_torch": m.median_ms / torch_ms if torch_ms else None,
                "peak_memory_bytes": m.peak_bytes,
                "peak_memory_method": None if m.mode == FWD else (
                    _CUDA_MEMORY_METHOD if info.device.startswith("cuda") else _CPU_MEMORY_METHOD),
                "check": None if m.check is None else {
                    "oracle": result.oracle, "max_rel_err": m.check[0], "bound": m.check[1]},
                "versions": info.versions,
                "git_sha": info.git_sha,
                "git_dirty": info.git_dirty,
                "timestamp": info.timestamp,
                "load_avg_1m": result.load_avg_1m,
            })
    return rows


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


_LINE = "  {0:<22} {1:>9} {2:<17} {3:>9} {4:<17} {5:>8}  {6:>5} {7:>5}"
_OPTION_LINE = "  {0:>5} {1:>5}  {2:>5} {3:>5}"


def _row_header(with_options: bool) -> list[str]:
    top = _LINE.format("", "fwd", "", "fwd+bwd", "", "", "this/torch", "")
    bottom = _LINE.format("implementation", "median ms", "[min..max]", "median ms", "[min..max]", "peak MB",
                          "fwd", "f+b")
    if with_options:
        top += _OPTION_LINE.format("ref/this", "", "eager/this", "")
        bottom += _OPTION_LINE.format("fwd", "f+b", "fwd", "f+b")
    return [top.rstrip(), bottom]


def _ms(value: float) -> str:
    """Three significant digits without an exponent for anything a benchmark produces."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _impl_line(result: RowResult, fwd: Measurement, bwd: Measurement) -> str:
    cells = [fwd.impl + (" *" if fwd.auto else "")]
    for m in (fwd, bwd):
        spread = m.spread_ms()
        cells += [_ms(m.median_ms), f"[{_ms(spread['min_ms'])}..{_ms(spread['max_ms'])}]"]
    cells.append("-" if bwd.peak_bytes is None else f"{bwd.peak_bytes / 2**20:.3g}")
    if fwd.role == TORCH:
        cells += ["", ""]
    else:
        cells += [_ratio(m.median_ms, result.median(m.mode, role=TORCH)) for m in (fwd, bwd)]
    line = _LINE.format(*cells)
    if fwd.role == ENGINE and result.config.options:
        line += _OPTION_LINE.format(
            *(_ratio(result.median(m.mode, name=other), m.median_ms)
              for other in ("fastlstm:reference", "eager loop") for m in (fwd, bwd))
        )
    return line.rstrip()


def format_table(results: list[RowResult], info: RunInfo) -> str:
    """The printed report: what ran where, then per row one line per implementation."""
    lines = [
        f"fastlstm bench on {info.device} ({info.device_name}), {info.threads} threads; "
        + ", ".join(f"{k} {v}" for k, v in info.versions.items() if v)
        + f"; git {info.git_sha[:12]}{' (dirty)' if info.git_dirty else ''}",
        f"fwd: {FWD_DETAIL}. fwd+bwd: output.sum().backward(), {fwd_bwd_mode(Config(1, 1, 1, 1))[1]}, "
        "or eval mode with autograd in rows marked (eval) that have a stochastic option.",
        "this/torch: time over torch.nn.LSTM's (or LSTMCell's; plain, same shape, same run), < 1 is faster. "
        "ref/this, eager/this: speed-up over the reference engine and the eager loop. "
        "* = the engine backend='auto' picks. peak: allocated during one fwd+bwd.",
        "",
    ]
    for result in results:
        config = result.config
        lines.append(config.label + ("  (eval)" if not fwd_bwd_mode(config)[0] else ""))
        if result.error is not None:
            lines += ["  CHECK FAILED, not timed: " + result.error.splitlines()[0], ""]
            continue
        lines += _row_header(bool(config.options))
        by_impl: dict[str, dict[str, Measurement]] = {}
        for m in result.measurements:
            by_impl.setdefault(m.impl, {})[m.mode] = m
        lines += [_impl_line(result, modes[FWD], modes[FWD_BWD]) for modes in by_impl.values()]
        lines.append("")
    return "\n".join(lines)


def _require_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise SystemExit(
            "fastlstm bench --plot needs matplotlib, which is not installed: pip install 'fastlstm[plot]'"
        ) from error
    return Figure, FigureCanvasAgg


def write_plot(results: list[RowResult], path: Path, info: RunInfo) -> None:
    """A PNG: for each mode, every implementation's time relative to torch's, row by row (log scale)."""
    Figure, FigureCanvasAgg = _require_matplotlib()
    from matplotlib.ticker import FormatStrFormatter
    timed = [r for r in results if r.measurements]
    names = list(dict.fromkeys(m.impl for r in timed for m in r.measurements if m.role != TORCH))
    fig = Figure(figsize=(12, 1.5 + 0.32 * max(len(timed), 1) * max(len(names), 1) / 2))
    FigureCanvasAgg(fig)
    height = 0.8 / max(len(names), 1)
    for column, mode in enumerate((FWD, FWD_BWD)):
        ax = fig.add_subplot(1, 2, column + 1)
        for j, name in enumerate(names):
            ys, ratios = [], []
            for i, result in enumerate(timed):
                mine, base = result.median(mode, name=name), result.median(mode, role=TORCH)
                if mine is not None and base:
                    ys.append(i + (j - (len(names) - 1) / 2) * height)
                    ratios.append(mine / base)
            ax.barh(ys, ratios, height=height, label=name)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))  # 0.5, 2, 3 rather than 5x10^-1, 2x10^0
        ax.set_yticks(range(len(timed)))
        ax.set_yticklabels([r.config.label for r in timed] if column == 0 else [], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time / torch.nn.LSTM time (log; < 1 is faster)")
        ax.set_title(f"{mode}: {FWD_DETAIL if mode == FWD else 'output.sum().backward()'}", fontsize=9)
    fig.axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"fastlstm bench, {info.device_name} ({info.device}), torch {info.versions['torch']}, "
                 f"git {info.git_sha[:12]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_SHAPE_FLAGS = ("batch", "steps", "input_size", "hidden", "layers", "bidirectional", "proj_size", "dtype", "packed",
                "layer_norm", "peephole", "zoneout", "cell_clip", "recurrent_dropout", "weight_drop", "activations")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlstm bench`` flags (shared by ``python -m fastlstm.bench`` and the ``fastlstm`` command)."""
    what = parser.add_argument_group("what to time: a preset, or one shape given by the flags below")
    what.add_argument("--preset", choices=sorted(PRESETS), help="a named list of rows (see --list-presets)")
    what.add_argument("--list-presets", action="store_true", help="print the presets and their rows, then exit")
    what.add_argument("-B", "--batch", type=int)
    what.add_argument("-T", "--steps", type=int)
    what.add_argument("-I", "--input-size", type=int, help="default: the hidden size")
    what.add_argument("-H", "--hidden", type=int)
    what.add_argument("--layers", type=int)
    what.add_argument("--bidirectional", action="store_true", default=None)
    what.add_argument("--proj-size", type=int)
    what.add_argument("--dtype", choices=sorted(DTYPES))
    what.add_argument("--packed", action="store_true", default=None,
                      help="PackedSequence input, lengths uniform in [T/4, T] (seeded)")
    opts = parser.add_argument_group("variant options (fastlstm's keyword arguments)")
    opts.add_argument("--layer-norm", action="store_true", default=None)
    opts.add_argument("--peephole", action="store_true", default=None)
    opts.add_argument("--zoneout", type=float, metavar="Z")
    opts.add_argument("--cell-clip", type=float, metavar="V")
    opts.add_argument("--recurrent-dropout", type=float, metavar="P")
    opts.add_argument("--weight-drop", type=float, metavar="P")
    opts.add_argument("--activations", metavar="GATE,CELL_IN,CELL_OUT", help="e.g. hard_sigmoid,tanh,softsign")
    how = parser.add_argument_group("how")
    how.add_argument("--device", help="cpu, cuda or cuda:N (default: the preset's, else cuda if available)")
    how.add_argument("--engines", metavar="NAMES",
                     help="comma-separated fastlstm engines to time (default: every supporting one but the "
                          "reference, which option rows always add)")
    how.add_argument("--repeats", type=int, metavar="N",
                     help="samples per implementation and mode (default: sized from the preset's time budget)")
    how.add_argument("--warmup", type=int, metavar="N",
                     help="calls per implementation and mode before timing (default: the preset's, 1; with "
                          "automatic repeats at least 1, which sizes them)")
    how.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) first")
    how.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="PATH", help="write one JSON row per measurement")
    out.add_argument("--plot", type=Path, metavar="PATH",
                     help="write a PNG (needs matplotlib: pip install 'fastlstm[plot]')")


def config_from_args(args: argparse.Namespace) -> Config:
    """The single row the shape and option flags describe (defaults: B=16, T=64, H=256, I=H, fp32)."""
    hidden = args.hidden or 256
    opts = {}
    for name in ("layer_norm", "peephole"):
        if getattr(args, name):
            opts[name] = True
    for name in ("zoneout", "cell_clip", "recurrent_dropout", "weight_drop"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.activations:
        opts["activations"] = tuple(a.strip() for a in args.activations.split(","))
    return Config(
        batch=args.batch or 16, steps=args.steps or 64, input_size=args.input_size or hidden, hidden=hidden,
        layers=args.layers or 1, bidirectional=bool(args.bidirectional), proj_size=args.proj_size or 0,
        dtype=args.dtype or "float32", packed=bool(args.packed), options=options(**opts),
    )


def _device(requested: str | None, preset: Preset | None) -> torch.device:
    name = requested or (preset.device if preset is not None else "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"fastlstm bench: device {name!r} requested but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"fastlstm bench: device should be cpu or cuda, got {name!r}")
    return device


def _list_presets() -> str:
    lines = []
    for name, preset in PRESETS.items():
        lines.append(f"{name} ({len(preset.configs)} rows, device {preset.device}): {preset.description}")
        lines += [f"    {config.label}" for config in preset.configs]
    return "\n".join(lines)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``fastlstm bench`` with parsed arguments; 0 if every row passed its check, else 1."""
    if args.list_presets:
        print(_list_presets())
        return 0
    given = [f"--{name.replace('_', '-')}" for name in _SHAPE_FLAGS if getattr(args, name) not in (None, False)]
    if args.preset and given:
        parser.error(f"--preset names its own shapes; drop {', '.join(given)} or the preset")
    preset = PRESETS[args.preset] if args.preset else None
    for flag in ("repeats", "warmup", "threads"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag != "warmup" else 0):
            parser.error(f"--{flag} should be at least {1 if flag != 'warmup' else 0}, got {value}")
    if args.plot is not None:
        _require_matplotlib()  # fail before the run, not after it
    try:
        configs = list(preset.configs) if preset else [config_from_args(args)]
        if not preset:
            _options(configs[0])  # validate the option values with fastlstm's own messages
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    engines = None
    if args.engines:
        engines = [e.strip() for e in args.engines.split(",")]
        unknown = sorted(set(engines) - set(ENGINES))
        if unknown:
            parser.error(f"--engines: unknown {', '.join(unknown)}; this fastlstm has {', '.join(ENGINES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device, preset)
    base = preset or PRESETS["cpu-quick"]
    budget = Budget(base.target_s, base.min_repeats, base.max_repeats,
                    args.warmup if args.warmup is not None else base.warmup, args.repeats)

    info = RunInfo.collect(device, args.preset)
    load = _load_average()
    if load is not None and device.type == "cpu" and load >= 0.5 * (os.cpu_count() or 1):
        print(f"note: 1-minute load average is {load:.2f} on {os.cpu_count()} CPUs; other processes may skew "
              "the timings (the ratios, timed interleaved, suffer least)", file=sys.stderr)
    def save(results: list[RowResult]) -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(json_rows(results, info), indent=1) + "\n")

    results = run_rows(configs, device, budget, engines, args.seed, on_row=save)
    print(format_table(results, info))
    save(results)
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        write_plot(results, args.plot, info)
    failed = [r for r in results if r.error is not None]
    if failed:
        print(f"{len(failed)} of {len(results)} rows failed their correctness check and were not timed:",
              file=sys.stderr)
        for r in failed:
            print(f"  {r.config.label}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlstm bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
