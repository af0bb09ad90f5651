"""One benchmark row start to finish (build, check, warm up, memory, interleaved timing), and a list
of rows, each reported and skipped when it fails."""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

import torch

from .check import FWD_DETAIL, CheckFailed, check_row, check_steps, fwd_bwd_mode
from .impls import FWD, FWD_BWD, build_impls, make_inputs
from .presets import Config
from .report import load_average
from .timing import Budget, Measurement, RowResult, enter_mode, interleaved, measure, peak_memory, timed_call


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
        enter_mode(impls, mode)
        estimates[mode] = []
        for impl, call in zip(impls, calls[mode]):
            estimate = math.inf
            # An automatic repeat count needs one timed call to size itself on.
            for _ in range(max(budget.warmup, 1 if budget.repeats is None else 0)):
                impl.clear_grads(inputs)
                estimate = measure(call, device)
            estimates[mode].append(estimate)

    progress.phase("measuring peak memory")
    enter_mode(impls, FWD_BWD)
    peaks = [peak_memory(impl, inputs, device) for impl in impls]

    result = RowResult(config, oracle=check.oracle)
    _, bwd_detail = fwd_bwd_mode(config)
    for phase, mode in enumerate(modes):
        counts = [budget.repeats_for(e) for e in estimates[mode]]
        samples: list[list[float]] = [[] for _ in impls]
        order = interleaved(counts)
        enter_mode(impls, mode)
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
    result.load_avg_1m = load_average()
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
