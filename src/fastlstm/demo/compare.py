"""The same model on torch.nn.LSTM timed against fastlstm's, in one process, and the loss plot."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from .model import CharLM, build_model, describe_lstm, lm_loss, variant_options
from .training import LN2, History, synchronize, train_step



def time_training_steps(
    models: dict[str, CharLM],
    inputs: Tensor,
    targets: Tensor,
    *,
    steps: int,
    warmup: int,
    lr: float,
    grad_clip: float,
) -> dict[str, float]:
    """Median seconds per full training step (forward, backward, clip, Adam) of each model.

    Every model trains on the same batch ``inputs [T, B]`` -> ``targets [T, B]`` from a zero state.
    Timed steps are interleaved (one step of each model in turn), so drift in the machine's speed
    (turbo, other processes) affects all models alike.
    """
    device = inputs.device
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=lr) for name, model in models.items()}

    def one_step(name: str) -> float:
        synchronize(device)
        tic = time.perf_counter()
        train_step(models[name], optimizers[name], inputs, targets, None, grad_clip)
        synchronize(device)
        return time.perf_counter() - tic

    for model in models.values():
        model.train()
    for name in models:
        for _ in range(warmup):
            one_step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name in models:
            times[name].append(one_step(name))
    return {name: statistics.median(values) for name, values in times.items()}


def machine_load_note() -> str:
    """A warning when other processes compete for the CPUs, which makes CPU timings unreliable."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return ""
    cpus = os.cpu_count() or 1
    if load <= cpus + 1:  # the demo itself keeps up to every core busy
        return ""
    return (
        f"note: the 1-minute load average is {load:.1f} on {cpus} CPUs (this demo included): other processes "
        "compete for the cores, so these CPU timings (both models alike) are slower and noisier than on an idle "
        "machine."
    )


@torch.no_grad()
def first_loss(model: CharLM, inputs: Tensor, targets: Tensor) -> float:
    """Eval-mode loss of a freshly built model: equal for equal weights, whatever the LSTM."""
    was_training = model.training
    model.eval()
    loss = lm_loss(model(inputs)[0], targets).item()
    model.train(was_training)
    return loss


def compare_with_torch(args: argparse.Namespace, vocab_size: int, train_data: Tensor) -> None:
    """Print training tokens/s of this run's fastlstm model against the same model on torch.nn.LSTM."""
    options = variant_options(args)
    models = {"fastlstm": build_model(args, vocab_size)}
    if options:  # torch cannot run these options: compare like with like, and show the cost of the options
        models["fastlstm plain"] = build_model(args, vocab_size, plain=True)
    models["torch"] = build_model(args, vocab_size, use_torch=True)

    length = min(args.bptt, train_data.shape[0] - 1)
    inputs, targets = train_data[:length], train_data[1 : length + 1]
    plain = "fastlstm plain" if options else "fastlstm"
    ours, theirs = first_loss(models[plain], inputs, targets), first_loss(models["torch"], inputs, targets)

    seconds = time_training_steps(
        models, inputs, targets, steps=args.bench_steps, warmup=args.bench_warmup, lr=args.lr, grad_clip=args.grad_clip
    )
    tokens = inputs.numel()
    print(
        f"\ntraining speed: same process, same batch (T={length}, B={inputs.shape[1]}, "
        f"{tokens:,} characters per step), "
        f"median of {args.bench_steps} timed steps after {args.bench_warmup} warm-up, interleaved, on {args.device}:"
    )
    labels = {
        "fastlstm": describe_lstm(models["fastlstm"]),
        "fastlstm plain": describe_lstm(models.get("fastlstm plain", models["fastlstm"])) + "  [plain]",
        "torch": describe_lstm(models["torch"]),
    }
    for name, value in seconds.items():
        print(f"  {tokens / value:>10,.0f} char/s  {value * 1e3:8.1f} ms/step  {labels[name]}")
    ratio = seconds["torch"] / seconds[plain]
    busy = machine_load_note()
    if busy:
        print(f"  {busy}")
    if options:
        print(
            f"  torch.nn.LSTM has no {', '.join(options)}: it is compared with fastlstm's plain configuration "
            "(same sizes, no variants)."
        )
        print(f"  the variants cost {seconds['fastlstm'] / seconds[plain]:.2f}x the time of plain fastlstm.")
    print(f"  plain fastlstm / torch.nn.LSTM: {ratio:.2f}x the tokens/s ({'faster' if ratio > 1 else 'slower'})")
    print(
        f"  same weights (same seed): first-batch loss {ours:.6f} (fastlstm) vs {theirs:.6f} (torch), "
        f"difference {abs(ours - theirs):.1e}"
    )


# -- plot -------------------------------------------------------------------------------------------


def import_matplotlib():
    """matplotlib's Figure and Agg canvas, or a clear error naming the extra that installs it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "the loss-curve plot needs matplotlib: pip install fastlstm[plot] (or pip install matplotlib), "
            'or pass --plot "" to skip the plot'
        ) from error
    return Figure, FigureCanvasAgg


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start): per-step losses are noisy."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_plot(history: History, path: Path, title: str) -> None:
    """Train loss (per step and smoothed) and held-out loss vs step, in nats with a bpc axis."""
    Figure, FigureCanvasAgg = import_matplotlib()
    # A bare Figure with the Agg canvas: no pyplot, so no global state or GUI backend is touched.
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    window = max(1, len(history.train_losses) // 50)
    ax.plot(history.train_steps, history.train_losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(
        history.train_steps,
        moving_average(history.train_losses, window),
        color="tab:blue",
        label="train loss" if window == 1 else f"train loss (mean of {window} steps)",
    )
    ax.plot(history.eval_steps, history.eval_losses, "o-", color="tab:orange", label="held-out loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats per character)")
    bpc = ax.secondary_yaxis("right", functions=(lambda nats: nats / LN2, lambda bits: bits * LN2))
    bpc.set_ylabel("bits per character")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
