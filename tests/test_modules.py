"""The module surface: parameters, initialisation, state_dict both ways, dtype/device, repr, pickling."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from tests.twins import assert_runs_close, make_inputs, run_lstm

import fastlstm

ARCHS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, proj_size=2),
    dict(num_layers=2, bidirectional=True, proj_size=3, bias=False),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_parameters_have_torchs_names_shapes_and_order(arch):
    theirs = torch.nn.LSTM(5, 4, **arch)
    ours = fastlstm.LSTM(5, 4, **arch)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights
    assert [[p.shape for p in ps] for ps in ours.all_weights] == [[p.shape for p in ps] for ps in theirs.all_weights]


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_torchs_weights(arch):
    torch.manual_seed(123)
    theirs = torch.nn.LSTM(5, 4, **arch)
    torch.manual_seed(123)
    ours = fastlstm.LSTM(5, 4, **arch)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


def test_cell_same_seed_gives_torchs_weights():
    torch.manual_seed(7)
    theirs = torch.nn.LSTMCell(5, 6)
    torch.manual_seed(7)
    ours = fastlstm.LSTMCell(5, 6)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
    assert fastlstm.LSTMCell(5, 6, bias=False).bias_ih is None


def test_initialisation_is_uniform_in_plus_minus_one_over_sqrt_hidden():
    hidden = 64
    lstm = fastlstm.LSTM(32, hidden, num_layers=2, peephole=True, dtype=torch.float64)
    bound = 1 / math.sqrt(hidden)
    for name, p in lstm.named_parameters():
        assert p.abs().max() <= bound, name
        # a U(-b, b) sample of this size spans most of the interval and is centred
        assert p.max() > 0.9 * bound and p.min() < -0.9 * bound, name
        assert abs(p.mean().item()) < 0.1 * bound, name


def test_option_parameters_names_shapes_and_init():
    lstm = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, peephole=True, layer_norm=True)
    params = dict(lstm.named_parameters())
    for suffix in ("l0", "l0_reverse", "l1", "l1_reverse"):
        assert params[f"weight_peephole_{suffix}"].shape == (12,)
        assert params[f"layer_norm_ih_weight_{suffix}"].shape == (16,)
        assert params[f"layer_norm_hh_weight_{suffix}"].shape == (16,)
        assert torch.equal(params[f"layer_norm_cell_weight_{suffix}"], torch.ones(4))
        assert torch.equal(params[f"layer_norm_cell_bias_{suffix}"], torch.zeros(4))
        assert torch.equal(params[f"layer_norm_ih_weight_{suffix}"], torch.ones(16))
    names = [n for n, _ in lstm.named_parameters()]
    # torch's parameters first within each direction, in torch's order
    assert names[:4] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    cell = fastlstm.LSTMCell(3, 4, peephole=True, layer_norm=True)
    assert {n for n, _ in cell.named_parameters()} == {
        "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_peephole",
        "layer_norm_ih_weight", "layer_norm_hh_weight", "layer_norm_cell_weight", "layer_norm_cell_bias",
    }


@pytest.mark.parametrize("module", [fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True), fastlstm.LSTMCell(3, 5)])
def test_forget_bias_initialisation(module):
    module = type(module)(3, 5, forget_bias=1.0)
    for name, p in module.named_parameters():
        if name.startswith("bias_ih"):
            assert torch.equal(p[5:10], torch.ones(5))
            assert p[:5].abs().max() <= 1 / math.sqrt(5)
        if name.startswith("bias_hh"):
            assert torch.equal(p[5:10], torch.zeros(5))
    module.reset_parameters()
    assert torch.equal(dict(module.named_parameters())["bias_ih" if isinstance(module, fastlstm.LSTMCell) else "bias_ih_l0"][5:10], torch.ones(5))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("direction", ["torch_to_fastlstm", "fastlstm_to_torch"])
def test_state_dict_round_trip_gives_same_outputs_and_gradients(arch, direction):
    source_cls, target_cls = (torch.nn.LSTM, fastlstm.LSTM)
    if direction == "fastlstm_to_torch":
        source_cls, target_cls = target_cls, source_cls
    source = source_cls(5, 4, dtype=torch.float64, **arch)
    target = target_cls(5, 4, dtype=torch.float64, **arch)
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    d = 2 if arch.get("bidirectional") else 1
    h_out = arch.get("proj_size") or 4
    layers = arch["num_layers"]
    inputs = make_inputs("packed_unsorted", 6, 3, 5, (layers * d, 3, h_out), (layers * d, 3, 4), dtype=torch.float64, with_hx=True)
    assert_runs_close(run_lstm(target, inputs), run_lstm(source, inputs), rtol=1e-10, atol=1e-10)


def test_cell_state_dict_both_ways():
    ours, theirs = fastlstm.LSTMCell(3, 4), torch.nn.LSTMCell(3, 4)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours2 = fastlstm.LSTMCell(3, 4)
    ours2.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3)
    for a, b in zip(ours2(x), theirs(x)):
        torch.testing.assert_close(a, b)


def test_options_state_dict_is_not_loadable_into_plain_torch():
    """Extra parameters must not load silently into a model that would ignore them."""
    ours = fastlstm.LSTM(3, 4, peephole=True)
    with pytest.raises(RuntimeError, match="weight_peephole_l0"):
        torch.nn.LSTM(3, 4).load_state_dict(ours.state_dict(), strict=True)


def test_to_double_half_follow_the_parameters():
    lstm = fastlstm.LSTM(3, 4, layer_norm=True)
    assert lstm.double().weight_ih_l0.dtype == torch.float64
    y, (h, c) = lstm(torch.randn(5, 2, 3, dtype=torch.float64))
    assert y.dtype == h.dtype == c.dtype == torch.float64
    lstm.half()
    assert all(p.dtype == torch.float16 for p in lstm.parameters())
    y, (h, c) = lstm(torch.randn(5, 2, 3).half())
    assert y.dtype == h.dtype == c.dtype == torch.float16 and torch.isfinite(y).all()
    lstm.to(torch.bfloat16)
    y, _ = lstm(torch.randn(5, 2, 3).bfloat16())
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        lstm(torch.randn(5, 2, 3))
    assert fastlstm.LSTM(3, 4, dtype=torch.float64).weight_hh_l0.dtype == torch.float64
    assert fastlstm.LSTM(3, 4, device="cpu").weight_hh_l0.device.type == "cpu"


def test_extra_repr_matches_torch_and_shows_non_default_options():
    kwargs = dict(num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True, proj_size=2)
    assert repr(fastlstm.LSTM(3, 4, **kwargs)) == repr(torch.nn.LSTM(3, 4, **kwargs))
    assert repr(fastlstm.LSTM(3, 4)) == repr(torch.nn.LSTM(3, 4))
    assert repr(fastlstm.LSTMCell(3, 4, bias=False)) == repr(torch.nn.LSTMCell(3, 4, bias=False))
    text = repr(fastlstm.LSTM(3, 4, peephole=True, zoneout=0.1, backend="reference"))
    assert text == "LSTM(3, 4, peephole=True, zoneout=(0.1, 0.1), backend='reference')"
    assert repr(fastlstm.LSTMCell(3, 4, layer_norm=True)) == "LSTMCell(3, 4, layer_norm=True)"


def test_flatten_parameters_exists_and_changes_nothing():
    lstm = fastlstm.LSTM(3, 4)
    before = copy.deepcopy(lstm.state_dict())
    lstm.flatten_parameters()
    assert all(torch.equal(before[k], v) for k, v in lstm.state_dict().items())


@pytest.mark.parametrize(
    "module",
    [
        fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, peephole=True, zoneout=(0.1, 0.2)),
        fastlstm.LSTMCell(3, 4, layer_norm=True, activations=("hard_sigmoid", "tanh", "relu")),
    ],
)
@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_pickle_save_and_deepcopy(module, how):
    module.eval()
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(module))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    else:
        clone = copy.deepcopy(module)
    assert clone.options == module.options
    x = torch.randn(5, 3) if isinstance(module, fastlstm.LSTMCell) else torch.randn(6, 5, 3)
    a, b = module(x), clone(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_batch_gives_empty_outputs_like_torch():
    ours, theirs = fastlstm.LSTM(3, 4, num_layers=2), torch.nn.LSTM(3, 4, num_layers=2)
    y, (h, c) = ours(torch.randn(5, 0, 3))
    y2, (h2, c2) = theirs(torch.randn(5, 0, 3))
    assert y.shape == y2.shape and h.shape == h2.shape and c.shape == c2.shape
    h, c = fastlstm.LSTMCell(3, 4)(torch.randn(0, 3))
    assert h.shape == c.shape == (0, 4)


def test_backend_is_selectable_and_reference_is_always_available():
    lstm = fastlstm.LSTM(3, 4, backend="reference")
    assert lstm.backend == "reference"
    y, _ = lstm(torch.randn(5, 2, 3))
    assert y.shape == (5, 2, 4)


def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast the input may differ from the weights' dtype (torch skips its dtype check too);
    the call runs in the autocast dtype, with float32 accumulation, close to the float32 result. A
    cell on the CPU keeps torch's LSTMCell's dtypes there: float32 (test_half_precision.py)."""
    lstm = fastlstm.LSTM(4, 8, num_layers=2, layer_norm=True)
    x = torch.randn(6, 3, 4)
    exact, _ = lstm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = lstm(x)
        h1, c1 = fastlstm.LSTMCell(4, 8)(x[0])
        h1_torch, _ = torch.nn.LSTMCell(4, 8)(x[0])
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16
    assert h1.dtype == c1.dtype == h1_torch.dtype == torch.float32
    assert (y.float() - exact).abs().max() < 0.05


