"""``fastlstm demo``'s command line and the run from start to end."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .. import __version__
from ..engines import BACKENDS
from .compare import compare_with_torch, import_matplotlib, machine_load_note, save_plot
from .corpus import UNK, Corpus, Vocab, batchify, load_stdlib, load_text_file
from .model import build_model, describe_lstm
from .training import LN2, ProgressBar, printable, sample, train

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
