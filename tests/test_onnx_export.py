"""``fastlstm.onnx``: models with fastlstm layers exported once and run in onnxruntime (the oracle:
it runs the graph without fastlstm) at batch and time sizes other than the export's, against the
module in float32. Which graph a layer became is read from the model: an ``LSTM`` node where ONNX's
operator expresses it, a ``Scan`` otherwise."""

import collections
import io
import logging
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
import fastlstm.onnx
from fastlstm.testing import ARCHS, OPTIONS

EXPORTED_T, EXPORTED_B, INPUT, HIDDEN = 6, 3, 7, 5
RUNS = {(9, 4): [9, 0, 3, 7], (2, 5): [2, 1, 2, 0, 1]}  # (T, B): the lengths used with lengths=
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_exporter():
    logging.disable(logging.WARNING)  # (the exporter logs each skipped torchvision op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


def _needs_scan(arch: dict, cfg: dict) -> bool:
    """What ONNX's LSTM operator cannot compute (its specification: no layer norm, projection, cell
    clip or zoneout)."""
    return arch["proj"] > 0 or any(name in cfg for name in ("layer_norm", "zoneout", "cell_clip"))


class Model(torch.nn.Module):
    """Linear -> each LSTM -> its own Linear; returns every LSTM's (head output, h_n, c_n)."""

    def __init__(self, lstms, batch_first):
        super().__init__()
        self.embed = torch.nn.Linear(3, INPUT)
        self.lstms = torch.nn.ModuleList(lstms)
        self.heads = torch.nn.ModuleList(
            torch.nn.Linear((m.proj_size or m.hidden_size) * (2 if m.bidirectional else 1), 2) for m in lstms)
        self.batch_first = batch_first

    def forward(self, x, lengths=None):
        x = self.embed(x)
        batch = x.shape[0 if self.batch_first else 1]
        outputs = []
        for lstm, head in zip(self.lstms, self.heads):
            # a nonzero initial state: a sequence of length 0 must end in it
            states = lstm.num_layers * (2 if lstm.bidirectional else 1)
            hx = (x.new_full((states, batch, lstm.proj_size or lstm.hidden_size), 0.3),
                  x.new_full((states, batch, lstm.hidden_size), -0.2))
            y, (h, c) = lstm(x, hx, lengths=lengths)
            outputs += [head(y), h, c]
        return tuple(outputs)


GROUPS = {
    # (arch, option sets, layers, batch_first, lengths)
    "uni-every-option-lengths": ("uni", list(OPTIONS), 1, False, True),
    "bi-proj-batch_first-lengths": ("bi-proj", ["peephole", "coupled-peephole-clip", "everything"], 1, True, True),
    "bi-nobias-lengths": ("bi-nobias", ["plain", "activations", "activations2", "coupled-peephole-clip", "zoneout"],
                          1, False, True),
    "uni-proj-nobias-2-layers": ("uni-proj-nobias", ["plain", "cell_clip"], 2, False, False),
    "bi-2-layers-batch_first": ("bi-nobias", ["peephole", "layer_norm"], 2, True, False),
}


def _lstms(arch: dict, option_sets: list[str], layers: int, batch_first: bool) -> list[fastlstm.LSTM]:
    torch.manual_seed(0)
    return [fastlstm.LSTM(INPUT, HIDDEN, num_layers=layers, bias=arch["bias"], batch_first=batch_first,
                          bidirectional=arch["directions"] == 2, proj_size=arch["proj"], **OPTIONS[name])
            for name in option_sets]


def _ops(program) -> collections.Counter:
    return collections.Counter(node.op_type for node in program.model_proto.graph.node)


def _session(program) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(program.model_proto.SerializeToString(), options)


def _assert_runs_like_the_module(program, model, *, batch_first, with_lengths):
    session = _session(program)
    for (steps, batch), lengths in RUNS.items():
        x = torch.randn((batch, steps, 3) if batch_first else (steps, batch, 3))
        feeds = {"x": x.numpy()}
        lengths = torch.tensor(lengths) if with_lengths else None
        if with_lengths:
            feeds["lengths"] = lengths.numpy()
        got = session.run(None, feeds)
        with torch.no_grad():
            expected = model(x, lengths)
        assert len(got) == len(expected)
        for k, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(torch.from_numpy(a), b, rtol=TOL, atol=TOL,
                                       msg=lambda m, k=k: f"output {k}: {m}")


