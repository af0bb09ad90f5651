"""How fast can any LSTM engine be at one shape on this CPU? Time the GEMMs that every
forward+backward must run, alone, next to fastlstm's CPU engine and the reference engine.

    python benchmarks/gemm_floor.py [-B 16] [-T 64] [-H 256] [-I H] [--repeats 15] [--json PATH]

One LSTM layer's forward+backward is six GEMMs of the same size (2 * T*B * 4H * (I or H) flops
each): the input projection ``X W_ih^T``, the T recurrent products ``h_{t-1} W_hh^T``, the T
backward products ``dgates_t W_hh``, and ``dW_hh``, ``dW_ih``, ``dx`` over all steps. The floor is
those six timed with torch's own GEMMs (``torch.mm``, BLAS/oneDNN), nothing else. An engine whose
GEMMs run at torch's speed cannot beat it; so ``reference / floor`` bounds the speed-up over the
reference engine that any engine could show at this shape, and ``fastlstm / floor`` is what
fastlstm spends beyond the GEMMs (elementwise work, its own step GEMM's efficiency, threads).

Every implementation is timed interleaved (one call of each in turn, ``--repeats`` rounds), in one
process, and the medians are printed with the spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastlstm
from fastlstm.bench.report import git_revision, versions

OPTION_ROWS = {
    "plain": {},
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout=0.1": dict(zoneout=0.1),
    "cell_clip=3.0": dict(cell_clip=3.0),
    "recurrent_dropout=0.25": dict(recurrent_dropout=0.25),
    "weight_drop=0.5": dict(weight_drop=0.5),
    "activations=hard_sigmoid,tanh,softsign": dict(activations=("hard_sigmoid", "tanh", "softsign")),
}
STOCHASTIC = ("zoneout", "recurrent_dropout", "weight_drop")


def gemm_floor(batch: int, steps: int, input_size: int, hidden: int):
    """A callable running the six GEMMs of one layer's forward+backward with torch.mm."""
    n, g = steps * batch, 4 * hidden
    x, w_ih, w_hh = torch.randn(n, input_size), torch.randn(g, input_size), torch.randn(g, hidden)
    bias, h = torch.randn(g), torch.randn(batch, hidden)
    dgates, h_all = torch.randn(n, g), torch.randn(n, hidden)

    def run():
        torch.addmm(bias, x, w_ih.t())  # input projection, all steps
        for _ in range(steps):
            torch.mm(h, w_hh.t())  # forward recurrence
        for t in range(steps):
            torch.mm(dgates[t * batch : (t + 1) * batch], w_hh)  # backward recurrence
        torch.mm(dgates.t(), h_all)  # dW_hh
        torch.mm(dgates.t(), x)  # dW_ih
        torch.mm(dgates, w_ih)  # dx

    return run


def lstm_call(module: torch.nn.Module, x: torch.Tensor):
    def run():
        y, _ = module(x)
        y.sum().backward()
        for p in module.parameters():
            p.grad = None
        x.grad = None

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-B", "--batch", type=int, default=16)
    parser.add_argument("-T", "--steps", type=int, default=64)
    parser.add_argument("-H", "--hidden", type=int, default=256)
    parser.add_argument("-I", "--input-size", type=int)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    batch, steps, hidden = args.batch, args.steps, args.hidden
    input_size = args.input_size or hidden
    torch.manual_seed(0)
    x = torch.randn(steps, batch, input_size, requires_grad=True)

    calls = {"GEMM floor (torch.mm)": gemm_floor(batch, steps, input_size, hidden)}
    for name, options in OPTION_ROWS.items():
        for backend in ("cpu", "reference"):
            module = fastlstm.LSTM(input_size, hidden, backend=backend, **options)
            if any(name.startswith(s) for s in STOCHASTIC):
                module.eval()  # the bench's rule: stochastic rows run their expectation, with autograd
            calls[f"{name} {backend}"] = lstm_call(module, x)
    for call in calls.values():  # warm up: plans, caches, the GEMM choice
        call()
    samples = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    floor = medians["GEMM floor (torch.mm)"]

    sha, dirty = git_revision()
    info = {**versions(), "git_sha": sha, "git_dirty": dirty, "threads": torch.get_num_threads()}
    print(f"B{batch} T{steps} I{input_size} H{hidden} float32, forward+backward, {info['threads']} threads; "
          f"torch {info['torch']}, fastlstm {fastlstm.__version__}, git {sha[:12]}{' (dirty)' if dirty else ''}; "
          f"medians of {args.repeats} interleaved rounds")
    print(f"GEMM floor (the six GEMMs alone, torch.mm): {floor:.2f} ms "
          f"[{min(samples['GEMM floor (torch.mm)']) * 1e3:.2f}..{max(samples['GEMM floor (torch.mm)']) * 1e3:.2f}]")
    print(f"{'option':42s} {'fastlstm ms':>11s} {'reference ms':>12s} {'ref/fastlstm':>12s} "
          f"{'fastlstm/floor':>14s} {'ref/floor':>9s}")
    rows = []
    for name in OPTION_ROWS:
        ours, ref = medians[f"{name} cpu"], medians[f"{name} reference"]
        print(f"{name:42s} {ours:11.2f} {ref:12.2f} {ref / ours:12.2f} {ours / floor:14.2f} {ref / floor:9.2f}")
        rows.append({"option": name, "fastlstm_ms": ours, "reference_ms": ref, "floor_ms": floor,
                     "batch": batch, "steps": steps, "input_size": input_size, "hidden": hidden,
                     "fastlstm_samples_ms": [s * 1e3 for s in samples[f"{name} cpu"]],
                     "reference_samples_ms": [s * 1e3 for s in samples[f"{name} reference"]],
                     "floor_samples_ms": [s * 1e3 for s in samples["GEMM floor (torch.mm)"]], **info})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
