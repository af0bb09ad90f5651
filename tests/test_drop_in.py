"""fastlstm.LSTM / LSTMCell with default options against torch.nn.LSTM / LSTMCell.

The oracle is torch itself: the same weights (moved through state_dict), the same inputs, random
cotangents on every output; outputs, final states and the gradients of input, h0, c0 and every
parameter must agree to 1e-10 in float64 and 1e-5 in float32.
"""

import itertools

import pytest
import torch
from tests.twins import assert_runs_close, make_inputs, run_cell, run_lstm

import fastlstm

ARCHITECTURES = [
    dict(num_layers=layers, bidirectional=bidir, proj_size=proj, bias=bias)
    for layers, bidir, proj, bias in itertools.product((1, 2, 3), (False, True), (0, 3), (True, False))
]
FORMS = ("padded", "batch_first", "unbatched", "unbatched_batch_first", "packed_sorted", "packed_unsorted")
SHAPES = {
    "T1": dict(steps=1, batch=3, input_size=4, hidden_size=5),
    "B1": dict(steps=4, batch=1, input_size=4, hidden_size=5),
    "odd": dict(steps=5, batch=3, input_size=7, hidden_size=9),
}


def _arch_id(arch):
    return "L{num_layers}-{d}-P{proj_size}-{b}".format(
        d="bi" if arch["bidirectional"] else "uni", b="bias" if arch["bias"] else "nobias", **arch
    )


def build_pair(arch, input_size, hidden_size, *, batch_first, dtype, backend="auto"):
    ours = fastlstm.LSTM(input_size, hidden_size, batch_first=batch_first, dtype=dtype, backend=backend, **arch)
    theirs = torch.nn.LSTM(input_size, hidden_size, batch_first=batch_first, dtype=dtype, **arch)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def compare(arch, form, shape, with_hx, dtype, tol, backend):
    steps, batch, input_size, hidden_size = (shape[k] for k in ("steps", "batch", "input_size", "hidden_size"))
    batch_first = form in ("batch_first", "unbatched_batch_first")
    ours, theirs = build_pair(arch, input_size, hidden_size, batch_first=batch_first, dtype=dtype, backend=backend)
    d = 2 if arch["bidirectional"] else 1
    h_out = arch["proj_size"] or hidden_size
    inputs = make_inputs(
        form,
        steps,
        batch,
        input_size,
        (arch["num_layers"] * d, batch, h_out),
        (arch["num_layers"] * d, batch, hidden_size),
        dtype=dtype,
        with_hx=with_hx,
    )
    assert_runs_close(run_lstm(ours, inputs), run_lstm(theirs, inputs), rtol=tol, atol=tol)


@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=_arch_id)
def test_lstm_matches_torch_float64(arch, form, shape, with_hx, backend):
    compare(arch, form, shape, with_hx, torch.float64, 1e-10, backend)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHITECTURES[::3], ids=_arch_id)
def test_lstm_matches_torch_float32(arch, form, backend):
    compare(arch, form, SHAPES["odd"], True, torch.float32, 1e-5, backend)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch,input_size,hidden_size", [(1, 1, 1), (3, 4, 5), (2, 7, 9)])
def test_cell_matches_torch(bias, batched, with_hx, dtype, tol, batch, input_size, hidden_size, backend):
    ours = fastlstm.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype, backend=backend)
    theirs = torch.nn.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    shape = (batch,) if batched else ()
    x = torch.randn(*shape, input_size, dtype=dtype)
    hx = None
    if with_hx:
        hx = (torch.randn(*shape, hidden_size, dtype=dtype), torch.randn(*shape, hidden_size, dtype=dtype))
    assert_runs_close(run_cell(ours, x, hx), run_cell(theirs, x, hx), rtol=tol, atol=tol)