def test_functional_call_and_parametrizations_see_the_substituted_weights(backend):
    lstm = fastlstm.LSTM(3, 4, backend=backend)
    x = torch.randn(5, 2, 3)
    zeros = {k: torch.zeros_like(v) for k, v in lstm.named_parameters()}
    y, (h, c) = torch.func.functional_call(lstm, zeros, (x,))
    assert y.abs().max() == 0 and c.abs().max() == 0
    # weight_norm re-parametrises weight_hh_l0 as a property: the module must read it through getattr
    reference = torch.nn.LSTM(3, 4)
    reference.load_state_dict(lstm.state_dict())
    torch.nn.utils.parametrizations.weight_norm(lstm, "weight_hh_l0")
    torch.nn.utils.parametrizations.weight_norm(reference, "weight_hh_l0")
    with torch.no_grad():
        lstm.parametrizations.weight_hh_l0.original0.mul_(0.5)
        reference.parametrizations.weight_hh_l0.original0.mul_(0.5)
    torch.testing.assert_close(lstm(x)[0], reference(x)[0], rtol=1e-5, atol=1e-6)


# -- tools the modules do not support: a clear error, never a silently wrong model -------------------


@pytest.mark.parametrize("make", [lambda: fastlstm.LSTM(3, 4), lambda: fastlstm.LSTMCell(3, 4)], ids=["LSTM", "LSTMCell"])
def test_torchscript_refuses_and_names_what_works(make):
    model = torch.nn.Sequential(make())
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.export"):
        torch.jit.script(model)


