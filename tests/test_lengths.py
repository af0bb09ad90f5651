"""``LSTM.forward(input, lengths=...)``: padded input with per-sequence lengths means what a
PackedSequence of those lengths means, on every engine: against torch.nn.LSTM on the packed
input (float64, outputs, states and every gradient) and against fastlstm's own packed path."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm

F64 = torch.float64
ENGINES = ["cpu", "reference", "triton"]
ARCHS = {
    "plain": dict(),
    "bidirectional-2-layers-proj": dict(num_layers=2, bidirectional=True, proj_size=2),
    "batch_first-bidirectional": dict(batch_first=True, bidirectional=True),
}
LENGTHS = [3, 6, 1, 4]


def _run(module, x, lengths, packed):
    """Padded outputs, states and the gradients of input, states and parameters."""
    x = x.detach().requires_grad_()
    layers = module.num_layers * (2 if module.bidirectional else 1)
    h_out = module.proj_size or module.hidden_size
    g = torch.Generator().manual_seed(1)
    hx = (torch.randn(layers, len(LENGTHS), h_out, dtype=F64, generator=g).requires_grad_(),
          torch.randn(layers, len(LENGTHS), module.hidden_size, dtype=F64, generator=g).requires_grad_())
    if packed:
        y, (h, c) = module(pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False), hx)
        y, _ = pad_packed_sequence(y, batch_first=module.batch_first, total_length=6)
    else:
        y, (h, c) = module(x, hx, lengths=lengths)
    loss = sum((t * torch.randn(t.shape, dtype=F64, generator=g)).sum() for t in (y, h, c))
    return [y, h, c, *torch.autograd.grad(loss, [x, *hx, *module.parameters()])]


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("backend", ENGINES)
def test_lengths_mean_a_packed_sequence(backend, arch):
    ours = fastlstm.LSTM(3, 4, dtype=F64, backend=backend, **arch)
    theirs = torch.nn.LSTM(3, 4, dtype=F64, **arch)
    theirs.load_state_dict(ours.state_dict())
    shape = (4, 6, 3) if arch.get("batch_first") else (6, 4, 3)
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor(LENGTHS)
    with_lengths = _run(ours, x, lengths, packed=False)
    for expected in (_run(theirs, x, lengths, packed=True), _run(ours, x, lengths, packed=True)):
        for a, b in zip(with_lengths, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ENGINES)
def test_a_length_of_zero_keeps_the_initial_state(backend):
    lstm = fastlstm.LSTM(3, 4, dtype=F64, backend=backend, bidirectional=True)
    x = torch.randn(5, 3, 3, dtype=F64)
    hx = (torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 4, dtype=F64))
    y, (h, c) = lstm(x, hx, lengths=torch.tensor([2, 0, 5]))
    assert torch.equal(h[:, 1], hx[0][:, 1]) and torch.equal(c[:, 1], hx[1][:, 1])
    assert not y[:, 1].any() and not y[2:, 0].any()


def test_unbatched_input_takes_a_scalar_length():
    lstm = fastlstm.LSTM(3, 4, dtype=F64)
    x = torch.randn(6, 3, dtype=F64)
    y, (h, c) = lstm(x, lengths=torch.tensor(4))
    y_short, (h_short, c_short) = lstm(x[:4])
    torch.testing.assert_close(y[:4], y_short, rtol=0, atol=0)
    assert not y[4:].any()
    torch.testing.assert_close(h, h_short, rtol=0, atol=0)


BAD = [
    ("a list", [3, 2], TypeError, "lengths should be an int64 Tensor"),
    ("float", torch.tensor([3.0, 2.0]), TypeError, "lengths should be an int64 Tensor, got dtype"),
    ("2-D", torch.tensor([[1, 2]]), ValueError, r"lengths should have shape \[2\]"),
    ("too few", torch.tensor([1]), ValueError, r"lengths should have shape \[2\]"),
    ("above T", torch.tensor([1, 7]), ValueError, "lengths should be between 0 and the input's 6 steps"),
    ("negative", torch.tensor([-1, 2]), ValueError, "lengths should be between 0"),
]


@pytest.mark.parametrize("label, lengths, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_lengths_raise_naming_lengths(label, lengths, error, message):
    with pytest.raises(error, match=message):
        fastlstm.LSTM(3, 4)(torch.randn(6, 2, 3), lengths=lengths)


def test_lengths_with_a_packed_sequence_raise():
    packed = pack_padded_sequence(torch.randn(6, 2, 3), [6, 2])
    with pytest.raises(ValueError, match="lengths: a PackedSequence input carries its own"):
        fastlstm.LSTM(3, 4)(packed, lengths=torch.tensor([6, 2]))