@pytest.mark.parametrize("group", GROUPS.values(), ids=GROUPS.keys())
def test_exported_models_run_in_onnxruntime_like_the_module(group):
    arch_name, option_sets, layers, batch_first, with_lengths = group
    arch = ARCHS[arch_name]
    lstms = _lstms(arch, option_sets, layers, batch_first)
    model = Model(lstms, batch_first).eval()
    x = torch.randn((EXPORTED_B, EXPORTED_T, 3) if batch_first else (EXPORTED_T, EXPORTED_B, 3))
    args = (x, torch.tensor([6, 2, 5])) if with_lengths else (x,)
    program = fastlstm.onnx.export(model, args)

    scans = sum(layers * arch["directions"] for name in option_sets if _needs_scan(arch, OPTIONS[name]))
    lstm_nodes = sum(layers for name in option_sets if not _needs_scan(arch, OPTIONS[name]))
    ops = _ops(program)
    assert (ops["LSTM"], ops["Scan"]) == (lstm_nodes, scans), dict(ops)
    _assert_runs_like_the_module(program, model, batch_first=batch_first, with_lengths=with_lengths)


def test_a_layer_norm_over_one_element_exports_with_an_initial_state_and_lengths_in_both_directions():
    torch.manual_seed(0)
    module = fastlstm.LSTM(INPUT, 1, bidirectional=True, layer_norm=True).eval()
    x, lengths = torch.randn(EXPORTED_T, EXPORTED_B, INPUT), torch.tensor([6, 2, 5])
    h0, c0 = torch.randn(2, EXPORTED_B, 1), torch.randn(2, EXPORTED_B, 1)
    program = fastlstm.onnx.export(module, (x, (h0, c0)), kwargs={"lengths": lengths})
    assert _ops(program)["Scan"] == 2
    x, lengths = torch.randn(9, 4, INPUT), torch.tensor([9, 0, 3, 7])
    h0, c0 = torch.randn(2, 4, 1), torch.randn(2, 4, 1)
    feeds = dict(zip(("input", "hx_0", "hx_1", "lengths"), (t.numpy() for t in (x, h0, c0, lengths))))
    got = _session(program).run(None, feeds)
    with torch.no_grad():
        y, (h_n, c_n) = module(x, (h0, c0), lengths=lengths)
    for a, b in zip(got, (y, h_n, c_n)):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=TOL, atol=TOL)


def test_time_and_batch_are_dynamic_inputs():
    model = fastlstm.LSTM(INPUT, HIDDEN, batch_first=True).eval()
    program = fastlstm.onnx.export(model, (torch.randn(EXPORTED_B, EXPORTED_T, INPUT),))
    dims = program.model_proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, True, False]
    assert dims[2].dim_value == INPUT


def _assert_runs_like(program, inputs: dict, expected):
    """onnxruntime running ``program`` on ``inputs`` (by graph input name) gives ``expected``."""
    got = _session(program).run(None, {name: t.numpy() for name, t in inputs.items()})
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=TOL, atol=TOL)


def test_a_torch_lstm_with_projection_exports_through_fastlstm_and_matches_torch():
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=3, bidirectional=True).eval()
    ours = fastlstm.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=3, bidirectional=True).eval()
    ours.load_state_dict(theirs.state_dict())
    program = fastlstm.onnx.export(ours, (torch.randn(EXPORTED_T, EXPORTED_B, INPUT),))
    x = torch.randn(11, 4, INPUT)
    with torch.no_grad():
        y, (h, c) = theirs(x)
    _assert_runs_like(program, {program.model_proto.graph.input[0].name: x}, (y, h, c))


def test_translation_table_for_torch_onnx_export():
    torch.manual_seed(0)
    model = fastlstm.LSTM(INPUT, HIDDEN, peephole=True).eval()
    x = torch.randn(EXPORTED_T, EXPORTED_B, INPUT)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                custom_translation_table=fastlstm.onnx.translation_table())
    assert _ops(program)["LSTM"] == 1
    with torch.no_grad():
        y, (h, c) = model(x)
    _assert_runs_like(program, {program.model_proto.graph.input[0].name: x}, (y, h, c))


