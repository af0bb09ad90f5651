"""``fastlstm bench``'s command line: a preset or one shape from the flags, then the run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from ..engines import BACKENDS
from .impls import DTYPES, layer_options
from .presets import PRESETS, Config, Preset, options
from .report import RunInfo, format_table, json_rows, load_average, require_matplotlib, write_plot
from .run import run_rows
from .timing import Budget, RowResult

DESCRIPTION = "time fastlstm's engines against torch.nn.LSTM, in one process, on one device"
STREAMING = "streaming"  # (a preset of its own kind: per-step latency, bench/streaming.py)


_SHAPE_FLAGS = ("batch", "steps", "input_size", "hidden", "layers", "bidirectional", "proj_size", "dtype", "packed",
                "autocast", "layer_norm", "peephole", "zoneout", "cell_clip", "recurrent_dropout", "weight_drop",
                "activations")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlstm bench`` flags (shared by ``python -m fastlstm.bench`` and the ``fastlstm`` command)."""
    what = parser.add_argument_group("what to time: a preset, or one shape given by the flags below")
    what.add_argument("--preset", choices=sorted([*PRESETS, STREAMING]),
                      help="a named list of rows (see --list-presets)")
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
    what.add_argument("--autocast", action="store_true", default=None,
                      help="float32 modules and inputs, each forward under torch.autocast to --dtype")
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
        autocast=bool(args.autocast),
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
    lines.append(f"{STREAMING} (device cpu): per-step latency of streaming inference, T = 1, 2 layers, I = 40, "
                 "H in {128, 256, 512}, one thread: torch.nn.LSTM, fastlstm.LSTM, LSTM.step (B = 1 and 64 streams), "
                 "LSTMCell per layer, onnxruntime on both exported graphs (--repeats: rounds, default 15)")
    return "\n".join(lines)


def _run_streaming(args: argparse.Namespace) -> int:
    from . import streaming

    info = RunInfo.collect(torch.device("cpu"), STREAMING)
    report = streaming.run(rounds=args.repeats or 15)
    engine = info.cpu_engine or {}
    print(streaming.format_report(report, f"{info.device_name}, kernels {engine.get('instruction_set')}, "
                                          f"torch {torch.__version__}"))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**dataclasses.asdict(info), **report}, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``fastlstm bench`` with parsed arguments; 0 if every row passed its check, else 1."""
    if args.list_presets:
        print(_list_presets())
        return 0
    given = [f"--{name.replace('_', '-')}" for name in _SHAPE_FLAGS if getattr(args, name) not in (None, False)]
    if args.preset and given:
        parser.error(f"--preset names its own shapes; drop {', '.join(given)} or the preset")
    if args.autocast and args.dtype not in ("bfloat16", "float16"):
        parser.error("--autocast runs float32 modules in a lower precision: add --dtype bfloat16 or float16")
    if args.preset == STREAMING:
        return _run_streaming(args)
    preset = PRESETS[args.preset] if args.preset else None
    for flag in ("repeats", "warmup", "threads"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag != "warmup" else 0):
            parser.error(f"--{flag} should be at least {1 if flag != 'warmup' else 0}, got {value}")
    if args.plot is not None:
        require_matplotlib()  # fail before the run, not after it
    try:
        configs = list(preset.configs) if preset else [config_from_args(args)]
        if not preset:
            layer_options(configs[0])  # validate the option values with fastlstm's own messages
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    engines = None
    if args.engines:
        engines = [e.strip() for e in args.engines.split(",")]
        unknown = sorted(set(engines) - set(BACKENDS[1:]))
        if unknown:
            parser.error(f"--engines: unknown {', '.join(unknown)}; this fastlstm has {', '.join(BACKENDS[1:])}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device, preset)
    base = preset or PRESETS["cpu-quick"]
    budget = Budget(base.target_s, base.min_repeats, base.max_repeats,
                    args.warmup if args.warmup is not None else base.warmup, args.repeats)

    info = RunInfo.collect(device, args.preset)
    load = load_average()
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
    parser = argparse.ArgumentParser(prog="fastlstm bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
