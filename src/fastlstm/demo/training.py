"""Training with truncated BPTT, evaluation in bits per character, and sampling one character per
LSTM call (the state carried by hand)."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .corpus import UNK, Vocab
from .model import CharLM, State, detach, lm_loss

LN2 = math.log(2.0)  # nats per bit


@torch.no_grad()
def evaluate(model: CharLM, data: Tensor, bptt: int) -> float:
    """Mean held-out loss in nats per character over ``data [N, B]``, state carried from zero."""
    was_training = model.training
    model.eval()  # dropout off; zoneout and the other masks use their expectations
    total, count, state = 0.0, 0, None
    for start in range(0, data.shape[0] - 1, bptt):
        inputs = data[start : start + bptt]
        targets = data[start + 1 : start + 1 + bptt]
        inputs = inputs[: targets.shape[0]]
        logits, state = model(inputs, state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total / count


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most every ``interval`` seconds."""

    def __init__(self, enabled: bool, stream=None, width: int = 28, interval: float = 0.2) -> None:
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.interval = interval
        self._last_draw = -math.inf
        self._shown = 0  # length of the line on screen, to blank it out

    def update(self, fraction: float, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last_draw < self.interval):
            return
        self._last_draw = now
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(round(fraction * self.width))
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction:4.0%} {text}"
        self.stream.write("\r" + line.ljust(self._shown))
        self.stream.flush()
        self._shown = len(line)

    def clear(self) -> None:
        """Blank the line, so that a line printed to stdout on the same terminal is not mangled."""
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0
            self._last_draw = -math.inf  # redraw at the next update


@dataclass
class History:
    """What the loss curve and the summary need."""

    train_steps: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # optimisation steps only, evaluations excluded
    train_tokens: int = 0
    passes: float = 0.0  # passes over the training text
    diverged: bool = False


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


class Schedule:
    """How far training is (the larger of the step and time fractions) and when to evaluate."""

    def __init__(self, steps: int | None, seconds: float, evals: int) -> None:
        self.steps = steps
        self.seconds = seconds
        self.evals = evals
        self.start = time.perf_counter()
        self.next_eval = 1.0 / evals

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fraction(self, step: int) -> float:
        by_steps = step / self.steps if self.steps else 0.0
        by_time = self.elapsed() / self.seconds if self.seconds else 0.0
        return max(by_steps, by_time)

    def eval_due(self, fraction: float) -> bool:
        """True once per ``1 / evals`` of progress (an "epoch"), and always at the end."""
        if fraction < self.next_eval and fraction < 1.0:
            return False
        self.next_eval = (math.floor(fraction * self.evals) + 1) / self.evals
        return True


def print_eval_header() -> None:
    print(f"{'epoch':>5} {'step':>7} {'elapsed':>8} {'train loss':>11} {'held-out loss':>14} {'held-out bpc':>13}")


def print_eval_row(epoch: int, step: int, elapsed: float, train_loss: float | None, loss: float) -> None:
    train = "-" if train_loss is None else f"{train_loss:.4f}"
    print(f"{epoch:>5} {step:>7} {elapsed:>7.1f}s {train:>11} {loss:>14.4f} {loss / LN2:>13.4f}", flush=True)


def chunks(data: Tensor, bptt: int):
    """Endless truncated-BPTT chunks of ``data [N, B]``: ``(inputs [T, B], targets [T, B], restart)``.

    Targets are the inputs shifted by one character. At the end of the streams it starts over and
    says so (``restart``), because the carried state then no longer belongs to the text that follows.
    """
    last = data.shape[0] - 1  # the last position that has a target
    position, restart = 0, True
    while True:
        length = min(bptt, last - position)
        yield data[position : position + length], data[position + 1 : position + 1 + length], restart
        position, restart = position + length, False
        if position >= last:
            position, restart = 0, True


