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

The library's tools live apart from it: ``import fastlstm`` never imports this package; the
``fastlstm demo`` command does. Modules: :mod:`.corpus`, :mod:`.model`, :mod:`.training`,
:mod:`.compare`, :mod:`.cli`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``fastlstm demo [flags]``."""
    from .cli import main as run

    return run(argv)
