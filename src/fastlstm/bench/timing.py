"""Timing and memory: one sample of an implementation, the interleaved order of samples, and the
peak memory of one forward+backward."""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import PackedSequence

from .check import fwd_bwd_mode
from .impls import FWD, FWD_BWD, Impl, Inputs, trains
from .presets import Config


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


def enter_mode(impls: list[Impl], mode: str) -> None:
    train = mode == FWD_BWD and fwd_bwd_mode(impls[0].config)[0]
    for impl in impls:
        impl.module.train(trains(impl, train) if mode == FWD_BWD else train)


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
