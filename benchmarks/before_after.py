"""This fastlstm against an earlier copy of it, on a bench preset's rows, interleaved in one process.

    python benchmarks/before_after.py --old DIR [--preset cpu-quick] [--rounds 11] [--json PATH]

``DIR`` holds the earlier copy as a package named ``fastlstm_old`` (its custom ops renamed, e.g.
``sed -i 's/fastlstm::/fastlstm_old::/; s/ops.fastlstm\\./ops.fastlstm_old./'``). For each row both
modules get the same weights and inputs; one round times each once, forward (eval mode, no_grad)
and forward+backward (autograd on; train mode unless an option is stochastic), in an order that
rotates from round to round; the medians over the rounds and their ratio new / old are printed (< 1: the new is faster).
torch.nn.LSTM is timed in the same rounds as a yardstick of the machine's drift.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time

import torch

from fastlstm.bench.impls import DTYPES, fastlstm_module, make_inputs, torch_module
from fastlstm.bench.presets import PRESETS


def _inputs(config, generator):
    """The row's input as the bench draws it (a PackedSequence for packed rows), without autograd."""
    inputs = make_inputs(config, torch.device("cpu"), generator)
    x = inputs.packed if config.packed else inputs.x
    (x.data if config.packed else x).requires_grad_(False)
    return x


def _calls(module, x, stochastic: bool, config):
    leaf = x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x

    def run():  # (an autocast row's forward runs under autocast, as in fastlstm bench)
        with torch.autocast("cpu", dtype=DTYPES[config.dtype], enabled=config.autocast):
            return module(x)

    def forward():
        module.eval()
        with torch.no_grad():
            run()

    def forward_backward():
        module.train(not stochastic)
        module.zero_grad(set_to_none=True)
        leaf.requires_grad_(True)
        out = run()[0]
        (out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out).sum().backward()
        leaf.requires_grad_(False)
        leaf.grad = None

    return forward, forward_backward


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True)
    parser.add_argument("--preset", default="cpu-quick")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--rows", help="only the rows whose label contains one of these (comma-separated)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.old)
    old = importlib.import_module("fastlstm_old")
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"medians of {args.rounds} interleaved rounds, ms; ratio = new / old")
    configs = PRESETS[args.preset].configs
    if args.rows:
        configs = [c for c in configs if any(part in c.label for part in args.rows.split(","))]
    for config in configs:
        torch.manual_seed(0)
        new_module = fastlstm_module(config)
        old_module = fastlstm_module(config, package=old)
        old_module.load_state_dict(new_module.state_dict())
        yardstick = torch_module(config) if not config.options else None
        x = _inputs(config, torch.Generator().manual_seed(1))
        stochastic = any(name in config.options_dict for name in ("zoneout", "recurrent_dropout", "weight_drop"))
        repeat = 50 if config.kind == "cell" else 1
        implementations = {"new": new_module, "old": old_module} | ({"torch": yardstick} if yardstick else {})
        calls = {name: _calls(m, x, stochastic, config) for name, m in implementations.items()}
        for fwd, fwd_bwd in calls.values():  # warm-up
            fwd(), fwd_bwd(), fwd(), fwd_bwd()
        times = {(name, mode): [] for name in calls for mode in ("fwd", "fwd+bwd")}
        names = list(calls)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotated: no one always runs first
            for mode, k in (("fwd", 0), ("fwd+bwd", 1)):
                for name in order:
                    pair = calls[name]
                    times[name, mode].append(_seconds(lambda: [pair[k]() for _ in range(repeat)]) / repeat)
        medians = {key: statistics.median(t) * 1e3 for key, t in times.items()}
        row = {"row": config.label, "median_ms": {f"{n} {m}": v for (n, m), v in medians.items()},
               "ratio_fwd": medians["new", "fwd"] / medians["old", "fwd"],
               "ratio_fwd_bwd": medians["new", "fwd+bwd"] / medians["old", "fwd+bwd"]}
        rows.append(row)
        yard = (f"  torch {medians['torch', 'fwd']:.3g} / {medians['torch', 'fwd+bwd']:.3g}"
                if yardstick else "")
        print(f"{config.label:<46} fwd {medians['old', 'fwd']:8.3g} -> {medians['new', 'fwd']:8.3g} "
              f"({row['ratio_fwd']:.3f})   fwd+bwd {medians['old', 'fwd+bwd']:8.3g} -> "
              f"{medians['new', 'fwd+bwd']:8.3g} ({row['ratio_fwd_bwd']:.3f}){yard}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
