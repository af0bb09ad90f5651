"""onnxruntime's LSTM operator as an independent oracle for the reference engine.

Each test builds, by hand, an ONNX graph holding one ``LSTM`` node (opset 14) whose weights come
from :func:`fastlstm.convert.onnx_lstm_inputs`, runs it on onnxruntime's CPU provider, and compares
``Y``, ``Y_h`` and ``Y_c`` with ``fastlstm.LSTM(backend="reference")`` in eval mode.

Only float32 is tested: onnxruntime's CPU LSTM kernel accepts a double graph but refuses to run it
("LSTM operator does not support double yet", onnxruntime 1.32).

Tolerance ``atol = rtol = 1e-5``: both sides compute in float32 with different summation orders.
Measured (onnxruntime 1.32, torch 2.13): the largest |ORT - fastlstm| over this file is 9.5e-7,
3% of the allowed ``atol + rtol * |ORT|``; over 1500 random configurations of the property test's
strategy, at most 15% of it. Errors grow with the steps where gates can exceed 1 (relu gates):
one such configuration outside this file, 6 steps with values up to 16, reached 8e-5, both float32
sides being about 2e-5 away from a float64 evaluation. A semantic slip (gate or peephole order,
clip before the peephole, reverse direction from the padded end) moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm
from fastlstm import reference
from fastlstm.convert import onnx_activation_attributes, onnx_lstm_inputs
from fastlstm.options import DEFAULT_ACTIVATIONS, GATE_ACTIVATIONS
from fastlstm.weights import DirectionWeights, parameter_name

ATOL = RTOL = 1e-5
OPSET = 14
# Inputs of std 1.5 with torch's default init put gate pre-activations around +-1: every
# activation is off its linear part, relu's and hard_sigmoid's kinks are crossed, and a clip of
# 0.5 bites (asserted in test_clip_bites).
X_STD = 1.5


# -- the ONNX side ------------------------------------------------------------------------------


def _onnx_lstm_model(module: fastlstm.LSTM, *, with_lengths: bool, with_state: bool) -> onnx.ModelProto:
    """A model with one LSTM node equivalent to layer 0 of ``module``; weights are initializers."""
    options = module.options
    num_directions = 2 if module.bidirectional else 1
    attrs = {
        "hidden_size": module.hidden_size,
        "direction": "bidirectional" if module.bidirectional else "forward",
        # onnxruntime consumes activation_alpha / activation_beta only for the activations that take
        # them (here only HardSigmoid), in order: one entry per HardSigmoid, not one per activation.
        # test_ort_consumes_alpha_per_parameterised_activation pins that behaviour.
        **onnx_activation_attributes(options, num_directions),
    }
    if options.clip is not None:
        attrs["clip"] = options.clip
    if options.coupled_input_forget:
        attrs["input_forget"] = 1

    weights = onnx_lstm_inputs(module)
    state_names = ["initial_h", "initial_c"] if with_state else ["", ""]
    node_inputs = ["X", "W", "R", "B", "sequence_lens" if with_lengths else "", *state_names]
    node_inputs.append("P" if "P" in weights else "")
    while node_inputs[-1] == "":
        node_inputs.pop()

    f32, D, H = TensorProto.FLOAT, num_directions, module.hidden_size
    graph_inputs = [helper.make_tensor_value_info("X", f32, ["seq", "batch", module.input_size])]
    if with_lengths:
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["batch"]))
    if with_state:
        graph_inputs += [helper.make_tensor_value_info(name, f32, [D, "batch", H]) for name in state_names]
    outputs = [
        helper.make_tensor_value_info("Y", f32, ["seq", D, "batch", H]),
        helper.make_tensor_value_info("Y_h", f32, [D, "batch", H]),
        helper.make_tensor_value_info("Y_c", f32, [D, "batch", H]),
    ]
    initializers = [numpy_helper.from_array(value.numpy(), name) for name, value in weights.items()]
    node = helper.make_node("LSTM", node_inputs, ["Y", "Y_h", "Y_c"], **attrs)
    graph = helper.make_graph([node], "lstm", graph_inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), session_options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _ort_lstm(module, x, lengths=None, state=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ORT's ``(Y [T, D, B, H], Y_h [D, B, H], Y_c [D, B, H])`` for ``x [T, B, I]``."""
    model = _onnx_lstm_model(module, with_lengths=lengths is not None, with_state=state is not None)
    feeds = {"X": x.numpy()}
    if lengths is not None:
        feeds["sequence_lens"] = lengths.numpy().astype(np.int32)
    if state is not None:
        feeds["initial_h"], feeds["initial_c"] = state[0].numpy(), state[1].numpy()
    y, y_h, y_c = _run_ort(model, feeds)
    return y, y_h, y_c


