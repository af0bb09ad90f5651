"""TensorFlow 1 ``LSTMCell`` / ``LSTMBlockCell`` variables imported (``fastlstm.interop.from_tf1``).
Oracle: a NumPy evaluation written from TF1's ``LSTMCell.call`` (tensorflow/python/ops/rnn_cell_impl.py,
"Long short-term memory unit (LSTM) recurrent network cell"): ``lstm_matrix = [x, m_prev] @ kernel +
bias`` split as i, j, f, o; with peepholes ``c = sigmoid(f + forget_bias + w_f_diag * c_prev) * c_prev
+ sigmoid(i + w_i_diag * c_prev) * act(j)``, then ``c`` clipped to ``cell_clip``,
``m = sigmoid(o + w_o_diag * c) * act(c)``, then ``m @ projection/kernel`` clipped to ``proj_clip``."""

import numpy as np
import pytest
import torch

from fastlstm.interop import from_tf1

I, H, P, T, B = 3, 5, 2, 6, 2
ACT = {"tanh": np.tanh, "softsign": lambda x: x / (1 + np.abs(x)), "relu": lambda x: np.maximum(x, 0)}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _tf1_cell(x, kernel, bias, forget_bias, diag, projection, cell_clip, proj_clip, act):
    """x [T, B, I] -> outputs m [T, B, H_out], final (m, c)."""
    act = ACT[act]
    h_out = H if projection is None else projection.shape[1]
    m, c, out = np.zeros((B, h_out)), np.zeros((B, H)), []
    w_i, w_f, w_o = diag if diag is not None else (0, 0, 0)
    for x_t in x:
        z = np.concatenate([x_t, m], 1) @ kernel + bias
        i, j, f, o = np.split(z, 4, axis=1)
        c = _sigmoid(f + forget_bias + w_f * c) * c + _sigmoid(i + w_i * c) * act(j)
        if cell_clip is not None:
            c = np.clip(c, -cell_clip, cell_clip)
        m = _sigmoid(o + w_o * c) * act(c)
        if projection is not None:
            m = m @ projection
            if proj_clip is not None:
                m = np.clip(m, -proj_clip, proj_clip)
        out.append(m)
    return np.stack(out), m, c


CONFIGS = {
    "plain": dict(),
    "forget_bias-0": dict(forget_bias=0.0),
    "peepholes-cell_clip": dict(peepholes=True, cell_clip=0.5),
    "projection-proj_clip-softsign": dict(projection=True, proj_clip=0.3, activation="softsign"),
    "everything": dict(peepholes=True, projection=True, cell_clip=0.8, proj_clip=0.4, forget_bias=0.5),
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_imported_cell_computes_tf1s_equations(cfg):
    rng = np.random.default_rng(0)
    h_out = P if cfg.get("projection") else H
    kernel, bias = rng.normal(0, 0.6, (I + h_out, 4 * H)), rng.normal(0, 0.6, 4 * H)
    diag = tuple(rng.normal(0, 0.6, H) for _ in range(3)) if cfg.get("peepholes") else None
    projection = rng.normal(0, 0.6, (H, P)) if cfg.get("projection") else None
    forget_bias, act = cfg.get("forget_bias", 1.0), cfg.get("activation", "tanh")
    x = rng.normal(0, 1.5, (T, B, I))
    expected, m, c = _tf1_cell(x, kernel, bias, forget_bias, diag, projection, cfg.get("cell_clip"),
                               cfg.get("proj_clip"), act)
    peepholes = {} if diag is None else dict(zip(("w_i_diag", "w_f_diag", "w_o_diag"), diag))
    module = from_tf1(kernel, bias, forget_bias=forget_bias, projection=projection, cell_clip=cfg.get("cell_clip"),
                      proj_clip=cfg.get("proj_clip"), activation=act, **peepholes)
    y, (h_n, c_n) = module(torch.from_numpy(x))
    for a, b in ((y, expected), (h_n[0], m), (c_n[0], c)):
        torch.testing.assert_close(a.detach(), torch.from_numpy(b), rtol=1e-12, atol=1e-12)


BAD = [
    ("kernel", dict(kernel=np.zeros((5, 20)), bias=np.zeros(20)), r"kernel should be \[input_depth \+ 5, 20\]"),
    ("bias", dict(kernel=np.zeros((8, 20)), bias=np.zeros(18)), r"bias should be \[4 \* num_units\]"),
    ("projection", dict(kernel=np.zeros((5, 20)), bias=np.zeros(20), projection=np.zeros((4, 2))),
     r"projection/kernel should be \[5, num_proj\]"),
    ("w_f_diag", dict(kernel=np.zeros((8, 20)), bias=np.zeros(20), w_i_diag=np.zeros(5), w_f_diag=np.zeros(4),
                      w_o_diag=np.zeros(5)), r"w_f_diag should be \[5\]"),
    ("one diagonal", dict(kernel=np.zeros((8, 20)), bias=np.zeros(20), w_i_diag=np.zeros(5)), "all three"),
]


@pytest.mark.parametrize("label, arguments, message", BAD, ids=[b[0] for b in BAD])
def test_malformed_variables_are_named(label, arguments, message):
    with pytest.raises(ValueError, match=message):
        from_tf1(**arguments)
