"""haste's ``LSTM`` and ``LayerNormLSTM`` state dicts both ways (``fastlstm.interop.from_haste``,
``to_haste``). Oracle: a NumPy evaluation written from haste's kernels (LMNT, github.com/lmnt-com/haste):
``lib/lstm_forward_gpu.cu.cc`` (``v = x kernel + h recurrent_kernel + bias``, gates stacked i, g, f, o;
``c = f c + i g``; ``h = o tanh(c)``; zoneout in eval ``h = z h_prev + (1 - z) h_new``, on h only) and
``lib/layer_norm_lstm_forward_gpu.cu.cc`` with ``lib/layer_norm_forward_gpu.cu.cc`` (the input and
recurrent products each layer-normalised with gains ``gamma[0]``, ``gamma[1]`` and no shift before the
bias is added; ``h = o tanh(LN(c) gamma_h + beta_h)``; biased variance, eps 1e-5)."""

import numpy as np
import pytest
import torch

import fastlstm
from fastlstm.interop import from_haste, to_haste

T, B, I, H = 6, 3, 4, 5


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _normalise(v):
    mean = v.mean(-1, keepdims=True)
    return (v - mean) / np.sqrt(((v - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def _haste_lstm(x, state, zoneout=0.0):
    """x [T, B, I] -> (h for every step [T, B, H], final h, final c), haste's equations in eval mode."""
    layer_norm = "gamma" in state
    h, c, out = np.zeros((B, H)), np.zeros((B, H)), []
    for x_t in x:
        wx, rh = x_t @ state["kernel"], h @ state["recurrent_kernel"]
        if layer_norm:
            wx, rh = _normalise(wx) * state["gamma"][0], _normalise(rh) * state["gamma"][1]
        v = wx + rh + state["bias"]
        i, g, f, o = _sigmoid(v[:, :H]), np.tanh(v[:, H:2 * H]), _sigmoid(v[:, 2 * H:3 * H]), _sigmoid(v[:, 3 * H:])
        c = f * c + i * g
        shown = _normalise(c) * state["gamma_h"] + state["beta_h"] if layer_norm else c
        h = zoneout * h + (1 - zoneout) * (o * np.tanh(shown))
        out.append(h)
    return np.stack(out), h, c


def _haste_state(seed, layer_norm):
    rng = np.random.default_rng(seed)
    state = {"kernel": rng.normal(0, 0.5, (I, 4 * H)), "recurrent_kernel": rng.normal(0, 0.5, (H, 4 * H)),
             "bias": rng.normal(0, 0.5, 4 * H)}
    if layer_norm:
        state.update(gamma=rng.normal(1, 0.3, (2, 4 * H)), gamma_h=rng.normal(1, 0.3, H), beta_h=rng.normal(0, 0.3, H))
    return state


@pytest.mark.parametrize("zoneout", [0.0, 0.3])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["LSTM", "LayerNormLSTM"])
def test_imported_layer_computes_hastes_equations(layer_norm, zoneout):
    state = _haste_state(int(layer_norm), layer_norm)
    x = np.random.default_rng(5).normal(0, 1.5, (T, B, I))
    y_ref, h_ref, c_ref = _haste_lstm(x, state, zoneout)
    module = from_haste(state, zoneout=zoneout)
    assert module.options.layer_norm == layer_norm and module.options.zoneout == (zoneout, 0.0)
    with torch.no_grad():
        y, (h, c) = module(torch.from_numpy(x))
    for name, ours, theirs in (("output", y, y_ref), ("h_n", h[0], h_ref), ("c_n", c[0], c_ref)):
        torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    exported = to_haste(module)  # the round trip gives haste's tensors back
    assert sorted(exported) == sorted(state)
    for name, original in state.items():
        torch.testing.assert_close(exported[name], torch.from_numpy(original), rtol=0, atol=0)


class _HasteLike(torch.nn.Module):
    """Stands in for a haste module (which needs CUDA): parameters and constructor settings by haste's names."""

    def __init__(self, state):
        super().__init__()
        for name, value in state.items():
            self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value)))
        self.batch_first, self.zoneout, self.dropout = True, 0.2, 0.1


def test_module_settings_are_read():
    module = from_haste(_HasteLike(_haste_state(0, False)))
    assert module.batch_first and module.options.zoneout == (0.2, 0.0) and module.options.weight_drop == 0.1
    assert not from_haste(_HasteLike(_haste_state(0, False)), batch_first=False).batch_first


BAD = [
    ("missing", dict(drop="bias"), "bias: missing"),
    ("recurrent_kernel", dict(recurrent_kernel=(H, 3 * H)), r"recurrent_kernel should be \[hidden_size, 4"),
    ("kernel", dict(kernel=(I, 4 * H + 4)), r"kernel should be \[input_size, 20\]"),
    ("bias", dict(bias=(H,)), r"bias should be \[20\]"),
    ("gamma", dict(gamma=(4 * H,)), r"gamma should be \[2, 20\]"),
]


@pytest.mark.parametrize("label, change, message", BAD, ids=[b[0] for b in BAD])
def test_malformed_state_dicts_are_named(label, change, message):
    state = _haste_state(0, True)
    for name, shape in change.items():
        if name == "drop":
            del state[shape]
        else:
            state[name] = np.zeros(shape)
    with pytest.raises(ValueError, match=message):
        from_haste(state)


def test_what_haste_cannot_express_raises_naming_it():
    for module, name in ((fastlstm.LSTM(I, H, num_layers=2), "num_layers=2"),
                         (fastlstm.LSTM(I, H, bidirectional=True), "bidirectional"),
                         (fastlstm.LSTM(I, H, peephole=True), "peephole"),
                         (fastlstm.LSTM(I, H, zoneout=0.1), "zones out h only")):
        with pytest.raises(ValueError, match=name):
            to_haste(module)
