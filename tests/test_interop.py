"""Whole-model conversion (conversion.py, interop.py): every torch LSTM of a model replaced by
fastlstm's and back. Oracle: the original torch model, outputs and every gradient in float64;
back-conversion restores torch modules with identical state_dicts."""

import copy

import pytest
import torch
from torch import nn

import fastlstm


class Model(nn.Module):
    """Nested, shared and unbatched LSTMs, a cell and batch_first, around other modules."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.encoder = nn.Sequential(nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3))
        self.shared = nn.LSTM(6, 4, batch_first=True)
        self.blocks = nn.ModuleList([nn.Sequential(self.shared), nn.Sequential(self.shared)])
        self.cell = nn.LSTMCell(4, 6)
        self.unbatched = nn.LSTM(4, 3)

    def forward(self, x):  # x [T, B, 3]
        e = self.embed(x)
        y, _ = self.encoder[0](e)
        for block in self.blocks:
            y, _ = block[0](y.transpose(0, 1))
            y = torch.cat([y, y[..., :2]], -1).transpose(0, 1)
        h, c = self.cell(e[0])
        u, (hu, cu) = self.unbatched(e[:, 0])
        return [y, h, c, u, hu, cu]


def _outputs_and_grads(model, x):
    model.zero_grad()
    x = x.detach().requires_grad_()
    outputs = model(x)
    sum(o.square().sum() for o in outputs).backward()
    return outputs + [x.grad] + [p.grad for p in model.parameters()]


def test_converted_model_computes_what_torchs_does_and_converts_back():
    torch.manual_seed(0)
    model = Model().double()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = _outputs_and_grads(model, x)
    assert fastlstm.convert_lstms(model) is model
    assert isinstance(model.encoder[0], fastlstm.LSTM) and isinstance(model.cell, fastlstm.LSTMCell)
    assert model.blocks[0][0] is model.blocks[1][0] is model.shared  # still shared
    assert model.shared.batch_first
    for a, b in zip(_outputs_and_grads(model, x), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    fastlstm.convert_lstms(model, to="torch")
    assert type(model.encoder[0]) is nn.LSTM and type(model.cell) is nn.LSTMCell
    assert model.blocks[0][0] is model.blocks[1][0]
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)


def test_requires_grad_training_mode_device_and_dtype_carry_over():
    lstm = nn.LSTM(3, 4, dtype=torch.float64).eval()
    lstm.weight_hh_l0.requires_grad_(False)
    ours = fastlstm.LSTM.from_torch(lstm, peephole=True)
    assert not ours.training and ours.weight_ih_l0.dtype == torch.float64
    assert not ours.weight_hh_l0.requires_grad and ours.weight_ih_l0.requires_grad
    assert ours.options.peephole and ours.weight_peephole_l0.shape == (12,)  # its own parameter: initialised
    cell = fastlstm.LSTMCell.from_torch(nn.LSTMCell(3, 4, bias=False))
    assert cell.bias is False and type(cell.to_torch()) is nn.LSTMCell


def test_options_apply_to_each_module_and_block_the_way_back():
    model = nn.Sequential(nn.LSTM(3, 4), nn.Sequential(nn.LSTM(4, 4)))
    fastlstm.convert_lstms(model, peephole=True)
    assert model[0].options.peephole and model[1][0].options.peephole
    model[0] = fastlstm.LSTM(3, 4)  # convertible back; model[1][0] is not
    with pytest.raises(ValueError, match=r"1\.0: peephole=True: torch.nn.LSTM has no such option"):
        fastlstm.convert_lstms(model, to="torch")
    assert isinstance(model[0], fastlstm.LSTM)  # all or nothing: the convertible one was not converted


def test_forget_bias_only_sets_initial_values_so_it_converts_back():
    ours = fastlstm.LSTM(3, 4, forget_bias=1.0)
    theirs = ours.to_torch()
    assert torch.equal(theirs.bias_ih_l0, ours.bias_ih_l0)


def test_a_model_that_is_an_lstm_returns_its_conversion():
    lstm = nn.LSTM(3, 4)
    assert isinstance(fastlstm.convert_lstms(lstm), fastlstm.LSTM)


class MyLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        return super().forward(2 * x, hx)


def test_what_cannot_be_converted_raises_a_type_error_that_says_why():
    with pytest.raises(TypeError, match=r"^rnn: MyLSTM is a subclass of torch.nn.LSTM"):
        fastlstm.convert_lstms(nn.ModuleDict({"rnn": MyLSTM(3, 4)}))
    parametrized = nn.Sequential(nn.LSTM(3, 4))
    torch.nn.utils.parametrizations.weight_norm(parametrized[0], "weight_hh_l0")
    with pytest.raises(TypeError, match=r"^0: this torch.nn.LSTM has parametrizations"):
        fastlstm.convert_lstms(parametrized)
    scripted = torch.jit.script(nn.Sequential(nn.LSTM(3, 4)))
    with pytest.raises(TypeError, match="TorchScript module holding an LSTM"):
        fastlstm.convert_lstms(nn.ModuleDict({"scripted": scripted}))
    with pytest.raises(TypeError, match="TorchScript"):
        fastlstm.LSTM.from_torch(torch.jit.script(nn.LSTM(3, 4)))
    with pytest.raises(TypeError, match="not a torch.nn.LSTM"):
        fastlstm.LSTM.from_torch(nn.GRU(3, 4))
    with pytest.raises(ValueError, match="to should be"):
        fastlstm.convert_lstms(nn.LSTM(3, 4), to="keras")


@pytest.mark.parametrize("to", ["fastlstm", "torch"])
def test_conversion_keeps_the_parameter_objects(to):
    """As convert_sync_batchnorm does: the converted modules hold the same Parameter objects, so a
    weight tied across modules stays tied and an optimizer built before the conversion trains the
    converted model exactly as it trains an unconverted copy (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4, dtype=torch.float64), nn.LSTM(4, 4, dtype=torch.float64))
    model[1].weight_hh_l0 = model[0].weight_hh_l0  # tied
    if to == "torch":
        model = fastlstm.convert_lstms(model)  # (start from fastlstm's modules)
    reference = copy.deepcopy(model)  # (ties kept within the copy)
    before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    converted = fastlstm.convert_lstms(model, to=to)
    after = list(converted.parameters())
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before))
    assert converted[1].weight_hh_l0 is converted[0].weight_hh_l0
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for net, opt in ((converted, optimizer), (reference, reference_optimizer)):
        opt.zero_grad()
        net[1](net[0](x)[0])[0].square().sum().backward()
        opt.step()
    torch.testing.assert_close(converted[1](converted[0](x)[0])[0], reference[1](reference[0](x)[0])[0],
                               rtol=1e-12, atol=1e-12)
