"""torch's own tests of its LSTM, with the classes swapped: the inputs, references and error
expectations come from ``torch.testing._internal.common_modules`` (the ``module_db`` that torch's
``test_modules.py`` runs over ``nn.LSTM`` and ``nn.LSTMCell``), so these tests check behaviour we
did not write the expectations for, and catch drift from the installed torch.

For each ModuleInfo input, in train and eval mode, float64 and float32, on every engine ``"auto"``
picks and on the reference: the outputs equal torch's and torch's no-batch-dim reference; the
gradients of input, states and every parameter equal torch's; gradcheck and gradgradcheck pass
(torch's ``test_grad`` / ``test_gradgrad``); non-contiguous inputs give the same results; every
error input raises torch's exception type with a message matching torch's regex.
"""

import copy
import pickle
import re

import pytest
import torch

import torch.testing._internal.common_modules as common_modules  # (needs expecttest, a test dependency)

import fastlstm

SWAPS = {torch.nn.LSTM: fastlstm.LSTM, torch.nn.LSTMCell: fastlstm.LSTMCell}
INFOS = [info for info in common_modules.module_db if info.module_cls in SWAPS]
BACKENDS = ["auto", "reference"]


def test_torch_has_module_infos_for_both_classes():
    assert {info.module_cls for info in INFOS} == set(SWAPS)


def _inputs(info, dtype, training, requires_grad=True):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


def _cases():
    for info in INFOS:
        for training in (True, False):
            for k in range(len(_inputs(info, torch.float64, training))):
                yield pytest.param(info, training, k, id=f"{info.name}-{'train' if training else 'eval'}-{k}")


CASES = list(_cases())


def _pair(info, module_input, backend, dtype):
    """torch's module and ours, same constructor arguments and state_dict."""
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = info.module_cls(*args, **kwargs, dtype=dtype)
    ours = SWAPS[info.module_cls](*args, **kwargs, dtype=dtype, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _detached(value, contiguous=True):
    """A fresh leaf copy of a forward argument (tensors in tuples included); non-contiguous where asked
    (each tensor as a strided view of one twice as long in its last dimension)."""
    if isinstance(value, torch.Tensor):
        copy_ = value.detach().clone()
        if not contiguous:
            copy_ = torch.repeat_interleave(copy_, 2, dim=-1)[..., ::2]
            assert not copy_.is_contiguous() or copy_.numel() <= 1
        return copy_.requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v, contiguous) for v in value)
    return value


def _leaves(args):
    return [t for t in _flat(args) if t.requires_grad]


def _run(module, module_input, contiguous=True):
    """Outputs, then gradients of the input leaves and parameters for a fixed random cotangent."""
    args = _detached(module_input.forward_input.args, contiguous)
    outputs = _flat(module(*args, **module_input.forward_input.kwargs))
    g = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    grads = torch.autograd.grad(loss, _leaves(args) + list(module.parameters()), allow_unused=True)
    return outputs + list(grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info, training, k", CASES)
def test_forward_and_gradients_match_torch(info, training, k, backend, dtype):
    module_input = _inputs(info, dtype, training)[k]
    theirs, ours = _pair(info, module_input, backend, dtype)
    theirs.train(training)
    ours.train(training)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for contiguous in (True, False):
        for a, b in zip(_run(ours, module_input, contiguous), _run(theirs, module_input, contiguous), strict=True):
            torch.testing.assert_close(a, b, **tol)
    if module_input.reference_fn is not None:  # torch's reference: the same input with a batch dimension
        args = _detached(module_input.forward_input.args)
        expected = module_input.reference_fn(ours, *args, **module_input.forward_input.kwargs)
        for a, b in zip(_flat(ours(*args)), _flat(expected), strict=True):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info, training, k", CASES)
def test_gradcheck_and_gradgradcheck(info, training, k, backend):
    """torch's test_grad and test_gradgrad on these inputs: float64, inputs and parameters."""
    module_input = _inputs(info, torch.float64, training)[k]
    _, ours = _pair(info, module_input, backend, torch.float64)
    ours.train(training)
    args = _detached(module_input.forward_input.args)
    leaves = _leaves(args)
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]

    def f(*flat):
        values = iter(flat[: len(leaves)])
        call_args = _replace_leaves(args, values)
        state = dict(zip(names, flat[len(leaves):]))
        return tuple(_flat(torch.func.functional_call(ours, state, call_args, module_input.forward_input.kwargs)))

    inputs = (*leaves, *params)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def _replace_leaves(value, leaves):
    if isinstance(value, torch.Tensor):
        return next(leaves) if value.requires_grad else value
    if isinstance(value, (tuple, list)):
        return type(value)(_replace_leaves(v, leaves) for v in value)
    return value


def _error_cases():
    for info in INFOS:
        if info.module_error_inputs_func is None:
            continue
        for training in (True, False):
            errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                                   training=training)
            for k in range(len(errors)):
                yield pytest.param(info, training, k, id=f"{info.name}-{'train' if training else 'eval'}-{k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info, training, k", list(_error_cases()))
def test_error_inputs_raise_torchs_type_and_message(info, training, k, backend):
    error = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                          training=training)[k]
    module_input = error.module_error_input
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    on_construction = error.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR
    with pytest.raises(error.error_type) as raised:
        module = SWAPS[info.module_cls](*args, **kwargs, backend=backend).train(training)
        assert not on_construction, "the constructor accepted what torch's refuses"
        module(*module_input.forward_input.args, **module_input.forward_input.kwargs)
    assert re.search(error.error_regex, str(raised.value)), (str(raised.value), error.error_regex)


@pytest.mark.parametrize("info", INFOS, ids=[i.name for i in INFOS])
def test_pickle_deepcopy_and_to_empty(info):
    """torch's test_pickle, and test_to_empty's contract: a copy computes what the original does; a
    module moved to_empty has parameters of the same shapes, uninitialised."""
    module_input = _inputs(info, torch.float64, False)[0]
    _, ours = _pair(info, module_input, "auto", torch.float64)
    args = module_input.forward_input.args
    expected = _flat(ours(*args))
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        for a, b in zip(_flat(clone(*args)), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    shapes = [p.shape for p in ours.parameters()]
    empty = ours.to_empty(device="meta")
    assert [p.shape for p in empty.parameters()] == shapes
    assert all(p.device.type == "meta" for p in empty.parameters())