def train_step(
    model: CharLM,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    targets: Tensor,
    state: State | None,
    grad_clip: float,
) -> tuple[float, State]:
    """One optimisation step on ``inputs [T, B]`` -> ``targets [T, B]``; returns the loss and the detached state."""
    logits, state = model(inputs, state)
    loss = lm_loss(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    # .item() also waits for a GPU, so a wall-clock timing around this call is honest.
    return loss.item(), detach(state)


def train(
    model: CharLM,
    train_data: Tensor,
    valid_data: Tensor,
    args: argparse.Namespace,
    bar: ProgressBar,
) -> History:
    """Truncated BPTT with Adam and gradient clipping over ``train_data [N, B]``.

    Evaluates on ``valid_data [N', B']`` at step 0 and every ``1 / args.evals`` of the budget (an
    "epoch"), printing one row each. Stops after ``args.steps`` steps or ``args.minutes``, whichever
    comes first.
    """
    device = train_data.device
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = History()
    schedule = Schedule(args.steps, args.minutes * 60.0, args.evals)

    print_eval_header()
    loss0 = evaluate(model, valid_data, args.bptt)
    history.eval_steps.append(0)
    history.eval_losses.append(loss0)
    print_eval_row(0, 0, schedule.elapsed(), None, loss0)

    model.train()
    state: State | None = None
    step, epoch, interval_losses = 0, 0, []
    for inputs, targets, restart in chunks(train_data, args.bptt):
        if restart:
            state = None
        tic = time.perf_counter()
        loss_value, state = train_step(model, optimizer, inputs, targets, state, args.grad_clip)
        history.train_seconds += time.perf_counter() - tic

        step += 1
        history.train_tokens += targets.numel()
        history.train_steps.append(step)
        history.train_losses.append(loss_value)
        interval_losses.append(loss_value)
        if not math.isfinite(loss_value):
            bar.clear()
            print(f"training diverged at step {step} (loss {loss_value}); try a smaller --lr", flush=True)
            history.diverged = True
            break

        fraction = schedule.fraction(step)
        speed = history.train_tokens / max(history.train_seconds, 1e-9)
        left = schedule.elapsed() * (1.0 - min(fraction, 1.0)) / max(fraction, 1e-9)
        status = f"step {step}  loss {loss_value:.3f}  {speed / 1e3:.1f}k char/s  {format_seconds(left)} left"
        bar.update(fraction, status)

        if schedule.eval_due(fraction):
            epoch += 1
            valid_loss = evaluate(model, valid_data, args.bptt)
            history.eval_steps.append(step)
            history.eval_losses.append(valid_loss)
            bar.clear()
            print_eval_row(epoch, step, schedule.elapsed(), statistics.fmean(interval_losses), valid_loss)
            interval_losses = []
            if fraction >= 1.0:
                break
    bar.clear()
    synchronize(device)
    history.passes = history.train_tokens / train_data.numel()
    return history


# -- sampling (streaming inference) ----------------------------------------------------------------


@torch.no_grad()
def sample(
    model: CharLM, vocab: Vocab, prime: str, count: int, temperature: float, generator: torch.Generator
) -> str:
    """``count`` characters that continue ``prime``, drawn one at a time.

    Streaming inference: the LSTM sees one character per call (``[T=1, B=1]``) and the state
    ``(h [L, 1, H], c [L, 1, H])`` is carried by hand from call to call, as a server generating
    text would. ``temperature`` 0 is greedy decoding. Never emits ``UNK``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt = vocab.encode(prime or "\n").tolist()
    state = None
    for token in prompt:  # read the prime through the same one-character loop
        logits, state = model(torch.tensor([[token]], device=device), state)
    out = []
    for _ in range(count):
        scores = logits[-1, 0].float().cpu()
        scores[UNK] = -math.inf  # an "unknown" placeholder is not a character worth printing
        if temperature <= 0:
            token = int(scores.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(scores / temperature, dim=0), 1, generator=generator))
        out.append(token)
        logits, state = model(torch.tensor([[token]], device=device), state)
    model.train(was_training)
    return vocab.decode(out)


def printable(text: str) -> str:
    """``text`` as the terminal's encoding can show it (a latin-1 console must not crash the demo)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, errors="replace").decode(encoding)
