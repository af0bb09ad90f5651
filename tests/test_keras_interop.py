"""Keras 3 ``LSTM`` / ``Bidirectional(LSTM)`` weights both ways (``fastlstm.interop.from_keras``,
``to_keras``). Oracle: Keras 3 itself on its torch backend (``KERAS_BACKEND=torch``; no TensorFlow),
running the layer whose weights fastlstm imported or exported."""

import os

os.environ["KERAS_BACKEND"] = "torch"  # (before keras is imported: this suite needs no TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fastlstm  # noqa: E402
from fastlstm.interop import GoBackwards, from_keras, to_keras  # noqa: E402

B, T, I, H = 3, 6, 4, 5
TOL = dict(rtol=1e-6, atol=1e-6)  # float32 against float32
CONFIGS = {
    "default": dict(),
    "hard_sigmoid-relu": dict(recurrent_activation="hard_sigmoid", activation="relu"),
    "softsign-no-bias": dict(activation="softsign", use_bias=False),
    "tanh-gates": dict(recurrent_activation="tanh"),
    "go_backwards": dict(go_backwards=True),
    "go_backwards-hard_sigmoid": dict(go_backwards=True, recurrent_activation="hard_sigmoid"),
}


def _keras_layer(seed: int, bidirectional: bool, **config):
    """A built Keras layer with random weights (biases too), returning sequences and states."""
    lstm = keras.layers.LSTM(H, return_sequences=True, return_state=True, **config)
    layer = keras.layers.Bidirectional(lstm) if bidirectional else lstm
    layer.build((None, None, I))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    return layer


def _inputs(seed: int) -> np.ndarray:
    # std 1.5 crosses the hard sigmoids' and relu's kinks
    return np.random.default_rng(100 + seed).normal(0, 1.5, (B, T, I)).astype(np.float32)


def _keras_run(layer, x: np.ndarray) -> list[torch.Tensor]:
    """Keras's outputs: ``[y, h, c]``, or ``[y, h_fw, c_fw, h_bw, c_bw]`` for a Bidirectional."""
    return [torch.from_numpy(keras.ops.convert_to_numpy(t)) for t in layer(x)]


def _fastlstm_run(module, x: np.ndarray) -> list[torch.Tensor]:
    """The module's outputs in Keras's order."""
    with torch.no_grad():
        y, (h, c) = module(torch.from_numpy(x))
    return [y, *(t for d in range(h.shape[0]) for t in (h[d], c[d]))]


# (a Bidirectional's forward layer has go_backwards=False by construction)
IMPORTS = [(name, False) for name in CONFIGS] + [(name, True) for name in CONFIGS if "go_backwards" not in name]


@pytest.mark.parametrize("name, bidirectional", IMPORTS,
                         ids=[f"{name}-{'Bidirectional' if bi else 'LSTM'}" for name, bi in IMPORTS])
def test_imported_layer_computes_what_keras_computes(name, bidirectional):
    layer = _keras_layer(len(name), bidirectional, **CONFIGS[name])
    module = from_keras(layer)
    assert isinstance(module, GoBackwards) == ("go_backwards" in name)
    x = _inputs(len(name))
    for k, (ours, theirs) in enumerate(zip(_fastlstm_run(module, x), _keras_run(layer, x), strict=True)):
        torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m, k=k: f"output {k}: {m}")


EXPORTS = {
    "plain": dict(),
    "hardsigmoid-relu-no-bias": dict(activations=("hardsigmoid", "relu", "relu"), bias=False),
    "bidirectional-softsign": dict(bidirectional=True, activations=("sigmoid", "softsign", "softsign")),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_exported_layer_in_keras_computes_what_the_module_computes(name):
    torch.manual_seed(len(name))
    module = fastlstm.LSTM(I, H, batch_first=True, **EXPORTS[name]).eval()
    with torch.no_grad():  # biases away from zero, so that b_ih + b_hh is exercised
        for p in module.parameters():
            p.mul_(2.0)
    x = _inputs(len(name))
    layer = to_keras(module, build=True)
    for k, (ours, theirs) in enumerate(zip(_fastlstm_run(module, x), _keras_run(layer, x), strict=True)):
        torch.testing.assert_close(theirs, ours, **TOL, msg=lambda m, k=k: f"output {k}: {m}")


def test_exported_go_backwards_and_stacked_layers():
    torch.manual_seed(0)
    stacked = fastlstm.LSTM(I, H, num_layers=2, batch_first=True).eval()
    x = _inputs(0)
    first, second = to_keras(stacked, layer=0, build=True), to_keras(stacked, layer=1, build=True)
    y_keras = keras.ops.convert_to_numpy(second(first(x)[0])[0])
    torch.testing.assert_close(torch.from_numpy(y_keras), _fastlstm_run(stacked, x)[0], **TOL)

    backwards = GoBackwards(fastlstm.LSTM(I, H, batch_first=True).eval())
    layer = to_keras(backwards, build=True)
    assert layer.go_backwards
    for ours, theirs in zip(_fastlstm_run(backwards, x), _keras_run(layer, x), strict=True):
        torch.testing.assert_close(theirs, ours, **TOL)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["LSTM", "Bidirectional"])
