"""``fastlstm demo``: train a character-level LSTM language model on text every machine has.

The corpus is the Python standard library's own source (no download), or any text file with
``--text``. Whole files are held out for validation, so the held-out loss measures how well the
model predicts code it has never seen, not neighbouring characters of the text it trained on.

The model is the classic char-LM: embedding -> :class:`fastlstm.LSTM` (every variant selectable
by a flag) -> linear to the vocabulary, trained with truncated backpropagation through time on
contiguous batch streams, the state carried (and detached) from one chunk to the next. After
training the demo samples text one character at a time through the same LSTM (streaming, the
state ``(h, c)`` carried by hand), then times training steps of the same model built on
``torch.nn.LSTM``, in the same process on the same batch.

Shape legend: ``T`` steps (characters) per chunk, ``B`` streams (batch), ``E`` embedding size,
``H`` hidden size, ``L`` layers, ``V`` vocabulary size, ``N`` characters.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .engines import BACKENDS, select_engine
from .modules import LSTM

LN2 = math.log(2.0)

# Directories of the standard library that are not its ordinary source: test suites (they are
# mostly data and fixtures), installed third-party packages, caches, and the generated codec
# tables of ``encodings`` (hundreds of lines of escaped code points that would flood the
# vocabulary with rare characters).
SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
)

UNK = 0  # token id of every character outside the vocabulary
UNK_CHAR = "\ufffd"  # how an unknown token is shown

# Defaults that --smoke swaps in: a tiny model that still visibly learns, in a few seconds.
# Flags given explicitly on the command line still win.
SMOKE_DEFAULTS = {
    "max_chars": 60_000,
    "embed": 16,
    "hidden": 48,
    "layers": 1,
    "batch": 16,
    "bptt": 32,
    "lr": 1e-2,
    "steps": 100,
    "minutes": 0.5,
    "evals": 4,
    "eval_chars": 4_000,
    "sample_chars": 120,
    "bench_steps": 3,
    "bench_warmup": 1,
    # A tiny model gains nothing from a second thread, and on a busy CI machine the threads of an
    # oversubscribed pool wait on each other for every small op (100x slower, measured).
    "threads": 1,
}

# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Training and held-out text, and where they came from (for the printout)."""

    train: str
    valid: str
    description: str
    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``*.py`` files, sorted by relative path, tests and packages skipped."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in SKIPPED_DIRS]
        found.extend(Path(directory, name) for name in files if name.endswith(".py"))
    # os.walk's order depends on the file system; sorting makes the selection the same everywhere.
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def spread_order(paths: list[Path], max_chars: int) -> list[Path]:
    """All of ``paths`` (sorted), reordered so that any prefix samples the whole list evenly.

    With ``k`` about (total size / ``max_chars``), the order is files 0, k, 2k, ..., then
    1, k + 1, ...: reading it until the cap takes evenly spaced files from every corner of the
    library (the first files in sorted order alone would be ``_pydecimal`` and ``asyncio``), and
    still reaches the cap when the spaced files happen to be small. Deterministic.
    """
    total = sum(path.stat().st_size for path in paths)
    stride = max(1, round(total / max_chars))
    return [path for offset in range(stride) for path in paths[offset::stride]]


def split_tail(text: str, fraction: float = 0.1) -> tuple[str, str]:
    """Split off the last ``fraction`` of a text as held-out data (a contiguous block)."""
    cut = len(text) - max(1, int(len(text) * fraction))
    return text[:cut], text[cut:]


def read_text(path: Path) -> str:
    # Universal newlines (\r\n -> \n); undecodable bytes become U+FFFD rather than aborting.
    return path.read_text(encoding="utf-8", errors="replace")


