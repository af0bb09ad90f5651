"""Empty inputs, as torch takes them: B = 0 runs forward and backward on every engine and equals
torch.nn.LSTM (empty outputs, zero parameter gradients); T = 0 raises torch's error."""

import pytest
import torch

import fastlstm

ENGINES = ["cpu", "reference", "triton"]
ARCHS = {
    "plain": dict(),
    "bidirectional-2-layers": dict(num_layers=2, bidirectional=True),
    "proj-batch_first": dict(proj_size=2, batch_first=True),
}


def _results(module, x, hx):
    x = x.detach().requires_grad_()
    hx = None if hx is None else tuple(t.detach().requires_grad_() for t in hx)
    y, (h, c) = module(x, hx)
    (y.sum() + h.sum() + c.sum()).backward()
    grads = [x.grad] + ([] if hx is None else [t.grad for t in hx])
    return [y, h, c, *grads, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("with_state", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("backend", ENGINES)
def test_an_empty_batch_matches_torch(backend, arch, dtype, with_state):
    ours = fastlstm.LSTM(3, 4, dtype=dtype, backend=backend, **arch)
    theirs = torch.nn.LSTM(3, 4, dtype=dtype, **arch)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(0, 5, 3, dtype=dtype) if arch.get("batch_first") else torch.randn(5, 0, 3, dtype=dtype)
    layers = arch.get("num_layers", 1) * (2 if arch.get("bidirectional") else 1)
    hx = None
    if with_state:
        hx = (torch.randn(layers, 0, arch.get("proj_size") or 4, dtype=dtype), torch.randn(layers, 0, 4, dtype=dtype))
    for a, b in zip(_results(ours, x, hx), _results(theirs, x, hx), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", ENGINES)
def test_an_empty_batch_of_a_cell_matches_torch(backend, dtype):
    ours = fastlstm.LSTMCell(3, 4, dtype=dtype, backend=backend)
    theirs = torch.nn.LSTMCell(3, 4, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    results = []
    for module in (ours, theirs):
        x = torch.randn(0, 3, dtype=dtype, requires_grad=True)
        h, c = module(x)
        (h.sum() + c.sum()).backward()
        results.append([h, c, x.grad, *(p.grad for p in module.parameters())])
    for a, b in zip(*results, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("backend", ENGINES)
def test_no_steps_raises_torchs_error(backend, batch_first):
    x = torch.randn(2, 0, 3) if batch_first else torch.randn(0, 2, 3)
    messages = []
    for module in (fastlstm.LSTM(3, 4, batch_first=batch_first, backend=backend),
                   torch.nn.LSTM(3, 4, batch_first=batch_first)):
        with pytest.raises(RuntimeError) as raised:
            module(x)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