def test_an_lstm_cell_exports():
    torch.manual_seed(0)
    cell = fastlstm.LSTMCell(INPUT, HIDDEN, layer_norm=True, zoneout=0.2).eval()
    x, h, c = torch.randn(EXPORTED_B, INPUT), torch.randn(EXPORTED_B, HIDDEN), torch.randn(EXPORTED_B, HIDDEN)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, x, h, c):
            return self.cell(x, (h, c))

    program = fastlstm.onnx.export(Step(), (x, h, c))
    x, h, c = torch.randn(5, INPUT), torch.randn(5, HIDDEN), torch.randn(5, HIDDEN)
    with torch.no_grad():
        expected = cell(x, (h, c))
    _assert_runs_like(program, {"x": x, "h": h, "c": c}, expected)


RANDOM = [(dict(zoneout=0.1), "zoneout"), (dict(recurrent_dropout=0.2), "recurrent_dropout"),
          (dict(weight_drop=0.2), "weight_drop"), (dict(num_layers=2, dropout=0.3), "dropout")]


@pytest.mark.parametrize("options, name", RANDOM, ids=[name for _, name in RANDOM])
def test_training_mode_randomness_raises_naming_the_option(options, name):
    model = fastlstm.LSTM(INPUT, HIDDEN, **options)  # (training mode)
    with pytest.raises(ValueError, match=rf"{name}: .*model\.eval\(\)"):
        fastlstm.onnx.export(model, (torch.randn(EXPORTED_T, EXPORTED_B, INPUT),))


def test_a_packed_sequence_raises_pointing_to_lengths():
    model = fastlstm.LSTM(INPUT, HIDDEN).eval()
    packed = pack_padded_sequence(torch.randn(EXPORTED_T, EXPORTED_B, INPUT), torch.tensor([6, 4, 2]))
    with pytest.raises(ValueError, match=r"PackedSequence .*lengths="):
        fastlstm.onnx.export(model, (packed,))


class _PacksInForward(torch.nn.Module):
    def __init__(self, enforce_sorted):
        super().__init__()
        self.lstm = fastlstm.LSTM(INPUT, HIDDEN)
        self.enforce_sorted = enforce_sorted

    def forward(self, x, lengths):
        y, (h, c) = self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=self.enforce_sorted))
        return h


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_a_packed_sequence_built_in_forward_raises_pointing_to_lengths(enforce_sorted):
    model = _PacksInForward(enforce_sorted).eval()
    with pytest.raises(ValueError, match=r"PackedSequence .*lengths=") as raised:
        fastlstm.onnx.export(model, (torch.randn(EXPORTED_T, EXPORTED_B, INPUT), torch.tensor([6, 4, 2])))
    assert raised.type is fastlstm.exporting.NotExportableError  # (fastlstm's own, not torch's wrapper)


STREAMING = {
    "plain-2-layers": dict(num_layers=2),
    "peephole-clip": dict(peephole=True, clip=1.0),
    "layer_norm-proj-zoneout-batch_first": dict(layer_norm=True, proj_size=3, zoneout=(0.3, 0.2), batch_first=True),
    "coupled-cell_clip": dict(coupled_input_forget=True, cell_clip=0.5),  # (a scanned step leaving a gate unused)
}


@pytest.mark.parametrize("options", STREAMING.values(), ids=STREAMING.keys())
def test_the_streaming_graph_fed_its_state_back_equals_the_module(options):
    torch.manual_seed(0)
    module = fastlstm.LSTM(INPUT, HIDDEN, **options).eval()
    program = fastlstm.onnx.export_streaming(module)
    assert [i.name for i in program.model_proto.graph.input] == ["x", "h", "c"]
    assert [o.name for o in program.model_proto.graph.output] == ["y", "h_out", "c_out"]
    session = _session(program)
    batch, chunks = 3, [1, 4, 2, 1]
    x = torch.randn(batch, sum(chunks), INPUT) if module.batch_first else torch.randn(sum(chunks), batch, INPUT)
    with torch.no_grad():
        expected, (h_n, c_n) = module(x)
    state = module.initial_state(batch)
    h, c = state.h.numpy(), state.c.numpy()
    ys = []
    for chunk in torch.split(x, chunks, dim=1 if module.batch_first else 0):
        y, h, c = session.run(None, {"x": chunk.numpy(), "h": h, "c": c})
        ys.append(torch.from_numpy(y))
    got = torch.cat(ys, 1 if module.batch_first else 0)
    torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    torch.testing.assert_close(torch.from_numpy(h), h_n, rtol=TOL, atol=TOL)
    torch.testing.assert_close(torch.from_numpy(c), c_n, rtol=TOL, atol=TOL)


