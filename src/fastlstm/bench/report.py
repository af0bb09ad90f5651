"""What a benchmark run reports: where and with what it ran (device, versions, git), and its rows as
a table, JSON and a plot."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from .check import FWD_DETAIL, fwd_bwd_mode
from .impls import ENGINE, FWD, FWD_BWD, TORCH
from .presets import Config
from .timing import Measurement, RowResult

_CPU_MEMORY_METHOD = (
    "torch.profiler allocation events of one fwd+bwd, summed in time order to their peak above the "
    "starting level (bytes through torch's CPU allocator; oneDNN/BLAS scratch is not counted)"
)
_CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during one fwd+bwd, minus the starting allocation"


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


def cpu_engine_facts() -> dict[str, object] | None:
    """What the CPU engine chose on this machine: its kernels' instruction set, the CPU's AVX-512
    flags, and how each half precision's input projection runs (the rules of engines/cpu/gemm.py)."""
    from ..engines.cpu import gemm, kernels

    if not kernels.available():
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = sorted({w for line in f if line.startswith("flags") for w in line.split() if w.startswith("avx512")})
    except OSError:
        flags = []
    return {"instruction_set": kernels.module().instruction_set(), "avx512_flags": flags,
            "bfloat16_recurrent_products": kernels.module().bfloat16_products(),
            "half_projection": {str(d).removeprefix("torch."): "float32" if gemm.widens(d) else "native"
                                for d in gemm.NATIVE_HALF}}


def git_revision() -> tuple[str, bool | None]:
    """``(sha, dirty)`` of the checkout fastlstm runs from; ``("unknown", None)`` for an installed copy."""
    package = Path(__file__).resolve().parent.parent

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


def load_average() -> float | None:
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
    cpu_engine: dict[str, object] | None = None

    @classmethod
    def collect(cls, device: torch.device, preset: str | None) -> RunInfo:
        sha, dirty = git_revision()
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(str(device), device_name(device), torch.get_num_threads(), versions(), sha, dirty, now, preset,
                   cpu_engine_facts() if device.type == "cpu" else None)


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
                "cpu_engine": info.cpu_engine,
                "dtype": config.dtype,
                "autocast": config.autocast,
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


def require_matplotlib():
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
    Figure, FigureCanvasAgg = require_matplotlib()
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
