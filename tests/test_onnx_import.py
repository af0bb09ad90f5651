"""``fastlstm.interop.from_onnx``: every ``LSTM`` node of an ONNX model imported as a fastlstm.LSTM.
Oracle: onnxruntime running the original model, whose random weights are written here directly in
ONNX's layout (gates i, o, f, c; peepholes i, o, f), not by fastlstm's exporter."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fastlstm.interop import from_onnx

T, B, I, H = 5, 3, 4, 6
CONFIGS = {
    "forward": dict(),
    "bidirectional": dict(direction="bidirectional"),
    "peephole-clip": dict(peephole=True, clip=0.7),
    "input_forget-activations": dict(input_forget=1, activations=["HardSigmoid", "Softsign", "Relu"],
                                     activation_alpha=[0.2], activation_beta=[0.5]),
    # Keras 3's hard_sigmoid (relu6(x + 3) / 6) as the gate, ONNX's default one as the cell input
    "two-hard-sigmoids": dict(activations=["HardSigmoid", "HardSigmoid", "Tanh"], activation_alpha=[1 / 6, 0.2],
                              activation_beta=[0.5, 0.5]),
    "no-bias-bidirectional-peephole": dict(direction="bidirectional", bias=False, peephole=True),
    "layout-1": dict(layout=1),
}


def _model(seed=0, *, peephole=False, bias=True, with_lengths=True, **attributes):
    """A graph with one LSTM node named "encoder", its weights initializers, outputs Y, Y_h, Y_c."""
    rng = np.random.default_rng(seed)
    D = 2 if attributes.get("direction") == "bidirectional" else 1
    weights = {"W": rng.normal(0, 0.5, (D, 4 * H, I)), "R": rng.normal(0, 0.5, (D, 4 * H, H))}
    if bias:
        weights["B"] = rng.normal(0, 0.5, (D, 8 * H))
    if peephole:
        weights["P"] = rng.normal(0, 0.5, (D, 3 * H))
    layout = attributes.get("layout", 0)
    x_shape = ["batch", "seq", I] if layout else ["seq", "batch", I]
    inputs = ["X", "W", "R", "B" if bias else "", "sequence_lens" if with_lengths else "", "", "",
              "P" if peephole else ""]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("LSTM", inputs, ["Y", "Y_h", "Y_c"], name="encoder", hidden_size=H, **attributes)
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if with_lengths:
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["batch"]))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")]
    initializers = [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()]
    graph = helper.make_graph([node], "lstm", graph_inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("attributes", CONFIGS.values(), ids=CONFIGS.keys())
def test_imported_node_computes_what_onnxruntime_computes(attributes):
    model = _model(**attributes)
    layout = attributes.get("layout", 0)
    x = np.random.default_rng(1).normal(0, 1.5, (T, B, I)).astype(np.float32)
    lengths = np.array([5, 2, 4], dtype=np.int32)
    # onnxruntime refuses layout 1 ("Batchwise recurrent operations are not supported"): its oracle is
    # the same node with layout 0 on the time-major input
    time_major = _model(**{k: v for k, v in attributes.items() if k != "layout"})
    session = ort.InferenceSession(time_major.SerializeToString(), providers=["CPUExecutionProvider"])
    y, y_h, y_c = session.run(None, {"X": x, "sequence_lens": lengths})
    module = from_onnx(model)["encoder"]
    assert module.batch_first == bool(layout)
    ours, (h, c) = module(torch.from_numpy(np.swapaxes(x, 0, 1) if layout else x),
                          lengths=torch.from_numpy(lengths).long())
    # ONNX's Y is [T, D, B, H]; fastlstm's [T, B, D * H] (or [B, T, D * H] with batch_first)
    expected = np.swapaxes(y, 1, 2).reshape(T, B, -1)
    if layout:
        expected = np.swapaxes(expected, 0, 1)
    for a, b in ((ours, expected), (h, y_h), (c, y_c)):
        torch.testing.assert_close(a.detach(), torch.from_numpy(np.ascontiguousarray(b)), rtol=1e-5, atol=1e-5)


def test_every_lstm_node_is_imported_and_paths_and_bytes_load(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert list(from_onnx(str(path))) == ["encoder"]
    assert list(from_onnx(model.SerializeToString())) == ["encoder"]


BAD = [
    ("reverse", dict(direction="reverse"), "encoder: direction='reverse'"),
    ("alpha", dict(activations=["HardSigmoid", "Tanh", "Tanh"], activation_alpha=[0.3]), "activation_alpha"),
    ("activation", dict(activations=["Sigmoid", "Elu", "Tanh"]), "fastlstm has no Elu"),
    ("hidden_size", dict(), "hidden_size=7"),
]


@pytest.mark.parametrize("label, attributes, message", BAD, ids=[b[0] for b in BAD])
def test_what_fastlstm_cannot_express_raises_naming_it(label, attributes, message):
    model = _model(**attributes)
    if label == "hidden_size":
        model.graph.node[0].attribute[0].i = 7
    with pytest.raises(ValueError, match=message):
        from_onnx(model)


def test_a_weight_that_is_not_a_constant_raises_naming_it():
    model = _model()
    del model.graph.initializer[1]  # R
    with pytest.raises(ValueError, match="encoder: its R .'R'. is not an initializer"):
        from_onnx(model)


def test_a_malformed_tensor_is_named_with_its_expected_shape():
    model = _model()
    r = numpy_helper.to_array(model.graph.initializer[1])[:, :, :4]
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(r), "R"))
    with pytest.raises(ValueError, match=r"R should be \[1, 24, 6\]"):
        from_onnx(model)
