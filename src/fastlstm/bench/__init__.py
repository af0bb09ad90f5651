"""``fastlstm bench``: time fastlstm's engines against torch.nn.LSTM, in one process, on one device.

The library's tools live apart from it: ``import fastlstm`` never imports this package; the
``fastlstm bench`` command does. Modules, in the order a row goes through them: :mod:`.presets`
(the rows), :mod:`.impls` (what runs), :mod:`.check`, :mod:`.timing`, :mod:`.run`, :mod:`.report`,
:mod:`.cli`.

For every row (a :class:`~fastlstm.bench.presets.Config`), in this order:

1. **Build** ``torch.nn.LSTM`` (or ``LSTMCell``), one fastlstm module per engine of
   :data:`fastlstm.engines.BACKENDS` that supports the row, and, for rows with variant options,
   the reference engine and an eager Python loop (:mod:`.eager`). Plain rows give torch's weights to every module; option rows
   give one fastlstm module's initialisation to the others and the eager loop (torch, which has
   no variants, runs plain at the same shape as a yardstick).
2. **Check** every implementation, at the benchmark shape and dtype, in both timed modes, against
   a float64 oracle: torch.nn.LSTM for plain rows, the reference engine for option rows. Each
   output, final state and gradient must satisfy
   ``err(impl) <= 2 * err(baseline) + floor(dtype)``, where ``err`` is the largest absolute
   difference relative to the oracle's largest element and the baseline is the oracle's own
   implementation run in the benchmark dtype (flash-attention's rule, :mod:`fastlstm.testing`: as
   accurate as torch is at that precision, plus a few units in the last place).
   Half-precision option rows take the larger of the reference's error and that of the eager
   loop computing in the row's dtype (the reference computes in float32 inside). Layer-norm rows
   are checked on their first :data:`CHAOTIC_CHECK_STEPS` steps (the model is chaotic).
   A failure aborts the row before anything in it is timed, and makes the command exit 1.
3. **Warm up**, then measure **peak memory** of one forward+backward per implementation.
4. **Time** forward (eval mode, ``torch.no_grad``) and forward+backward (autograd on,
   ``output.sum().backward()``; train mode, or eval mode when an option is stochastic so that
   the runs stay deterministic and comparable), interleaving the implementations' samples.

Shape legend: ``B`` batch, ``T`` steps, ``I`` input features, ``H`` hidden, ``P`` projection,
``H_out = P or H``, ``L`` layers, ``D`` directions.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``fastlstm bench [flags]``: 0 if every row passed its check, else 1."""
    from .cli import main as run

    return run(argv)
