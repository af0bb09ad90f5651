"""MATLAB ``lstmLayer`` / ``bilstmLayer`` learnables both ways (``fastlstm.interop.from_matlab``,
``to_matlab``). Oracle: a NumPy evaluation written from MATLAB's documentation of ``lstmLayer``
("Algorithms": gates i, f, g (cell candidate), o stacked in that order in InputWeights [4H, I],
RecurrentWeights [4H, H] and Bias [4H]; i, f, o = sigma_g(W x_t + R h_{t-1} + b), g = sigma_c(...);
c_t = f * c_{t-1} + i * g; h_t = o * sigma_c(c_t); "hard-sigmoid" is 0.2 x + 0.5 clipped to [0, 1];
``bilstmLayer`` stacks the forward direction's weights above the backward's and concatenates the
two directions' hidden states)."""

import numpy as np
import pytest
import torch

from fastlstm.interop import from_matlab, to_matlab

I, H, T = 3, 4, 6
ACT = {
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "hard-sigmoid": lambda x: np.clip(0.2 * x + 0.5, 0, 1),
    "tanh": np.tanh,
    "softsign": lambda x: x / (1 + np.abs(x)),
    "relu": lambda x: np.maximum(x, 0),
}


def _matlab_lstm(x, W, R, b, gate, state):
    """One direction, x [T, I] -> hidden states [T, H], from the documented equations."""
    h, c, out = np.zeros(H), np.zeros(H), []
    for x_t in x:
        z = W @ x_t + R @ h + b
        i, f, g, o = ACT[gate](z[:H]), ACT[gate](z[H:2 * H]), ACT[state](z[2 * H:3 * H]), ACT[gate](z[3 * H:])
        c = f * c + i * g
        h = o * ACT[state](c)
        out.append(h)
    return np.stack(out)


@pytest.mark.parametrize("gate, state", [("sigmoid", "tanh"), ("hard-sigmoid", "softsign"), ("sigmoid", "relu")])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["lstmLayer", "bilstmLayer"])
def test_imported_layer_computes_matlabs_equations(bidirectional, gate, state):
    rng = np.random.default_rng(0)
    rows = 4 * H * (2 if bidirectional else 1)
    W, R, b = rng.normal(0, 0.6, (rows, I)), rng.normal(0, 0.6, (rows, H)), rng.normal(0, 0.6, rows)
    x = rng.normal(0, 1.5, (T, I))
    expected = _matlab_lstm(x, W[: 4 * H], R[: 4 * H], b[: 4 * H], gate, state)
    if bidirectional:
        backward = _matlab_lstm(x[::-1], W[4 * H :], R[4 * H :], b[4 * H :], gate, state)[::-1]
        expected = np.concatenate([expected, backward], 1)
    module = from_matlab(W, R, b, gate_activation=gate, state_activation=state)
    y, _ = module(torch.from_numpy(x))
    torch.testing.assert_close(y.detach(), torch.from_numpy(np.ascontiguousarray(expected)), rtol=1e-12, atol=1e-12)
    exported = to_matlab(module)  # the round trip gives MATLAB's arrays back
    for name, original in (("InputWeights", W), ("RecurrentWeights", R), ("Bias", b)):
        torch.testing.assert_close(exported[name], torch.from_numpy(original), rtol=0, atol=0)
    assert (exported["GateActivationFunction"], exported["StateActivationFunction"]) == (gate, state)


BAD = [
    ("InputWeights", dict(W=(12, 3), R=(16, 4), b=(16,)), r"InputWeights should be \[16, InputSize\]"),
    ("RecurrentWeights", dict(W=(16, 3), R=(16, 5), b=(16,)), r"RecurrentWeights should be \[20 or 40, 5\]"),
    ("Bias", dict(W=(16, 3), R=(16, 4), b=(12,)), "Bias should have 16 elements"),
]


@pytest.mark.parametrize("label, shapes, message", BAD, ids=[b[0] for b in BAD])
def test_malformed_learnables_are_named(label, shapes, message):
    with pytest.raises(ValueError, match=message):
        from_matlab(*(np.zeros(s) for s in shapes.values()))


def test_what_an_lstm_layer_cannot_express_raises_naming_it():
    import fastlstm

    for module, name in ((fastlstm.LSTM(3, 4, num_layers=2), "num_layers=2"),
                         (fastlstm.LSTM(3, 4, peephole=True), "peephole"),
                         (fastlstm.LSTM(3, 4, proj_size=2), "proj_size=2"),
                         (fastlstm.LSTM(3, 4, activations=("sigmoid", "tanh", "softsign")), "activations")):
        with pytest.raises(ValueError, match=name):
            to_matlab(module)
    with pytest.raises(ValueError, match="GateActivationFunction='tanh'"):
        from_matlab(np.zeros((16, 3)), np.zeros((16, 4)), np.zeros(16), gate_activation="tanh")