def test_tracing_an_lstm_refuses_instead_of_fixing_the_length():
    with pytest.raises(RuntimeError, match="torch.jit.trace.*number of steps"):
        torch.jit.trace(fastlstm.LSTM(3, 4), torch.randn(5, 2, 3))


def test_a_traced_cell_runs_the_reference_step_and_generalises_over_the_batch():
    cell = fastlstm.LSTMCell(3, 4, peephole=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # (its shape checks become constants)
        traced = torch.jit.trace(cell, (torch.randn(2, 3),))
    x = torch.randn(5, 3)
    for a, b in zip(traced(x), cell(x)):
        torch.testing.assert_close(a, b)


def test_quantization_asked_for_a_module_raises():
    model = torch.nn.Sequential(fastlstm.LSTM(3, 4), torch.nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(RuntimeError, match="fastlstm.LSTM cannot be quantized"):
            torch.ao.quantization.quantize_dynamic(model, {fastlstm.LSTM})


def test_quantization_of_other_modules_warns_that_fastlstm_stays_in_float():
    model = torch.nn.Sequential(fastlstm.LSTM(3, 4), torch.nn.Linear(4, 2))
    x = torch.randn(5, 2, 3)
    expected = model[0](x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.warns(UserWarning, match="leaves fastlstm.LSTM in float"):
            quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear, torch.nn.LSTM})
    assert type(quantized[1]) is not torch.nn.Linear  # the Linear was converted
    torch.testing.assert_close(quantized[0](x)[0], expected, rtol=0, atol=0)
    assert not hasattr(quantized[0], "qconfig")


def test_forward_on_the_meta_device_gives_torchs_shapes():
    """Shape inference on the meta device (torch's LSTM runs there): a forward and backward of
    tensors without data. (Reading autocast's state for the meta device raised.)"""
    for ours, theirs, x in (
        (fastlstm.LSTM(3, 5, 2, bidirectional=True, proj_size=2, device="meta"),
         torch.nn.LSTM(3, 5, 2, bidirectional=True, proj_size=2, device="meta"), torch.randn(4, 2, 3, device="meta")),
        (fastlstm.LSTMCell(3, 5, device="meta"), torch.nn.LSTMCell(3, 5, device="meta"), torch.randn(2, 3, device="meta")),
    ):
        x.requires_grad_()
        mine, expected = ours(x), theirs(x)
        flat = lambda out: [out[0], *out[1]] if isinstance(out[1], tuple) else list(out)  # noqa: E731
        assert [(t.shape, t.device) for t in flat(mine)] == [(t.shape, t.device) for t in flat(expected)]
        sum(t.sum() for t in flat(mine)).backward()
        assert x.grad.shape == x.shape and x.grad.device.type == "meta"
