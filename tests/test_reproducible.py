"""Reproducible by construction: no engine draws from torch's global generator unless an option
asks for randomness, and every implementation choice (GEMM library, thread split) is a fixed
function of shape, dtype and machine, so two processes give bitwise equal results."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm

ENGINES = ["cpu", "reference", "triton"]
# (T, B, I, H): small, and one whose input product the fixed rule gives to oneDNN (K >= 256)
SHAPES = [(3, 2, 4, 5), (2, 3, 300, 8), (1, 1, 4, 5)]


@pytest.mark.parametrize("backend", ENGINES)
def test_calls_leave_torchs_random_state_unchanged(backend):
    """First and later calls, every shape, forward and backward, eval and training mode (no
    stochastic option): torch.get_rng_state() is what it was."""
    for steps, batch, inputs, hidden in SHAPES:
        torch.manual_seed(0)
        lstm = fastlstm.LSTM(inputs, hidden, num_layers=2, bidirectional=True, backend=backend)
        cell = fastlstm.LSTMCell(inputs, hidden, backend=backend)
        x = torch.randn(steps, batch, inputs, requires_grad=True)
        for training in (False, True, True):
            lstm.train(training)
            cell.train(training)
            state = torch.get_rng_state()
            y, (h, c) = lstm(x)
            h1, c1 = cell(x[0])
            (y.sum() + c.sum() + h1.sum() + c1.sum()).backward()
            assert torch.equal(torch.get_rng_state(), state), (backend, steps, batch, inputs, hidden, training)


def test_a_seeded_training_run_draws_what_torchs_draws():
    """A seeded script that shuffles and applies dropout around an LSTM: with fastlstm.LSTM it
    draws the same random numbers as with torch.nn.LSTM (same initial weights, same stream
    after every step), so its batches and masks are the same."""
    def train(lstm_class):
        torch.manual_seed(3)
        lstm = lstm_class(6, 16, num_layers=2)
        head = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        params = [*lstm.parameters(), *head.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.1)
        data = torch.randn(32, 8, 6)
        states = [[p.detach().clone() for p in lstm.parameters()]]
        for _ in range(3):
            order = torch.randperm(32)
            x = data[order[:8]].transpose(0, 1)
            loss = head(lstm(x)[0]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            states.append(torch.get_rng_state())
        return states

    ours, theirs = train(fastlstm.LSTM), train(torch.nn.LSTM)
    for a, b in zip(ours[0], theirs[0]):
        assert torch.equal(a, b)  # the same initial weights
    for a, b in zip(ours[1:], theirs[1:]):
        assert torch.equal(a, b)


_SCRIPT = textwrap.dedent("""
    import hashlib, torch, fastlstm
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    digest = hashlib.sha256()
    for steps, batch, inputs, hidden in [(7, 5, 300, 64), (4, 3, 5, 16), (1, 1, 5, 16)]:
        lstm = fastlstm.LSTM(inputs, hidden, num_layers=2, bidirectional=True, backend="cpu")
        x = torch.randn(steps, batch, inputs, requires_grad=True)
        y, (h, c) = lstm(x)
        (y.square().sum() + c.sum()).backward()
        for t in [y, h, c, x.grad, *(p.grad for p in lstm.parameters())]:
            digest.update(t.detach().numpy().tobytes())
    print(digest.hexdigest())
""")


def test_two_processes_give_bitwise_equal_results():
    """The CPU engine in two fresh processes (two threads, float32, shapes on both sides of the GEMM
    rule, torch.use_deterministic_algorithms on): outputs, states and every gradient bitwise equal."""
    digests = [subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout for _ in range(2)]
    assert digests[0] == digests[1] and len(digests[0].strip()) == 64


@pytest.mark.parametrize("form", ["padded", "packed-sorted", "packed-unsorted"])
def test_inter_layer_dropout_draws_torchs_masks(form):
    """Training-mode inter-layer dropout, seeded: the same outputs, states, gradients and RNG state
    after the call as torch.nn.LSTM's, float64 (torch draws a PackedSequence's masks over its rows);
    ``lengths=`` on the padded input draws what the PackedSequence does, and ``sample_masks``
    replays it."""
    x = torch.randn(6, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lengths = [6, 5, 3, 2] if form == "packed-sorted" else [3, 6, 2, 5]
    results = []
    for lstm_class in (torch.nn.LSTM, fastlstm.LSTM):
        torch.manual_seed(0)
        lstm = lstm_class(3, 5, num_layers=3, dropout=0.5, bidirectional=True, dtype=torch.float64).train()
        inputs = x if form == "padded" else pack_padded_sequence(x, lengths, enforce_sorted=form == "packed-sorted")
        y, (h, c) = lstm(inputs)
        y = y if form == "padded" else y.data
        grads = torch.autograd.grad(y.square().sum() + c.sum(), list(lstm.parameters()))
        results.append([y, h, c, *grads, torch.get_rng_state()])
    for a, b in zip(*results):
        assert torch.equal(a, b) if a.dtype == torch.uint8 else torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    if form == "padded":
        return
    lstm = fastlstm.LSTM(3, 5, num_layers=3, dropout=0.5, dtype=torch.float64).train()
    torch.manual_seed(2)
    y_packed = lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]
    torch.manual_seed(2)
    y_lengths = lstm(x, lengths=torch.tensor(lengths))[1]
    torch.manual_seed(2)
    masks = lstm.sample_masks(x, lengths=torch.tensor(lengths))
    y_replayed = lstm(x, lengths=torch.tensor(lengths), masks=masks)[1]
    for a, b in ((y_packed, y_lengths), (y_packed, y_replayed)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # many sequences of equal lengths: pack_padded_sequence's sort is unstable above 16, and lengths=
    # sorts as it does, so the rows (and the masks drawn over them) are in the same order
    many = torch.randint(1, 7, (40,), generator=torch.Generator().manual_seed(5))
    x = torch.randn(6, 40, 3, dtype=torch.float64)
    torch.manual_seed(2)
    y_packed = lstm(pack_padded_sequence(x, many, enforce_sorted=False))[1]
    torch.manual_seed(2)
    torch.testing.assert_close(lstm(x, lengths=many)[1], y_packed, rtol=1e-12, atol=1e-12)