def test_cell_steps_a_sequence_like_the_layer(backend):
    """Stepping LSTMCell over a sequence gives torch.nn.LSTM's output when they share weights."""
    cell = fastlstm.LSTMCell(3, 4, dtype=torch.float64, backend=backend)
    layer = torch.nn.LSTM(3, 4, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, f"{name}_l0").copy_(getattr(cell, name))
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h = c = torch.zeros(2, 4, dtype=torch.float64)
    outputs = []
    for t in range(6):
        h, c = cell(x[t], (h, c))
        outputs.append(h)
    y, (h_n, c_n) = layer(x)
    torch.testing.assert_close(torch.stack(outputs), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_n[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_torch_within_its_own_error(dtype):
    """In half precision both compute differently; each must be as close to float64 as the other.

    fastlstm keeps c in float32 and accumulates in float32, so its error against the float64 truth
    must not exceed torch's own error at that precision (plus a small atol).
    """
    arch = dict(num_layers=2, bidirectional=True, proj_size=0, bias=True)
    exact, _ = build_pair(arch, 6, 8, batch_first=False, dtype=torch.float64)
    ours = fastlstm.LSTM(6, 8, dtype=dtype, **arch)
    ours.load_state_dict(exact.state_dict())
    theirs = torch.nn.LSTM(6, 8, dtype=dtype, **arch)
    theirs.load_state_dict(exact.state_dict())
    x = torch.randn(7, 3, 6, dtype=torch.float64)
    truth, (h_truth, c_truth) = exact(x)
    y_ours, (h_ours, c_ours) = ours(x.to(dtype))
    y_theirs, (h_theirs, c_theirs) = theirs(x.to(dtype))
    assert y_ours.dtype == h_ours.dtype == c_ours.dtype == dtype
    for mine, torchs, true in ((y_ours, y_theirs, truth), (h_ours, h_theirs, h_truth), (c_ours, c_theirs, c_truth)):
        err_ours = (mine.double() - true).abs().max().item()
        err_torch = (torchs.double() - true).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-3, (err_ours, err_torch)


# (input dtype, c_0 dtype) pairs where torch.nn.LSTM promotes c_0 into the input's dtype
NARROWER_C0 = [(torch.float64, torch.float32), (torch.float64, torch.bfloat16), (torch.float32, torch.float16)]


@pytest.mark.parametrize("form", ("padded", "packed_unsorted", "unbatched"))
@pytest.mark.parametrize("arch", ARCHITECTURES[::3], ids=_arch_id)
@pytest.mark.parametrize("dtype,c0_dtype", NARROWER_C0, ids=lambda d: str(d).removeprefix("torch."))
def test_lstm_promotes_a_narrower_c0_as_torch_does(dtype, c0_dtype, arch, form, backend):
    """torch.nn.LSTM takes a ``c_0`` narrower than its input (its pointwise math promotes it with the
    gates) and returns everything in the input's dtype, ``c_0``'s gradient in ``c_0``'s. (oneDNN refuses
    a float32 input with a half-precision ``c_0``: torch's loop, under a projection, is the oracle there.)"""
    if dtype == torch.float32 and not arch["proj_size"]:
        arch = dict(arch, proj_size=3)
    ours, theirs = build_pair(arch, 4, 5, batch_first=False, dtype=dtype, backend=backend)
    d = 2 if arch["bidirectional"] else 1
    inputs = make_inputs(form, 5, 3, 4, (arch["num_layers"] * d, 3, arch["proj_size"] or 5),
                         (arch["num_layers"] * d, 3, 5), dtype=dtype, with_hx=True)
    inputs.c0 = inputs.c0.to(c0_dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_runs_close(run_lstm(ours, inputs), run_lstm(theirs, inputs), rtol=tol, atol=tol)


@pytest.mark.parametrize("c0_dtype", [torch.int64, torch.bool], ids=["int64", "bool"])
@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell"])
def test_an_integer_or_bool_c0_is_promoted_as_torch_does(cls, c0_dtype, backend):
    """torch promotes an integer or bool ``c_0`` with the gates too (float64 input: every path)."""
    shape = (1, 3, 5) if cls == "LSTM" else (3, 5)
    theirs = getattr(torch.nn, cls)(4, 5, dtype=torch.float64)
    ours = getattr(fastlstm, cls)(4, 5, dtype=torch.float64, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    h0, c0 = torch.randn(shape, dtype=torch.float64), (torch.randn(shape) * 3).to(c0_dtype)
    runs = []
    for module in (ours, theirs):
        leaves = torch.utils._pytree.tree_leaves(module(x, (h0, c0)))
        sum(t.sum() for t in leaves).backward()
        runs.append(leaves + [p.grad for p in module.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lstm_refuses_a_wider_c0_or_h0_of_another_dtype():
    """A ``c_0`` wider than the input (torch: refused by oneDNN, a failed product in its loop), and an
    ``h_0`` of another dtype (torch multiplies it by the weights), are refused, naming the state."""
    lstm = fastlstm.LSTM(3, 4)
    x, state = torch.randn(2, 1, 3), torch.randn(1, 1, 4)
    with pytest.raises(RuntimeError, match=r"hx\[1\] has dtype torch.float64 but input has dtype torch.float32"):
        lstm(x, (state, state.double()))
    with pytest.raises(RuntimeError, match=r"hx\[0\] has dtype torch.float16 but input has dtype torch.float32"):
        lstm(x, (state.half(), state))


@pytest.mark.parametrize("dtype,c_dtype", [(torch.float64, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.bfloat16)],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_cell_promotes_c_of_another_dtype_as_torch_does(dtype, c_dtype, backend):
    """torch.nn.LSTMCell returns ``h'`` and ``c'`` in ``promote(input, c)``. Where that is the input's
    dtype the two agree to the input's precision; where it is wider torch rounds its products to the
    input's dtype first and fastlstm does not: within twice torch's own error against float64."""
    ours = fastlstm.LSTMCell(4, 5, dtype=dtype, backend=backend)
    theirs = torch.nn.LSTMCell(4, 5, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    x, h, c = torch.randn(3, 4).to(dtype), torch.randn(3, 5).to(dtype), torch.randn(3, 5).to(c_dtype)
    mine, torchs = run_cell(ours, x, (h, c)), run_cell(theirs, x, (h, c))
    if torch.promote_types(dtype, c_dtype) == dtype:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert_runs_close(mine, torchs, rtol=tol, atol=tol)
        return
    exact = torch.nn.LSTMCell(4, 5, dtype=torch.float64)
    exact.load_state_dict(ours.state_dict())
    truth = run_cell(exact, x.double(), (h.double(), c.double()))
    fields = lambda run: {"h": run.h_n, "c": run.c_n, **run.grads}  # noqa: E731
    for name, true in fields(truth).items():
        assert fields(mine)[name].dtype == fields(torchs)[name].dtype, name
        err_ours = (fields(mine)[name].double() - true).abs().max().item()
        err_torch = (fields(torchs)[name].double() - true).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6, (name, err_ours, err_torch)


@pytest.mark.parametrize("arch", [dict(), dict(bidirectional=True), dict(num_layers=2)], ids=["uni", "bi", "L2"])
@pytest.mark.parametrize("loss_on", ["c_n", "h_n"])
def test_a_projection_that_reached_nothing_gets_no_gradient_as_in_torch(arch, loss_on, backend):
    """One step with a loss on c_n alone: the top layer's projection reached nothing the loss reads,
    and torch leaves its weight's gradient None (code that finds unused parameters by ``grad is None``,
    DDP's among them, sees the same); every other gradient as torch's."""
    theirs = torch.nn.LSTM(4, 3, proj_size=2, dtype=torch.float64, **arch)
    ours = fastlstm.LSTM(4, 3, proj_size=2, dtype=torch.float64, backend=backend, **arch)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    grads = []
    for module in (ours, theirs):
        _, (h, c) = module(x)
        (c if loss_on == "c_n" else h).pow(2).sum().backward()
        grads.append({name: p.grad for name, p in module.named_parameters()})
    assert [n for n, g in grads[0].items() if g is None] == [n for n, g in grads[1].items() if g is None]
    for name, g in grads[1].items():
        if g is not None:
            torch.testing.assert_close(grads[0][name], g, rtol=1e-10, atol=1e-10)
