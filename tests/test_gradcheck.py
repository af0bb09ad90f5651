"""torch.autograd.gradcheck (float64, small shapes) for every option: the gradients the reference's
autograd produces are the derivatives of what it computes, inputs, states and every parameter.
(The CPU engine's hand-written backward has its own gradcheck in tests/engines/test_cpu.py.)"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm

F64 = torch.float64

OPTIONS = {
    "plain": {},
    "activations": dict(activations=("hard_sigmoid", "softsign", "relu")),
    "peephole": dict(peephole=True),
    "clip": dict(clip=0.6),
    "coupled": dict(coupled_input_forget=True),
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=(0.3, 0.4)),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "weight_drop": dict(weight_drop=0.3),
    "cell_clip": dict(cell_clip=0.4),
    "proj_clip": dict(proj_size=2, proj_clip=0.3),
    "forget_bias": dict(forget_bias=1.0),
    "everything": dict(
        activations=("sigmoid", "tanh", "softsign"), peephole=True, clip=2.0, layer_norm=True,
        zoneout=0.2, recurrent_dropout=0.2, weight_drop=0.2, cell_clip=1.5, proj_size=2, proj_clip=1.0,
    ),
}


def _lstm_gradcheck(module, inputs_fn, masks):
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def f(x, h0, c0, *flat):
        out, (h, c) = torch.func.functional_call(
            module, dict(zip(names, flat)), (inputs_fn(x), (h0, c0)), {"masks": masks} if masks is not None else {}
        )
        return (out.data if hasattr(out, "batch_sizes") else out), h, c

    return f, params


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_lstm_gradcheck(cfg, training):
    module = fastlstm.LSTM(2, 3, bidirectional=True, dtype=F64, backend="reference", **cfg).train(training)
    d, h_out = 2, cfg.get("proj_size") or 3
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(d, 2, h_out, dtype=F64, requires_grad=True)
    c0 = torch.randn(d, 2, 3, dtype=F64, requires_grad=True)
    masks = module.sample_masks(x) if training else None

    def packed(x):
        return pack_padded_sequence(x, [2, 3], enforce_sorted=False)

    f, params = _lstm_gradcheck(module, packed, masks)
    assert torch.autograd.gradcheck(f, (x, h0, c0, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cfg", [OPTIONS["everything"], OPTIONS["layer_norm"]], ids=["everything", "layer_norm"])
def test_two_layer_gradcheck_with_inter_layer_dropout(cfg):
    module = fastlstm.LSTM(2, 3, num_layers=2, dropout=0.4, dtype=F64, backend="reference", **cfg).train()
    h_out = cfg.get("proj_size") or 3
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 2, h_out, dtype=F64, requires_grad=True)
    c0 = torch.randn(2, 2, 3, dtype=F64, requires_grad=True)
    masks = module.sample_masks(x)
    f, params = _lstm_gradcheck(module, lambda x: x, masks)
    assert torch.autograd.gradcheck(f, (x, h0, c0, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", [c for k, c in OPTIONS.items() if "proj_size" not in c], ids=[k for k, c in OPTIONS.items() if "proj_size" not in c])
def test_cell_gradcheck(cfg, training):
    cell = fastlstm.LSTMCell(2, 3, dtype=F64, backend="reference", **cfg).train(training)
    x = torch.randn(2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    c0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    masks = cell.sample_masks(x) if training else None
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def f(x, h0, c0, *flat):
        kwargs = {"masks": masks} if masks is not None else {}
        return torch.func.functional_call(cell, dict(zip(names, flat)), (x, (h0, c0)), kwargs)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params), eps=1e-6, atol=1e-7, rtol=1e-5)