# -- the fastlstm side ----------------------------------------------------------------------------


def _make_module(input_size, hidden_size, *, seed, bidirectional=False, bias=True, **options) -> fastlstm.LSTM:
    torch.manual_seed(seed)
    module = fastlstm.LSTM(
        input_size, hidden_size, bidirectional=bidirectional, bias=bias, backend="reference", **options
    )
    return module.eval()


def _inputs(module, T, B, *, seed, with_state):
    g = torch.Generator().manual_seed(seed)
    x = X_STD * torch.randn(T, B, module.input_size, generator=g)
    if not with_state:
        return x, None
    D = 2 if module.bidirectional else 1
    h0 = torch.randn(D, B, module.hidden_size, generator=g)
    c0 = torch.randn(D, B, module.hidden_size, generator=g)
    return x, (h0, c0)


def _unequal_lengths(T: int, B: int, seed: int) -> torch.Tensor:
    """``[B]`` int64 lengths in ``[1, T]``, unsorted, with a full-length one and (if possible) shorter ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[torch.randint(0, B, (1,), generator=g)] = T
    if B > 1 and T > 1 and bool((lengths == T).all()):
        lengths[0] = 1
    return lengths


def _fastlstm(module, x, lengths=None, state=None):
    """fastlstm's ``(y [T, B, D*H], h_n, c_n)``; with ``lengths`` the input goes in packed."""
    with torch.no_grad():
        if lengths is None:
            y, (h_n, c_n) = module(x, state)
            return y, h_n, c_n
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h_n, c_n) = module(packed, state)
        y, out_lengths = pad_packed_sequence(out, total_length=x.shape[0])
        assert torch.equal(out_lengths, lengths)
        return y, h_n, c_n


# -- comparison -----------------------------------------------------------------------------------


def _assert_close(ours: torch.Tensor, theirs: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(ours.numpy(), theirs, atol=ATOL, rtol=RTOL, err_msg=what)


def _check_against_ort(module, x, lengths=None, state=None) -> None:
    T, B, _ = x.shape
    D, H = (2 if module.bidirectional else 1), module.hidden_size
    y_ort, h_ort, c_ort = _ort_lstm(module, x, lengths, state)
    y, h_n, c_n = _fastlstm(module, x, lengths, state)

    assert y_ort.shape == (T, D, B, H) and h_ort.shape == c_ort.shape == (D, B, H)
    y_ort_flat = y_ort.transpose(0, 2, 1, 3).reshape(T, B, D * H)
    _assert_close(y, y_ort_flat, "Y")
    _assert_close(h_n, h_ort, "Y_h")
    _assert_close(c_n, c_ort, "Y_c")
    if lengths is not None:
        padded = (torch.arange(T).unsqueeze(1) >= lengths).numpy()  # [T, B]
        assert (y_ort.transpose(0, 2, 1, 3)[padded] == 0).all(), "ORT's Y is not zero at padded steps"
        assert (y[torch.from_numpy(padded)] == 0).all()


# -- parametrised cases ---------------------------------------------------------------------------


def _single_slot_activations():
    cases = []
    for slot in range(3):
        for name in GATE_ACTIVATIONS:
            acts = list(DEFAULT_ACTIVATIONS)
            acts[slot] = name
            if tuple(acts) not in cases:
                cases.append(tuple(acts))
    return cases


ACTIVATION_CASES = _single_slot_activations() + [
    ("hard_sigmoid", "hard_sigmoid", "hard_sigmoid"),
    ("hard_sigmoid", "softsign", "relu"),
    ("relu", "hard_sigmoid", "sigmoid"),
    ("tanh", "relu", "softsign"),
    ("softsign", "sigmoid", "hard_sigmoid"),
]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["fwd", "bidir"])
@pytest.mark.parametrize("activations", ACTIVATION_CASES, ids="-".join)
def test_activations(activations, bidirectional):
    module = _make_module(3, 4, seed=1, bidirectional=bidirectional, activations=activations)
    x, state = _inputs(module, T=5, B=3, seed=2, with_state=True)
    _check_against_ort(module, x, state=state)