def load_stdlib(max_chars: int, holdout_every: int = 10, root: Path | None = None) -> Corpus:
    """Up to ``max_chars`` characters of standard-library source; every ``holdout_every``-th file held out."""
    root = stdlib_root() if root is None else root
    paths = stdlib_files(root)
    if not paths:
        raise FileNotFoundError(f"no Python source files under {root}; pass --text FILE to train on a text file")
    train, valid, train_files, valid_files = [], [], [], []
    size = 0
    for index, path in enumerate(spread_order(paths, max_chars)):
        if size >= max_chars:
            break
        text = read_text(path)[: max_chars - size]
        size += len(text)
        name = path.relative_to(root).as_posix()
        held_out = index % holdout_every == holdout_every - 1
        (valid if held_out else train).append(text)
        (valid_files if held_out else train_files).append(name)
    if not valid and len(train) > 1:  # too few files for one in ten: hold out the last one
        valid.append(train.pop())
        valid_files.append(train_files.pop())
    train_text, valid_text = "".join(train), "".join(valid)
    how = f"{len(valid_files)} whole files (every {holdout_every}th)"
    if not valid_text:  # a single (truncated) file: hold out its tail instead
        train_text, valid_text = split_tail(train_text)
        how = "the last 10% of the text"
    python = ".".join(map(str, sys.version_info[:2]))
    description = (
        f"{len(train_text) + len(valid_text):,} characters from {len(train_files) + len(valid_files)} files "
        f"of the Python {python} standard library ({root}); held out: {how}"
    )
    return Corpus(train_text, valid_text, description, train_files, valid_files)


def load_text_file(path: Path, max_chars: int) -> Corpus:
    """The first ``max_chars`` characters of a text file; its last 10% held out."""
    text = read_text(path)[:max_chars]
    if len(text) < 2:
        raise ValueError(f"{path} holds {len(text)} character(s); a language model needs more text than that")
    train, valid = split_tail(text)
    return Corpus(train, valid, f"{len(text):,} characters of {path}; held out: the last 10% of the text")


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def code_points(text: str) -> Tensor:
    """The Unicode code points of a text, ``[N]`` int64, without a Python loop."""
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()


class Vocab:
    """Characters <-> token ids: the most frequent training characters, plus ``UNK`` (id 0).

    Built from the data, so it works for any language of ``--text`` (a fixed ASCII table would
    turn a non-English text into unknowns), and capped, so a stray emoji costs nothing.
    """

    def __init__(self, chars: list[str]) -> None:
        self.chars = [UNK_CHAR, *chars]
        codes = torch.tensor([ord(ch) for ch in chars], dtype=torch.long)
        self._codes, order = torch.sort(codes)  # sorted code points, for searchsorted
        self._ids = order + 1  # the token id of each sorted code point

    @classmethod
    def from_text(cls, text: str, max_size: int) -> Vocab:
        codes, counts = torch.unique(code_points(text), return_counts=True)
        # Most frequent first; ties broken by code point (unique sorts them), so it is deterministic.
        order = torch.sort(counts, descending=True, stable=True).indices[: max_size - 1]
        return cls([chr(code) for code in codes[order].tolist()])

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """``[N]`` int64 token ids; characters outside the vocabulary become ``UNK``."""
        if not text:
            return torch.zeros(0, dtype=torch.long)
        cps = code_points(text)
        pos = torch.searchsorted(self._codes, cps).clamp(max=len(self._codes) - 1)
        return torch.where(self._codes[pos] == cps, self._ids[pos], UNK)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in (ids.tolist() if isinstance(ids, Tensor) else ids))


def batchify(ids: Tensor, streams: int) -> Tensor:
    """``[N]`` -> ``[N // B, B]``: B contiguous streams side by side, time-major.

    Stream b is the b-th slice of the text, so chunk k of every stream continues chunk k - 1 and
    the state carried between chunks is the right one.
    """
    length = ids.numel() // streams
    return ids[: length * streams].view(streams, length).t().contiguous()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

State = tuple[Tensor, Tensor]