def test_streaming_export_of_a_bidirectional_lstm_raises():
    with pytest.raises(ValueError, match="unidirectional"):
        fastlstm.onnx.export_streaming(fastlstm.LSTM(INPUT, HIDDEN, bidirectional=True).eval())


def test_exported_weights_are_folded_into_initializers():
    # the gate reordering runs at export, not in every onnxruntime call
    model = fastlstm.LSTM(64, 128, bidirectional=True).eval()
    program = fastlstm.onnx.export(model, (torch.randn(EXPORTED_T, EXPORTED_B, 64),))
    lstm = next(node for node in program.model_proto.graph.node if node.op_type == "LSTM")
    initializers = {t.name for t in program.model_proto.graph.initializer}
    assert all(name in initializers for name in lstm.input[1:4]), list(lstm.input)
    assert np.prod([d for d in next(t.dims for t in program.model_proto.graph.initializer
                                     if t.name == lstm.input[1])]) == 2 * 4 * 128 * 64


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_the_onnx_lstm_op_is_onnxs_lstm_operator(direction):
    """The op the export route emits, run eagerly (the reference on the weights put back in torch's
    order), against onnxruntime running one LSTM node on the same inputs; and torch's opcheck."""
    from onnx import TensorProto, helper

    import fastlstm.exporting  # noqa: F401 (registers the op)

    torch.manual_seed(0)
    d, steps, batch, hidden = (2 if direction == "bidirectional" else 1), 5, 3, 4
    inputs = dict(X=torch.randn(steps, batch, INPUT), W=torch.randn(d, 4 * hidden, INPUT) * 0.5,
                  R=torch.randn(d, 4 * hidden, hidden) * 0.5, B=torch.randn(d, 8 * hidden) * 0.5,
                  sequence_lens=torch.tensor([5, 2, 0], dtype=torch.int32), initial_h=torch.randn(d, batch, hidden),
                  initial_c=torch.randn(d, batch, hidden), P=torch.randn(d, 3 * hidden) * 0.5)
    attributes = dict(hidden_size=hidden, direction=direction, clip=1.5,
                      activations=["HardSigmoid", "Tanh", "Softsign"] * d, activation_alpha=[1 / 6] * d,
                      activation_beta=[0.5] * d)
    node = helper.make_node("LSTM", list(inputs), ["Y", "Y_h", "Y_c"], **attributes)
    kinds = {name: TensorProto.INT32 if name == "sequence_lens" else TensorProto.FLOAT for name in inputs}
    graph_inputs = [helper.make_tensor_value_info(name, kinds[name], list(t.shape)) for name, t in inputs.items()]
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("Y", "Y_h", "Y_c")]
    graph = helper.make_graph([node], "lstm", graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {k: v.numpy() for k, v in inputs.items()})
    args = tuple(inputs.values())
    got = torch.ops.fastlstm.onnx_lstm(*args[:7], args[7], "hardsigmoid,tanh,softsign", 1.5, False)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, torch.from_numpy(b), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.fastlstm.onnx_lstm.default, (*args, "hardsigmoid,tanh,softsign", 1.5, False))


def test_torchs_torchscript_exporter_points_to_fastlstm_onnx_export():
    model = torch.nn.Sequential(fastlstm.LSTM(INPUT, HIDDEN)).eval()
    with pytest.raises(RuntimeError, match=r"fastlstm\.onnx\.export"):
        torch.onnx.export(model, (torch.randn(EXPORTED_T, EXPORTED_B, INPUT),), io.BytesIO(), dynamo=False)


def test_a_float64_model_exports_as_scan_and_runs():
    """onnxruntime's LSTM runs float32 only: a float64 layer becomes a Scan over the cell step."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(INPUT, HIDDEN, num_layers=2, dtype=torch.float64).eval()
    program = fastlstm.onnx.export(model, (torch.randn(EXPORTED_T, EXPORTED_B, INPUT, dtype=torch.float64),))
    assert (_ops(program)["LSTM"], _ops(program)["Scan"]) == (0, 2)
    x = torch.randn(9, 4, INPUT, dtype=torch.float64)
    got = _session(program).run(None, {program.model_proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    for a, b in zip(got, (expected[0], *expected[1])):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-12, atol=1e-12)
