"""The demo's model: embedding -> LSTM -> linear, on fastlstm.LSTM or torch.nn.LSTM."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engines import select_engine
from ..modules import LSTM

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
        return select_engine(lstm.backend, lstm.weight_ih_l0.device, lstm.weight_ih_l0.dtype, lstm.options)
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