VARIANTS = {
    "plain": {},
    "peephole": {"peephole": True},
    "clip": {"clip": 0.5},
    "peephole+clip": {"peephole": True, "clip": 0.5},
    "coupled": {"coupled_input_forget": True},
    "coupled+peephole": {"coupled_input_forget": True, "peephole": True},
    "coupled+clip": {"coupled_input_forget": True, "clip": 0.5},
    "coupled+peephole+clip": {"coupled_input_forget": True, "peephole": True, "clip": 0.5},
}


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["fwd", "bidir"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants(variant, bidirectional, with_lengths, with_state):
    module = _make_module(4, 5, seed=3, bidirectional=bidirectional, **VARIANTS[variant])
    x, state = _inputs(module, T=6, B=4, seed=4, with_state=with_state)
    lengths = _unequal_lengths(6, 4, seed=5) if with_lengths else None
    assert lengths is None or lengths.min() < lengths.max()
    _check_against_ort(module, x, lengths, state)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["fwd", "bidir"])
def test_no_bias(bidirectional, with_lengths):
    module = _make_module(3, 4, seed=6, bidirectional=bidirectional, bias=False, peephole=True)
    x, state = _inputs(module, T=5, B=3, seed=7, with_state=True)
    lengths = _unequal_lengths(5, 3, seed=8) if with_lengths else None
    _check_against_ort(module, x, lengths, state)
    assert not onnx_lstm_inputs(module)["B"].any()


def test_clip_bites():
    """Some gate pre-activation exceeds the clip, and clipping changes the outputs well beyond tolerance."""
    clip = 0.5
    module = _make_module(4, 5, seed=3, bidirectional=True, peephole=True, clip=clip)
    x, state = _inputs(module, T=6, B=4, seed=4, with_state=True)
    first_step = x[0] @ module.weight_ih_l0.T + state[0][0] @ module.weight_hh_l0.T
    first_step = first_step + module.bias_ih_l0 + module.bias_hh_l0
    assert first_step.abs().max() > 2 * clip

    _check_against_ort(module, x, state=state)
    unclipped = _make_module(4, 5, seed=3, bidirectional=True, peephole=True)
    y_clipped, _, _ = _fastlstm(module, x, state=state)
    y_unclipped, _, _ = _fastlstm(unclipped, x, state=state)
    assert (y_clipped - y_unclipped).abs().max() > 1e-2


def test_padded_steps_of_the_engine_are_zero():
    """The reference engine itself (padded in, padded out) matches ORT at every step, padded ones included."""
    module = _make_module(3, 4, seed=9, bidirectional=True, peephole=True, clip=1.0)
    x, state = _inputs(module, T=6, B=4, seed=10, with_state=True)
    lengths = _unequal_lengths(6, 4, seed=11)
    weights = [
        DirectionWeights(**{f: getattr(module, parameter_name(f, 0, rev), None) for f in DirectionWeights._fields})
        for rev in (False, True)
    ]
    with torch.no_grad():
        y, h_n, c_n = reference.lstm_layer(x, lengths, *state, weights, module.options, None, training=False)
    y_ort, h_ort, c_ort = _ort_lstm(module, x, lengths, state)
    _assert_close(y, y_ort.transpose(0, 2, 1, 3).reshape(6, 4, 8), "Y")
    _assert_close(h_n, h_ort, "Y_h")
    _assert_close(c_n, c_ort, "Y_c")
    padded = torch.arange(6).unsqueeze(1) >= lengths
    assert padded.any() and (y[padded] == 0).all()


