"""A training step of a model containing fastlstm, eager against ``torch.compile(fullgraph=True)``.

The model: a 2-layer ``fastlstm.LSTM`` (I = H = 256 by default) and a linear read-out; one step is
forward, a mean-squared loss, backward and an SGD update. Eager and compiled steps run interleaved in
one process, several rounds; the median of each is reported with their ratio (the architecture
issue's target: compiled at most 1.05x eager on the CPU engine). ``--old PATH`` also times another
copy of fastlstm (a directory holding a package ``fastlstm_old``), for before/after in one process.

    python benchmarks/compile_step.py [--batch 16 --steps 64 --hidden 256 --rounds 15] [--json PATH]
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


def model_of(package, hidden: int, layers: int, backend: str) -> torch.nn.Module:
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = package.LSTM(hidden, hidden, num_layers=layers, backend=backend)
            self.head = torch.nn.Linear(hidden, hidden)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.head(y)

    return Model()


def step_fn(model: torch.nn.Module, forward, x: torch.Tensor, target: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(forward(x), target)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--old", help="a directory with an older copy of fastlstm as package fastlstm_old")
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args(argv)

    packages = {"fastlstm": importlib.import_module("fastlstm")}
    if args.old:
        sys.path.insert(0, args.old)
        packages["old"] = importlib.import_module("fastlstm_old")
    torch.manual_seed(0)
    x = torch.randn(args.steps, args.batch, args.hidden)
    target = torch.randn(args.steps, args.batch, args.hidden)
    steps = {}
    for label, package in packages.items():
        model = model_of(package, args.hidden, args.layers, args.backend)
        steps[f"{label} eager"] = step_fn(model, model, x, target)
        compiled = torch.compile(model, fullgraph=True)
        steps[f"{label} compiled"] = step_fn(model, compiled, x, target)
    for step in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"{args.layers} layers, B={args.batch} T={args.steps} I=H={args.hidden}, float32, {args.rounds} rounds")
    for name, ms in medians.items():
        print(f"  {name:<22} {ms:8.2f} ms per training step")
    for label in packages:
        print(f"  {label}: compiled / eager = {medians[f'{label} compiled'] / medians[f'{label} eager']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_ms": medians, "times_s": times, "torch": torch.__version__}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
