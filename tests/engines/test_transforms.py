"""The autograd features beyond a first-order backward, on every engine (engines/contract.py):
second-order gradients (``create_graph=True``), batched cotangents (``is_grads_batched=True``,
``jacobian(vectorize=True)``), ``torch.func`` transforms and forward-mode AD
(``torch.autograd.forward_ad``).

Oracles: torch.nn.LSTM / LSTMCell in float64 where torch computes the same thing, and
``torch.autograd.gradgradcheck`` (finite differences of the first-order gradients) for the
variants torch does not have. Triton runs in its interpreter.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import torch.autograd.forward_ad as fwad

import fastlstm

from tests.test_gradcheck import OPTIONS

F64 = torch.float64
ENGINES = ["cpu", "reference", "triton"]
ARCHS = {
    "plain": dict(),
    "bidirectional-2-layers": dict(bidirectional=True, num_layers=2),
    "proj": dict(proj_size=2),
}
FORMS = {"padded": None, "one-step": None, "packed": [2, 5, 3]}


def _pair(backend, **arch):
    """A fastlstm.LSTM on ``backend`` and a torch.nn.LSTM with the same weights, float64."""
    ours = fastlstm.LSTM(3, 4, dtype=F64, backend=backend, **arch)
    theirs = torch.nn.LSTM(3, 4, dtype=F64, **arch)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _input(form):
    steps = 1 if form == "one-step" else 5
    return torch.randn(steps, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(7))


def _outputs(module, x, form):
    """``(y, h_n, c_n)`` of ``module`` on ``x [T, B, I]`` in ``form`` (the packed output as its rows)."""
    if form == "packed":
        y, (h, c) = module(pack_padded_sequence(x, FORMS["packed"], enforce_sorted=False))
        return y.data, h, c
    y, (h, c) = module(x)
    return y, h, c


def _second_order(module, x, form):
    """A gradient penalty: d/d(x, params) of |d/dx loss|^2, with loss using every output."""
    x = x.detach().requires_grad_()
    y, h, c = _outputs(module, x, form)
    (gx,) = torch.autograd.grad(y.pow(2).sum() + h.sum() + c.pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("backend", ENGINES)
def test_second_order_gradients_match_torch(backend, arch, form):
    ours, theirs = _pair(backend, **arch)
    x = _input(form)
    for name, a, b in zip(["x", *dict(ours.named_parameters())], _second_order(ours, x, form),
                          _second_order(theirs, x, form)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ENGINES)
def test_second_order_gradients_of_a_cell_match_torch(backend):
    ours = fastlstm.LSTMCell(3, 4, backend=backend, dtype=F64)
    theirs = torch.nn.LSTMCell(3, 4, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    results = []
    for module in (ours, theirs):
        x = _input("one-step")[0].requires_grad_()
        hx = [torch.ones(3, 4, dtype=F64, requires_grad=True) for _ in range(2)]
        h, c = module(x, hx)
        (gx,) = torch.autograd.grad(h.pow(2).sum() + c.sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        results.append([x.grad, *(t.grad for t in hx), *(p.grad for p in module.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _chained(module, case):
    """``case``'s loss from calls of ``module`` that share history (the second call's state is the
    first's output; or one tensor is both h0 and c0), its first-order gradients in the parameters (and
    that tensor) taken with ``create_graph`` and a penalty on them differentiated again: both lists."""
    g = torch.Generator().manual_seed(3)
    wrt = list(module.parameters())
    if case == "lstm-state-carried":
        x1, x2 = (torch.randn(5, 3, 3, dtype=F64, generator=g) for _ in range(2))
        y, (h, c) = module(x2, module(x1)[1])
    else:
        x1, x2 = (torch.randn(3, 3, dtype=F64, generator=g) for _ in range(2))
        if case == "cell-chain":
            h, c = module(x2, module(x1))
        else:  # one tensor as h0 and c0
            s = torch.randn(3, 4, dtype=F64, generator=g, requires_grad=True)
            h, c = module(x1, (s, s))
            wrt.append(s)
        y = h
    first = torch.autograd.grad(y.pow(2).sum() + c.sum(), wrt, create_graph=True)
    second = torch.autograd.grad(sum(f.pow(2).sum() for f in first), wrt)
    return [f.detach() for f in first], list(second)


@pytest.mark.parametrize("case", ["cell-chain", "cell-one-tensor-both-states", "lstm-state-carried"])
@pytest.mark.parametrize("backend", ENGINES)
def test_create_graph_through_calls_that_share_history(backend, case):
    """Each call's differentiable backward gives its own partial derivatives: with the gradients asked
    of the saved tensors themselves, the paths between them (an h0 computed from the same weights, one
    tensor as both states) were counted by that backward and again by the outer one."""
    if case.startswith("cell"):
        ours, theirs = fastlstm.LSTMCell(3, 4, dtype=F64, backend=backend), torch.nn.LSTMCell(3, 4, dtype=F64)
        theirs.load_state_dict(ours.state_dict())
    else:
        ours, theirs = _pair(backend, num_layers=2, bidirectional=True)
    for order, a_list, b_list in zip(("first", "second"), _chained(ours, case), _chained(theirs, case)):
        for name, a, b in zip([*dict(ours.named_parameters()), "the state"], a_list, b_list):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name, o=order: f"{o} {n}: {m}")


@pytest.mark.parametrize("backend", ENGINES)
def test_second_order_gradients_with_every_length_zero(backend):
    """No row runs (``lengths`` all 0): the outputs are zeros and the states h0, c0, so the input's and
    the weights' first-order gradients are zeros, still differentiable, and the states' are the
    cotangents of h_n, c_n. (The compiled engines once took the stand-in of the input they do not
    keep, which has no rows either, for the input itself, and gave None: autograd.grad then called the
    input unused.)"""
    module = fastlstm.LSTM(3, 4, dtype=F64, backend=backend, bidirectional=True)
    x = _input("padded").requires_grad_()
    hx = [torch.randn(2, 3, 4, dtype=F64, requires_grad=True) for _ in range(2)]
    y, (h, c) = module(x, hx, lengths=torch.zeros(3, dtype=torch.int64))
    loss = y.pow(2).sum() + h.pow(2).sum() + c.sum()
    gx, gh0, gc0, gw = torch.autograd.grad(loss, [x, *hx, module.weight_ih_l0], create_graph=True)
    assert not gx.any() and not gw.any()
    torch.testing.assert_close(gh0, 2 * hx[0], rtol=0, atol=0)
    torch.testing.assert_close(gc0, torch.ones_like(hx[1]), rtol=0, atol=0)
    (gx.sum() + gh0.pow(2).sum() + gw.sum()).backward()  # the second order reaches h0 only
    torch.testing.assert_close(hx[0].grad, 8 * hx[0], rtol=0, atol=0)


def _functional(module, lengths, masks):
    """The module as a function of its input, states and parameters, its input packed with ``lengths``."""
    names = [n for n, _ in module.named_parameters()]
    kwargs = {} if masks is None else {"masks": masks}

    def f(x, h0, c0, *params):
        inputs = pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, (h, c) = torch.func.functional_call(module, dict(zip(names, params)), (inputs, (h0, c0)), kwargs)
        return y.data, h, c

    return f


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_gradgradcheck_every_option_on_the_cpu_engine(cfg, training):
    """Every variant, both directions, packed input: the second-order gradients are the
    derivatives of the first-order ones (finite differences; fast mode, a random projection)."""
    module = fastlstm.LSTM(2, 3, bidirectional=True, dtype=F64, backend="cpu", **cfg).train(training)
    h_out = cfg.get("proj_size") or 3
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 3, 2, dtype=F64, generator=g)
    h0 = torch.randn(2, 3, h_out, dtype=F64, generator=g)
    c0 = torch.randn(2, 3, 3, dtype=F64, generator=g)
    masks = module.sample_masks(x) if training else None
    f = _functional(module, [2, 3, 1], masks)
    params = [p.detach().clone() for p in module.parameters()]
    inputs = [t.requires_grad_() for t in (x, h0, c0, *params)]
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("cfg", [c for c in OPTIONS.values() if "proj_size" not in c],
                         ids=[k for k, c in OPTIONS.items() if "proj_size" not in c])
def test_gradgradcheck_every_option_of_a_cell_on_the_cpu_engine(cfg):
    cell = fastlstm.LSTMCell(2, 3, dtype=F64, backend="cpu", **cfg).train()
    g = torch.Generator().manual_seed(12)
    x, h0, c0 = (torch.randn(2, n, dtype=F64, generator=g) for n in (2, 3, 3))
    masks = cell.sample_masks(x) if cell.options.is_stochastic else None
    names = [n for n, _ in cell.named_parameters()]
    kwargs = {} if masks is None else {"masks": masks}

    def f(x, h0, c0, *params):
        return torch.func.functional_call(cell, dict(zip(names, params)), (x, (h0, c0)), kwargs)

    inputs = [t.requires_grad_() for t in (x, h0, c0, *(p.detach().clone() for p in cell.parameters()))]
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("backend", ENGINES)
def test_batched_cotangents_match_torch(backend, arch, form):
    """``is_grads_batched=True`` (autograd vmaps the backward over a batch of cotangents): four
    vector-Jacobian products at once, against torch.nn.LSTM's."""
    ours, theirs = _pair(backend, **arch)
    x = _input(form)
    results = []
    for module in (ours, theirs):
        leaf = x.clone().requires_grad_()
        y, h, c = _outputs(module, leaf, form)
        g = torch.Generator().manual_seed(5)
        cotangents = [torch.randn(4, *t.shape, dtype=F64, generator=g) for t in (y, h, c)]
        results.append(torch.autograd.grad((y, h, c), [leaf, *module.parameters()], cotangents, is_grads_batched=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _tangents(module, x, hx, grad_enabled):
    """Forward-mode AD: the tangents of ``(y, h_n, c_n)`` for tangents on ``x``, ``hx`` and every
    parameter (dual parameters through ``functional_call``)."""
    g = torch.Generator().manual_seed(11)
    with torch.set_grad_enabled(grad_enabled), fwad.dual_level():
        params = {n: fwad.make_dual(p.detach(), torch.randn(p.shape, dtype=F64, generator=g))
                  for n, p in module.named_parameters()}
        dual = [fwad.make_dual(t, torch.randn(t.shape, dtype=F64, generator=g)) for t in (x, *hx)]
        inputs = (dual[0], tuple(dual[1:])) if hx else (dual[0],)
        out = torch.func.functional_call(module, params, inputs)
        outputs = [out[0], *out[1]] if isinstance(out[1], tuple) else list(out)
        return [fwad.unpack_dual(t).tangent for t in outputs]


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("form", ["padded", "one-step"])
@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("backend", ENGINES)
def test_forward_mode_tangents_match_torch(backend, arch, form, grad_enabled):
    """``torch.autograd.forward_ad``: the engines have no tangent formulas, so a call inside a dual
    level runs the reference engine (it raised with grad enabled and dropped the tangents under
    no_grad). Tangents of every output for tangents on the input, states and parameters."""
    ours, theirs = _pair(backend, **arch)
    x = _input(form)
    layers = 2 * ours.num_layers if ours.bidirectional else ours.num_layers
    hx = [torch.randn(layers, 3, n, dtype=F64) for n in (ours.proj_size or 4, 4)]
    for a, b in zip(_tangents(ours, x, hx, grad_enabled), _tangents(theirs, x, hx, grad_enabled)):
        assert a is not None
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend", ENGINES)
def test_forward_mode_tangents_of_a_cell_and_of_step_match_torch(backend, grad_enabled):
    """The cell's fused single step and ``LSTM.step``'s native path (no autograd) take the
    reference engine inside a dual level too."""
    ours = fastlstm.LSTMCell(3, 4, backend=backend, dtype=F64)
    theirs = torch.nn.LSTMCell(3, 4, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    x, hx = _input("one-step")[0], [torch.randn(3, 4, dtype=F64) for _ in range(2)]
    for a, b in zip(_tangents(ours, x, hx, grad_enabled), _tangents(theirs, x, hx, grad_enabled)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    layer, reference = _pair(backend)
    x, v = _input("padded"), torch.randn(5, 3, 3, dtype=F64)
    with torch.set_grad_enabled(grad_enabled), fwad.dual_level():
        y, state = layer.step(fwad.make_dual(x, v))
        y_ref, (h_ref, c_ref) = reference(fwad.make_dual(x, v))
        for a, b in zip((y, *state), (y_ref, h_ref, c_ref)):
            torch.testing.assert_close(fwad.unpack_dual(a).tangent, fwad.unpack_dual(b).tangent, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_vectorized_jacobian_matches_torch(backend):
    ours, theirs = _pair(backend, bidirectional=True)
    x = _input("padded")[:3]
    jacobians = [torch.autograd.functional.jacobian(lambda x, m=m: m(x)[0], x, vectorize=True) for m in (ours, theirs)]
    torch.testing.assert_close(*jacobians, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_func_transforms_match_torch(backend):
    """grad, jacrev and jacfwd of a model on each engine against torch.nn.LSTM's (torch cannot vmap its
    own LSTM: vmap is checked against a loop over the batch)."""
    ours, theirs = _pair(backend, bidirectional=True, num_layers=2)
    x = _input("padded")[:3]
    results = []
    for module in (ours, theirs):
        params = dict(module.named_parameters())

        def loss(p, x, module=module):
            y, (h, c) = torch.func.functional_call(module, p, (x,))
            return y.square().sum() + c.sum()

        def output(x, module=module):
            return module(x)[0].sum(1)

        results.append([*torch.func.grad(loss, argnums=(0, 1))(params, x)[0].values(),
                        torch.func.grad(loss, argnums=1)(params, x), torch.func.jacrev(output)(x),
                        torch.func.jacfwd(output)(x)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    batch = torch.randn(4, 3, 2, 3, dtype=F64)
    mapped = torch.func.vmap(lambda x: ours(x)[0])(batch)
    torch.testing.assert_close(mapped, torch.stack([theirs(b)[0] for b in batch]), rtol=1e-10, atol=1e-10)


def test_torch_func_of_a_cell_matches_torch():
    ours = fastlstm.LSTMCell(3, 4, backend="cpu", dtype=F64)
    theirs = torch.nn.LSTMCell(3, 4, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    x = _input("padded")[0]
    jac = [torch.func.jacrev(lambda x, m=m: m(x)[1])(x) for m in (ours, theirs)]
    torch.testing.assert_close(*jac, rtol=1e-10, atol=1e-10)
    mapped = torch.func.vmap(ours)(x)[1]
    torch.testing.assert_close(mapped, torch.stack([theirs(r)[1] for r in x]), rtol=1e-10, atol=1e-10)


def test_a_failed_transform_leaves_later_calls_unaffected():
    """vmap of a training-mode stochastic model fails (random masks under randomness='error'); every
    later call of the CPU engine, in every form and shape, still equals the reference engine's."""
    noisy = fastlstm.LSTM(3, 4, zoneout=0.3, backend="cpu").train()
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda x: noisy(x)[0])(torch.randn(2, 5, 3, 3))
    ours, _ = _pair("cpu", bidirectional=True)
    reference = fastlstm.LSTM(3, 4, dtype=F64, backend="reference", bidirectional=True)
    reference.load_state_dict(ours.state_dict())
    for steps, batch in [(5, 3), (1, 3), (5, 1), (2, 7)]:
        x = torch.randn(steps, batch, 3, dtype=F64)
        (y, (h, c)), (y_ref, (h_ref, c_ref)) = ours(x), reference(x)
        for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    cell = fastlstm.LSTMCell(3, 4, backend="cpu")
    assert cell(torch.randn(3, 3))[0].shape == (3, 4)