class CharLM(nn.Module):
    """Embedding -> LSTM -> dropout -> linear. Time-major: ``tokens [T, B] -> logits [T, B, V]``."""

    def __init__(self, vocab_size: int, embed: int, lstm: nn.Module, dropout: float) -> None:
        super().__init__()
        # Registration order fixes the order weights are drawn in, hence identical init for the
        # fastlstm and torch builds of the same model under the same seed.
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = lstm
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(lstm.hidden_size, vocab_size)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """``tokens [T, B]``, ``state = (h [L, B, H], c [L, B, H])`` or None -> ``(logits [T, B, V], state)``."""
        y, state = self.lstm(self.embed(tokens), state)
        return self.head(self.drop(y)), state


VARIANT_FLAGS = ("layer_norm", "peephole", "zoneout", "recurrent_dropout", "weight_drop")


def variant_options(args: argparse.Namespace) -> dict:
    """The fastlstm-only options this run asked for (those ``torch.nn.LSTM`` cannot do)."""
    options = {
        "layer_norm": args.layer_norm,
        "peephole": args.peephole,
        "zoneout": args.zoneout,
        "recurrent_dropout": args.recurrent_dropout,
        "weight_drop": args.weight_drop,
    }
    return {name: value for name, value in options.items() if value}


def build_model(
    args: argparse.Namespace, vocab_size: int, *, use_torch: bool = False, plain: bool = False
) -> CharLM:
    """The demo's model on ``fastlstm.LSTM`` (with this run's options unless ``plain``) or ``torch.nn.LSTM``.

    Seeds torch first, so every build of the same configuration starts from the same weights.
    """
    torch.manual_seed(args.seed)
    # nn.LSTM's dropout only acts between layers (and warns with one layer), so pass it only then.
    between = args.dropout if args.layers > 1 else 0.0
    if use_torch:
        lstm = nn.LSTM(args.embed, args.hidden, args.layers, dropout=between)
    else:
        options = {} if plain else variant_options(args)
        lstm = LSTM(args.embed, args.hidden, args.layers, dropout=between, backend=args.backend, **options)
    return CharLM(vocab_size, args.embed, lstm, args.dropout).to(args.device)


def engine_name(model: CharLM) -> str:
    """Which engine ``backend=`` resolves to for this model, for the printout."""
    lstm = model.lstm
    if not isinstance(lstm, LSTM):
        return "torch"
    try:
        return select_engine(lstm.backend, lstm.weight_ih_l0.device, lstm.weight_ih_l0.dtype, lstm.options).name
    except Exception:  # only a label: never let it stop the demo
        return lstm.backend


def describe_lstm(model: CharLM) -> str:
    lstm = model.lstm
    name = "fastlstm.LSTM" if isinstance(lstm, LSTM) else "torch.nn.LSTM"
    extra = ""
    if isinstance(lstm, LSTM):
        extra = "".join(f", {k}={v!r}" for k, v in lstm.options.non_defaults().items())
        extra += f", backend={lstm.backend!r} -> {engine_name(model)}"
    if lstm.dropout:
        extra = f", dropout={lstm.dropout}" + extra
    return f"{name}({lstm.input_size}, {lstm.hidden_size}, num_layers={lstm.num_layers}{extra})"