def test_round_trip_gives_keras_weights_back(bidirectional):
    layer = _keras_layer(7, bidirectional, recurrent_activation="hard_sigmoid")
    class_name, config, weights = to_keras(from_keras(layer))
    assert class_name == type(layer).__name__
    inner = config["layer"] if bidirectional else config
    assert (inner["recurrent_activation"], inner["activation"]) == ("hard_sigmoid", "tanh")
    for ours, theirs in zip(weights, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_config_and_weights_without_a_layer_object():
    layer = _keras_layer(3, False, recurrent_activation="hard_sigmoid", recurrent_dropout=0.25)
    module = from_keras(layer.get_config(), layer.get_weights())
    assert module.options.activations == ("hardsigmoid", "tanh", "tanh")  # Keras 3: relu6(x + 3) / 6
    assert module.options.recurrent_dropout == 0.25
    # tf.keras 2's hard_sigmoid is clip(0.2 x + 0.5, 0, 1): fastlstm's hard_sigmoid
    module2 = from_keras(layer.get_config(), layer.get_weights(), keras_version=2)
    assert module2.options.activations == ("hard_sigmoid", "tanh", "tanh")
    with pytest.raises(ValueError, match="hardsigmoid"):
        to_keras(module, keras_version=2)


def test_input_dropout_is_dropped_with_a_warning():
    layer = _keras_layer(4, False, dropout=0.3)
    with pytest.warns(UserWarning, match="dropout=0.3"):
        module = from_keras(layer)
    x = _inputs(4)  # (exact in eval, where Keras does not drop either)
    torch.testing.assert_close(_fastlstm_run(module, x)[0], _keras_run(layer, x)[0], **TOL)


def _weights(kernel=(I, 4 * H), recurrent=(H, 4 * H), bias=(4 * H,)):
    return [np.zeros(s, np.float32) for s in (kernel, recurrent, bias) if s is not None]


BAD = [
    ("kernel", dict(units=H), _weights(kernel=(I, 4 * H + 1)), r"kernel should be \[4, 20\]"),
    ("recurrent_kernel", dict(units=H), _weights(recurrent=(H + 1, 4 * H)), r"recurrent_kernel should be \[5, 20\]"),
    ("bias", dict(units=H), _weights(bias=(H,)), r"bias should be \[20\]"),
    ("count", dict(units=H), _weights(bias=None), "expected 3 arrays"),
    ("activation", dict(units=H, activation="elu"), _weights(), "activation='elu'"),
    ("merge_mode", dict(layer=dict(units=H), merge_mode="sum"), _weights() * 2, "merge_mode='sum'"),
]


@pytest.mark.parametrize("label, config, weights, message", BAD, ids=[b[0] for b in BAD])
def test_malformed_weights_and_configs_are_named(label, config, weights, message):
    with pytest.raises(ValueError, match=message):
        from_keras(config, weights)


def test_what_keras_cannot_express_raises_naming_it():
    for module, name in ((fastlstm.LSTM(I, H, peephole=True), "peephole"),
                         (fastlstm.LSTM(I, H, proj_size=2), "proj_size=2"),
                         (fastlstm.LSTM(I, H, layer_norm=True), "layer_norm"),
                         (fastlstm.LSTM(I, H, activations=("sigmoid", "tanh", "softsign")), "activations")):
        with pytest.raises(ValueError, match=name):
            to_keras(module)
    with pytest.raises(ValueError, match=r"layer should be in \[0, 1\)"):
        to_keras(fastlstm.LSTM(I, H), layer=1)
    with pytest.raises(TypeError, match="config dict and weights"):
        from_keras({"units": H})
