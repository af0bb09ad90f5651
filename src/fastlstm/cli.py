"""The ``fastlstm`` command.

``fastlstm example`` runs a short, self-checking usage example: a model trained with
``torch.nn.LSTM`` loads into ``fastlstm.LSTM`` and gives the same outputs and gradients, then a few
variants run on the same data. ``fastlstm bench`` times fastlstm's engines against torch.nn.LSTM
(:mod:`fastlstm.bench`); ``fastlstm demo`` runs :mod:`fastlstm.demo`. Both are tools apart from the
library, imported only when their command runs, and parse their own arguments.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import __version__
from .modules import LSTM


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run_example(seed: int = 0) -> int:
    torch.manual_seed(seed)
    steps, batch, features, hidden = 12, 4, 8, 16
    x = torch.randn(steps, batch, features, dtype=torch.float64)

    print(f"fastlstm {__version__}, torch {torch.__version__}")
    print(f"input: T={steps}, B={batch}, I={features}; 2 layers, bidirectional, H={hidden}, float64\n")

    theirs = torch.nn.LSTM(features, hidden, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = LSTM(features, hidden, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict(), strict=True)

    x_theirs = x.clone().requires_grad_()
    x_ours = x.clone().requires_grad_()
    y_theirs, (h_theirs, c_theirs) = theirs(x_theirs)
    y_ours, (h_ours, c_ours) = ours(x_ours)
    (y_theirs.sum() + h_theirs.sum() + c_theirs.sum()).backward()
    (y_ours.sum() + h_ours.sum() + c_ours.sum()).backward()

    worst = max(
        _max_diff(y_theirs, y_ours),
        _max_diff(h_theirs, h_ours),
        _max_diff(c_theirs, c_ours),
        _max_diff(x_theirs.grad, x_ours.grad),
        *(_max_diff(p.grad, q.grad) for p, q in zip(theirs.parameters(), ours.parameters())),
    )
    print("torch.nn.LSTM state_dict -> fastlstm.LSTM(strict=True)")
    print(f"  largest difference in outputs, states and every gradient: {worst:.2e}")
    ok = worst <= 1e-10

    print("\nvariants on the same input (eval mode, output norm):")
    variants = {
        "peephole": {"peephole": True},
        "layer_norm": {"layer_norm": True},
        "zoneout=0.1": {"zoneout": 0.1},
        "activations=(hard_sigmoid, tanh, softsign)": {"activations": ("hard_sigmoid", "tanh", "softsign")},
        "coupled_input_forget + clip=3": {"coupled_input_forget": True, "clip": 3.0},
        "proj_size=8, proj_clip=0.5, cell_clip=2": {"proj_size": 8, "proj_clip": 0.5, "cell_clip": 2.0},
    }
    for label, kwargs in variants.items():
        model = LSTM(features, hidden, num_layers=2, bidirectional=True, dtype=torch.float64, **kwargs).eval()
        y, _ = model(x)
        finite = bool(torch.isfinite(y).all())
        ok = ok and finite
        print(f"  {label:<44} output {list(y.shape)}  |y| = {y.norm().item():.4f}")

    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlstm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastlstm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser("example", help="run a short, self-checking usage example")
    example.add_argument("--seed", type=int, default=0)
    # bench and demo parse their own arguments: everything after the command is handed over untouched
    commands.add_parser("bench", add_help=False, help="time fastlstm's engines against torch.nn.LSTM, checked for "
                        "correctness first (fastlstm bench --help for its options)")
    commands.add_parser("demo", add_help=False, help="run the fastlstm demo (fastlstm demo --help for its options)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from . import bench

        return bench.main(rest)
    if args.command == "demo":
        from . import demo

        return demo.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_example(args.seed)


if __name__ == "__main__":
    sys.exit(main())