def detach(state: State) -> State:
    """Cut the graph between chunks (truncated BPTT) but keep the values (carried state)."""
    return state[0].detach(), state[1].detach()


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy in nats; ``logits [T, B, V]``, ``targets [T, B]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Sampling (streaming inference)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Speed against torch.nn.LSTM
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def positive(kind: Callable):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlstm demo",
        description="Train a character-level LSTM language model on the Python standard library's source "
        "(or --text FILE), report held-out bits per character, sample text, and compare training "
        "speed with torch.nn.LSTM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--text", type=Path, metavar="FILE", help="train on this text file instead of the standard library"
    )
    data.add_argument("--max-chars", type=positive(int), default=3_000_000, help="corpus size cap")
    data.add_argument("--max-vocab", type=positive(int), default=256, help="vocabulary cap, unknown token included")
    data.add_argument("--eval-chars", type=positive(int), default=25_000, help="held-out characters per evaluation")

    model = parser.add_argument_group("model")
    model.add_argument("--embed", type=positive(int), default=64, help="embedding size E")
    model.add_argument("--hidden", type=positive(int), default=256, help="hidden size H")
    model.add_argument("--layers", type=positive(int), default=1, help="LSTM layers L")
    model.add_argument("--dropout", type=probability, default=0.0, help="dropout on the LSTM output and between layers")
    model.add_argument("--layer-norm", action="store_true", help="layer-normalised LSTM")
    model.add_argument("--peephole", action="store_true", help="peephole connections")
    model.add_argument("--zoneout", type=probability, default=0.0, metavar="Z", help="zoneout on h and c")
    model.add_argument(
        "--recurrent-dropout", type=probability, default=0.0, metavar="P", help="variational dropout on h"
    )
    model.add_argument("--weight-drop", type=probability, default=0.0, metavar="P", help="DropConnect on weight_hh")
    model.add_argument("--backend", choices=BACKENDS, default="auto", help="fastlstm engine")

    training = parser.add_argument_group("training")
    training.add_argument("--minutes", type=float, default=3.0, help="time budget for training (0: none)")
    training.add_argument("--steps", type=positive(int), help="stop after this many steps (default: by time)")
    training.add_argument("--batch", type=positive(int), default=32, help="parallel streams B")
    training.add_argument("--bptt", type=positive(int), default=64, help="characters per truncated-BPTT chunk T")
    training.add_argument("--lr", type=positive(float), default=3e-3, help="Adam learning rate")
    training.add_argument("--grad-clip", type=positive(float), default=1.0, help="max gradient norm")
    training.add_argument("--evals", type=positive(int), default=10, help="evaluations (\"epochs\") over the budget")
    training.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--threads", type=positive(int), help="CPU threads for torch (default: torch's choice)")
    training.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--sample-chars", type=int, default=600, help="characters to sample after training")
    output.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    output.add_argument(
        "--prime", help='text the sample continues (default: "def " for the stdlib, a newline for --text)'
    )
    output.add_argument("--plot", default="demo_loss.png", help='loss-curve PNG ("" to skip)')
    output.add_argument(
        "--bench-steps", type=positive(int), default=10, help="timed steps per model in the speed comparison"
    )
    output.add_argument("--bench-warmup", type=int, default=3, help="untimed warm-up steps per model")
    output.add_argument("--no-bench", dest="bench", action="store_false", help="skip the speed comparison")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps, for CI (seconds)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        # Re-parse with the smoke defaults, so that explicit flags still override them.
        parser.set_defaults(**SMOKE_DEFAULTS)
        args = parser.parse_args(argv)
    if args.minutes < 0:
        parser.error("--minutes must be >= 0")
    if args.minutes == 0 and args.steps is None:
        parser.error("--minutes 0 needs --steps: training must stop somewhere")
    if args.sample_chars < 0 or args.bench_warmup < 0:
        parser.error("--sample-chars and --bench-warmup must be >= 0")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.plot:
        try:
            import_matplotlib()  # fail now, not after minutes of training
        except ImportError as error:
            parser.error(str(error))
    args.device = torch.device(args.device)
    return args


def load_corpus(args: argparse.Namespace) -> Corpus:
    if args.text is not None:
        return load_text_file(args.text, args.max_chars)
    return load_stdlib(args.max_chars)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return run(args)
    finally:  # main may be called in-process (tests, the fastlstm CLI): leave torch as it was
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """The demo, from parsed arguments: load, train, report, sample, compare, plot."""
    try:
        corpus = load_corpus(args)
    except (OSError, ValueError) as error:
        print(f"fastlstm demo: error: {error}", file=sys.stderr)
        return 2

    vocab = Vocab.from_text(corpus.train, args.max_vocab)
    train_ids, valid_ids = vocab.encode(corpus.train), vocab.encode(corpus.valid)
    valid_ids = valid_ids[: args.eval_chars]
    # Evaluation streams: as many as training uses, but each long enough to carry state a while.
    valid_streams = max(1, min(args.batch, valid_ids.numel() // (4 * args.bptt)))
    train_data = batchify(train_ids, args.batch).to(args.device)  # [N / B, B]
    valid_data = batchify(valid_ids, valid_streams).to(args.device)  # [N' / B', B']
    if train_data.shape[0] < 2 or valid_data.shape[0] < 2:
        print("fastlstm demo: error: the corpus is too small for this --batch; give more text", file=sys.stderr)
        return 2

    model = build_model(args, len(vocab))
    unknown = (train_ids == UNK).float().mean().item()
    threads = torch.get_num_threads()
    print(f"fastlstm {__version__} demo, torch {torch.__version__}, {threads} CPU threads, device {args.device}")
    print(f"corpus: {corpus.description}")
    print(f"train: {len(corpus.train):,} characters as {args.batch} streams of {train_data.shape[0]:,}")
    print(f"held out: {len(corpus.valid):,} characters, {valid_data.numel():,} used per evaluation")
    print(f"vocabulary: {len(vocab)} characters (unknown token included; {unknown:.3%} of training characters unknown)")
    lstm = describe_lstm(model)
    print(f"model: Embedding({len(vocab)}, {args.embed}) -> {lstm} -> Linear({args.hidden}, {len(vocab)})")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    budget = [f"{args.steps} steps"] if args.steps else []
    budget += [f"{args.minutes:g} minutes"] if args.minutes else []
    print(
        f"training: Adam lr {args.lr:g}, gradient norm clipped at {args.grad_clip:g}, truncated BPTT over "
        f"{args.bptt} characters, {' or '.join(budget)}, whichever comes first; "
        f"uniform guess = {math.log2(len(vocab)):.3f} bpc\n"
    )

    if machine_load_note() and args.threads is None and torch.get_num_threads() > 1:
        # Measured: with other processes on every core, torch's thread pool waits on itself at
        # each small op, and an LSTM step can run 30x slower with 2 threads than with 1.
        print("note: this machine is busy (load average above its CPU count); if training crawls, try --threads 1\n")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    history = train(model, train_data, valid_data, args, ProgressBar(progress))
    if history.diverged:
        return 1

    speed = history.train_tokens / max(history.train_seconds, 1e-9)
    first, final = history.eval_losses[0] / LN2, history.eval_losses[-1] / LN2
    print(
        f"\ntrained {history.train_steps[-1]:,} steps, {history.train_tokens:,} characters "
        f"({history.passes:.2f} passes over the training text) in {history.train_seconds:.1f} s of training steps: "
        f"{speed:,.0f} char/s"
    )
    print(f"held-out bpc: {first:.4f} at step 0 -> {final:.4f} at step {history.eval_steps[-1]:,}")

    if args.sample_chars:
        prime = args.prime if args.prime is not None else ("\n" if args.text is not None else "def ")
        generator = torch.Generator().manual_seed(args.seed)
        text = sample(model, vocab, prime, args.sample_chars, args.temperature, generator)
        print(
            f"\n--- sample: {args.sample_chars} characters after the prime {prime!r}, "
            f"temperature {args.temperature:g}, seed {args.seed}, one character per LSTM call ---"
        )
        print(printable(prime + text))
        print("--- end of sample ---")

    if args.bench:
        compare_with_torch(args, len(vocab), train_data)

    if args.plot:
        title = f"{describe_lstm(model)}\nheld-out bpc {first:.3f} -> {final:.3f}"
        save_plot(history, Path(args.plot), title)
        print(f"\nloss curve: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