def test_ort_reverse_starts_at_each_sequence_end():
    """ORT's semantics, independently of fastlstm: a batch with sequence_lens equals each sequence run alone."""
    module = _make_module(3, 4, seed=12, bidirectional=True, peephole=True)
    x, state = _inputs(module, T=5, B=3, seed=13, with_state=True)
    lengths = torch.tensor([5, 2, 3])
    y, y_h, y_c = _ort_lstm(module, x, lengths, state)
    for b, n in enumerate(lengths.tolist()):
        alone = _ort_lstm(module, x[:n, b : b + 1], state=(state[0][:, b : b + 1], state[1][:, b : b + 1]))
        np.testing.assert_allclose(y[:n, :, b : b + 1], alone[0], atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(y_h[:, b : b + 1], alone[1], atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(y_c[:, b : b + 1], alone[2], atol=ATOL, rtol=RTOL)
        assert (y[n:, :, b] == 0).all()


def test_ort_consumes_alpha_per_parameterised_activation():
    """ORT takes activation_alpha/beta entries only for activations that have them (HardSigmoid here).

    So a HardSigmoid in the cell-input slot reads entry 0, not entry 1; passing one entry per slot
    would give it the wrong alpha. This pins the behaviour _onnx_lstm_model relies on.
    """
    module = _make_module(3, 4, seed=14, activations=("sigmoid", "hard_sigmoid", "tanh"))
    x, _ = _inputs(module, T=4, B=2, seed=15, with_state=False)
    model = _onnx_lstm_model(module, with_lengths=False, with_state=False)
    compact = _run_ort(model, {"X": x.numpy()})[0]
    node = model.graph.node[0]
    for attr in node.attribute:
        if attr.name == "activation_alpha":
            attr.floats[:] = [1.0, 0.2, 1.0]
        elif attr.name == "activation_beta":
            attr.floats[:] = [0.0, 0.5, 0.0]
    per_slot = _run_ort(model, {"X": x.numpy()})[0]
    y, _, _ = _fastlstm(module, x)
    _assert_close(y, compact[:, 0], "compact alpha/beta")
    assert np.abs(per_slot - compact).max() > 1e-2


# -- property test --------------------------------------------------------------------------------


@st.composite
def _configs(draw):
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    lengths = None
    if draw(st.booleans()):
        lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    return {
        "T": T,
        "B": B,
        "I": draw(st.integers(1, 5)),
        "H": draw(st.integers(1, 6)),
        "options": {
            "activations": tuple(draw(st.sampled_from(GATE_ACTIVATIONS)) for _ in range(3)),
            "peephole": draw(st.booleans()),
            "clip": draw(st.sampled_from([None, 0.25, 0.5, 1.0, 2.0])),
            "coupled_input_forget": draw(st.booleans()),
        },
        "bidirectional": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "lengths": lengths,
        "with_state": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=30, deadline=None, derandomize=True)
@given(_configs())
def test_random_configurations(config):
    module = _make_module(
        config["I"],
        config["H"],
        seed=config["seed"],
        bidirectional=config["bidirectional"],
        bias=config["bias"],
        **config["options"],
    )
    x, state = _inputs(module, config["T"], config["B"], seed=config["seed"] + 1, with_state=config["with_state"])
    _check_against_ort(module, x, config["lengths"], state)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("proj_size", {"proj_size": 2}),
        ("layer_norm", {"layer_norm": True}),
        ("zoneout", {"zoneout": 0.1}),
        ("recurrent_dropout", {"recurrent_dropout": 0.1}),
        ("weight_drop", {"weight_drop": 0.1}),
        ("cell_clip", {"cell_clip": 1.0}),
    ],
)
def test_converter_refuses_what_onnx_cannot_express(name, kwargs):
    module = fastlstm.LSTM(3, 4, **kwargs)
    with pytest.raises(ValueError, match=name):
        onnx_lstm_inputs(module)


def test_converter_checks_the_layer():
    with pytest.raises(ValueError, match="layer"):
        onnx_lstm_inputs(fastlstm.LSTM(3, 4), layer=1)
