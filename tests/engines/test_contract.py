"""torch.compile and torch.export: a model containing fastlstm traces without graph breaks
(``fullgraph=True``), matches eager forward and backward, and shows one ``fastlstm::lstm_layer`` op
per layer (engines/contract.py); the reference is plain torch and is traced through.
"""

import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm.engines import contract
from fastlstm.options import make_options
from fastlstm.testing import assert_within_twice

from tests.engines.cases import layer_inputs, on, run


class Tagger(torch.nn.Module):
    """A small sequence model: LSTM then a linear read-out of every step."""

    def __init__(self, backend, **options):
        super().__init__()
        self.lstm = fastlstm.LSTM(5, 7, num_layers=2, bidirectional=True, backend=backend, **options)
        self.head = torch.nn.Linear(14, 3)

    def forward(self, x, hx=None, masks=None):
        y, (h, c) = self.lstm(x, hx, masks=masks) if masks is not None else self.lstm(x, hx)
        y = y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y
        return self.head(y), h, c


def _outputs_and_grads(model, *args, **kwargs):
    model.zero_grad()
    out, h, c = model(*args, **kwargs)
    (out.square().sum() + h.sum() + 2 * c.sum()).backward()
    return [out, h, c] + [p.grad.clone() for p in model.parameters()]


def _compare(backend, compiler, inputs, options=None, train=False):
    torch.manual_seed(0)
    model = Tagger(backend, **(options or {})).double().train(train)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    torch._dynamo.reset()
    x = inputs()
    eager = _outputs_and_grads(model, x)
    traced = _outputs_and_grads(compiled, x)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def _padded():
    return torch.randn(6, 4, 5, dtype=torch.float64)


def _packed():
    return pack_padded_sequence(torch.randn(6, 4, 5, dtype=torch.float64), [6, 2, 5, 3], enforce_sorted=False)


@pytest.mark.parametrize("backend, inputs", [("reference", _padded), ("cpu", _padded), ("cpu", _packed)],
                         ids=["reference-padded", "cpu-padded", "cpu-packed"])
def test_compiled_model_matches_eager(backend, inputs):
    _compare(backend, "aot_eager", inputs, options=dict(peephole=True, zoneout=0.2, cell_clip=2.0))


@pytest.mark.parametrize("dynamic", [None, True], ids=["recompiled", "dynamic"])
def test_compiled_model_follows_changing_shapes(dynamic):
    """One compiled model called with several T and B (a training loop's last batch, variable-length
    data): torch recompiles with symbolic sizes, under which the choice of the single step's form
    (T = 1) must stay a plain bool (it was a symbolic one, which the op's constant argument
    refused). Each call matches eager, forward and backward."""
    torch.manual_seed(0)
    model = Tagger("cpu").double()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for steps, batch in [(6, 4), (9, 4), (5, 3), (1, 3)]:
        x = torch.randn(steps, batch, 5, dtype=torch.float64)
        for a, b in zip(_outputs_and_grads(model, x), _outputs_and_grads(compiled, x)):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_compiled_model_takes_sorted_packed_input():
    """A PackedSequence made with enforce_sorted=True (no sorted_indices): its row count is data to
    the compiler, and the engine's fake result must not guard on it (it did: the arena's layout
    asked whether a buffer was empty). Two sets of lengths, forward and backward against eager."""
    torch.manual_seed(0)
    model = Tagger("cpu").double()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for lengths in ([6, 5, 3, 2], [7, 4, 4, 1]):
        x = pack_padded_sequence(torch.randn(max(lengths), 4, 5, dtype=torch.float64), lengths)
        for a, b in zip(_outputs_and_grads(model, x), _outputs_and_grads(compiled, x)):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


LENGTHS_RUNS = [(6, [6, 2, 5, 1]), (6, [3, 0, 5, 1]), (6, [0, 0, 0, 0]), (6, [6, 6, 6, 6]), (8, [2, 8, 7])]
"""(T, lengths): one below T (the layout ends in steps without rows), all empty, all full, other sizes."""


def _lengths_outputs_and_grads(lstm, model, steps, lengths):
    lstm.zero_grad()
    x = torch.randn(steps, len(lengths), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    x.requires_grad_()
    y, (h, c) = model(x, lengths=torch.tensor(lengths))
    (y.square().sum() + h.sum() + 2 * c.sum()).backward()
    return [y, h, c, x.grad] + [p.grad.clone() for p in lstm.parameters()]


def test_compiled_model_takes_lengths():
    """``lengths=`` in one graph (``fullgraph=True``): the rows it selects are data to the compiler
    (their count an unbacked size), and a longest length below T leaves steps without rows at the
    end of the layout, which the op took for a malformed PackedSequence's. Forward and backward
    against eager at several lengths and sizes."""
    torch.manual_seed(0)
    lstm = fastlstm.LSTM(5, 7, bidirectional=True, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    for steps, lengths in LENGTHS_RUNS:
        eager = _lengths_outputs_and_grads(lstm, lstm, steps, lengths)
        for a, b in zip(eager, _lengths_outputs_and_grads(lstm, compiled, steps, lengths)):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sizes", [dict(input_size=1, hidden_size=5, bidirectional=True),
                                   dict(input_size=3, hidden_size=4, proj_size=1, num_layers=2)],
                         ids=["input_size-1", "a-layer-below-of-one-output"])
def test_compiled_model_takes_lengths_into_a_one_feature_layer(sizes):
    """A layer whose input has one feature, with ``lengths=`` in one graph: its input product is
    an outer product there (a GEMM's backward guards on its one-column operand's row count, which
    the lengths make data). Forward and backward against eager."""
    torch.manual_seed(0)
    lstm = fastlstm.LSTM(**sizes, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    for steps, lengths in [(6, [6, 2, 5, 1]), (5, [3, 0, 5])]:
        x = torch.randn(steps, len(lengths), sizes["input_size"], dtype=torch.float64)
        results = []
        for model in (lstm, compiled):
            lstm.zero_grad()
            leaf = x.clone().requires_grad_()
            y, (h, c) = model(leaf, lengths=torch.tensor(lengths))
            (y.square().sum() + h.sum() + 2 * c.sum()).backward()
            results.append([y, h, c, leaf.grad] + [p.grad.clone() for p in lstm.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_exported_model_takes_lengths():
    """torch.export with ``lengths=`` and T, B dynamic: the exported module at other sizes and
    lengths equals eager."""
    torch.manual_seed(0)
    lstm = fastlstm.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64).eval()
    auto = torch.export.Dim.AUTO
    exported = torch.export.export(lstm, (torch.randn(6, 4, 5, dtype=torch.float64),),
                                   kwargs={"lengths": torch.tensor([6, 2, 5, 1])},
                                   dynamic_shapes={"input": {0: auto, 1: auto}, "lengths": {0: auto}}).module()
    for steps, lengths in LENGTHS_RUNS:
        x = torch.randn(steps, len(lengths), 5, dtype=torch.float64)
        got, expected = exported(x, lengths=torch.tensor(lengths)), lstm(x, lengths=torch.tensor(lengths))
        for a, b in zip([got[0], *got[1]], [expected[0], *expected[1]]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lengths", [[7, 2, 3], [5, -1, 3]], ids=["above-T", "negative"])
def test_compiled_and_exported_graphs_check_lengths(lengths):
    """Inside a graph the lengths are data: the graph checks them when it runs, with eager's
    ValueError naming them, and runs on after it."""
    lstm = fastlstm.LSTM(5, 7, dtype=torch.float64)
    x, good = torch.randn(5, 3, 5, dtype=torch.float64), torch.tensor([5, 2, 3])
    torch._dynamo.reset()
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    exported = torch.export.export(lstm, (x,), kwargs={"lengths": good}).module()
    for model in (lstm, compiled, exported):
        with pytest.raises(ValueError, match=r"lengths should be between 0 and the input's 5 steps"):
            model(x, lengths=torch.tensor(lengths))
        torch.testing.assert_close(model(x, lengths=good)[0], lstm(x, lengths=good)[0], rtol=0, atol=0)


def test_opcheck_of_the_lengths_check():
    torch.library.opcheck(torch.ops.fastlstm.checked_lengths.default, (torch.tensor([3, 0, 5]), 6))


def test_dynamic_compile_as_a_process_first_call():
    """``torch.compile(model, dynamic=True)`` called before any eager call, in a fresh process: the
    first trace imports the engine, and dynamo's restarted analysis must take the same path."""
    script = ("import torch, fastlstm; m = fastlstm.LSTM(5, 7, backend='cpu'); "
              "f = torch.compile(m, fullgraph=True, dynamic=True, backend='aot_eager'); x = torch.randn(6, 4, 5); "
              "torch.testing.assert_close(f(x)[0], m(x)[0]); print('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_compiled_training_with_replayed_masks_matches_eager():
    """Training mode with the random options: the masks are drawn in eager and passed in, so that
    both runs see the same noise (a compiled graph draws its own random numbers)."""
    torch.manual_seed(0)
    model = Tagger("cpu", zoneout=0.3, recurrent_dropout=0.2, weight_drop=0.3).double().train()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    masks = model.lstm.sample_masks(x)
    eager = _outputs_and_grads(model, x, masks=masks)
    traced = _outputs_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x, masks=masks)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_inductor_compiles_the_cpu_engine_model():
    """The default backend (inductor) too, in float32, with layer norm: its input side is torch ops
    that inductor compiles with its own rounding, so both float32 runs are held to the float64
    truth, the compiled one within twice eager's error (fastlstm.testing)."""
    torch.manual_seed(0)
    model = Tagger("cpu", layer_norm=True)
    x = torch.randn(6, 4, 5)
    eager = _outputs_and_grads(model, x)
    traced = _outputs_and_grads(torch.compile(model, fullgraph=True), x)
    truth = _outputs_and_grads(model.double(), x.double())
    for k, (a, b, t) in enumerate(zip(eager, traced, truth)):
        assert_within_twice(b, a, t, name=f"output/gradient {k}")


def _op_nodes(graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and "fastlstm" in str(n.target)]


def test_compiled_graph_calls_the_engine_as_one_op_per_layer():
    """No graph break, and each layer is one fastlstm::lstm_layer node in the captured graph."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = Tagger("cpu").double()
    torch.compile(model, fullgraph=True, backend=capture)(torch.randn(6, 4, 5, dtype=torch.float64))
    assert len(graphs) == 1
    assert [str(n.target) for n in _op_nodes(graphs[0].graph)] == ["fastlstm.lstm_layer"] * 2


def test_compiled_training_step_runs_each_layer_once():
    """Forward and backward of a compiled training step: one forward op and one backward op per
    layer in the joint graph, so nothing is recomputed."""
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def capture(gm, example_inputs):
        def keep(graph, _):
            graphs.append(graph)
            return graph.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    model = Tagger("cpu").double()
    out, h, c = torch.compile(model, fullgraph=True, backend=capture)(torch.randn(6, 4, 5, dtype=torch.float64))
    (out.sum() + h.sum() + c.sum()).backward()
    forward, backward = graphs
    assert [str(n.target) for n in _op_nodes(forward.graph)] == ["fastlstm.lstm_layer.default"] * 2
    assert [str(n.target) for n in _op_nodes(backward.graph)] == ["fastlstm.lstm_layer_backward.default"] * 2


def test_compiled_cell_matches_eager():
    torch.manual_seed(0)
    cell = fastlstm.LSTMCell(5, 7, backend="cpu", peephole=True, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64))
    eager = cell(x, hx)
    (eager[0].sum() + eager[1].sum()).backward()
    eager_grads = [x.grad.clone()] + [p.grad.clone() for p in cell.parameters()]
    x.grad = None
    cell.zero_grad()
    traced = torch.compile(cell, fullgraph=True, backend="aot_eager")(x, hx)
    (traced[0].sum() + traced[1].sum()).backward()
    traced_grads = [x.grad] + [p.grad for p in cell.parameters()]
    for a, b in zip([*eager, *eager_grads], [*traced, *traced_grads]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [{}, dict(proj_size=3, peephole=True, cell_clip=1.0), dict(layer_norm=True)],
                         ids=["plain", "proj-options", "layer_norm"])
def test_export_gives_one_op_per_layer(options):
    """torch.export: the graph holds one fastlstm::lstm_layer op per layer (its options a string
    argument, nothing in Python objects) and runs to eager's result, with T and B dynamic."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(5, 7, num_layers=2, bidirectional=True, backend="cpu", **options).eval()
    x = torch.randn(6, 4, 5)
    steps, batch = torch.export.Dim("steps"), torch.export.Dim("batch")
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: steps, 1: batch},))
    nodes = _op_nodes(exported.graph)
    assert [str(n.target) for n in nodes] == ["fastlstm.lstm_layer.default"] * 2
    assert all(isinstance(n.args[0], str) for n in nodes)
    other = torch.randn(9, 3, 5)
    for a, b in zip(exported.module()(other)[:1] + tuple(exported.module()(other)[1]),
                    model(other)[:1] + tuple(model(other)[1])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_options_survive_the_op_encoding():
    options = make_options(activations=("relu", "softsign", "hard_sigmoid"), zoneout=(0.1, 0.2), clip=3.0,
                           cell_clip=1.0, peephole=True, coupled_input_forget=True, recurrent_dropout=0.1)
    call = contract.LayerCall("cpu", options, training=True, save=False, fused_input=True,
                              weights=(True, False) * 5, masks=(False, True, True, False))
    assert contract.decode(contract.encode(call)) == call


# -- the op itself --------------------------------------------------------------------------------

OP_CASES = {
    "plain-uni": (dict(directions=1, proj=0, bias=True), {}, None),
    "options-bi-proj-lengths": (dict(directions=2, proj=3, bias=True), dict(peephole=True, clip=0.7, cell_clip=0.9),
                                torch.tensor([3, 6, 1, 4])),
    # (the longest below T: steps without rows end the layout; one sequence empty)
    "lengths-below-T": (dict(directions=2, proj=0, bias=True), {}, torch.tensor([3, 0, 1, 4])),
    "layer_norm-bi-nobias": (dict(directions=2, proj=0, bias=False), dict(layer_norm=True), None),
    "zoneout-train": (dict(directions=1, proj=0, bias=True), dict(zoneout=(0.3, 0.4), recurrent_dropout=0.2), None),
}


def _op_arguments(arch, cfg, lengths, *, steps=6):
    """The op's arguments for one layer call, as the shell builds them (functional.layer_rows)."""
    from fastlstm import packing
    from fastlstm.functional import input_gates

    training = "zoneout" in cfg
    options, weights, x, h0, c0, masks = layer_inputs(arch, cfg, torch.float64, training=training, steps=steps)
    layout = packing.layout_of(x, lengths)
    rows = input_gates(layout.rows(x), weights, options)
    weights = [w._replace(weight_ih=None, layer_norm_ih_weight=None) for w in weights]
    masks = [fastlstm.DirectionMasks()] * len(weights) if masks is None else [
        fastlstm.DirectionMasks(layout.rows(m.zoneout_h), layout.rows(m.zoneout_c), layout.sort(m.recurrent, 0))
        for m in masks]
    call = contract.LayerCall("cpu", options, training, True, False, contract.presence(weights),
                              contract.presence(masks))
    return (contract.encode(call), rows, layout.batch_sizes, layout.sort(h0, 1), layout.sort(c0, 1),
            contract.flat_weights(weights), contract.flat_masks(masks))


STEP_CASES = {"plain": {}, "options": dict(peephole=True, clip=0.5, cell_clip=0.7, zoneout=(0.2, 0.3))}


@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck(case):
    """torch.library.opcheck: the schema, the fake implementation against the real one, the autograd
    registration, and the op under AOT dispatch with dynamic shapes (which also requires every
    output, the buffers kept for the backward included, to be the same run after run)."""
    args = _op_arguments(*OP_CASES[case])
    torch.library.opcheck(torch.ops.fastlstm.lstm_layer.default, args)


@pytest.mark.parametrize("case", STEP_CASES)
def test_opcheck_of_a_single_step(case):
    """The CPU engine's fused form (one step, the input projection inside, [B, H] states)."""
    options = make_options(**STEP_CASES[case])
    cell = fastlstm.LSTMCell(5, 7, dtype=torch.float64, **STEP_CASES[case]).eval()
    w = cell._weights(torch.float64)
    x, h0, c0 = (torch.randn(3, n, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    weights = [w]
    call = contract.LayerCall("cpu", options, False, True, True, contract.presence(weights), (False,) * 4)
    args = (contract.encode(call), x, torch.ones(1, dtype=torch.int64) * 3, h0, c0, contract.flat_weights(weights), [])
    torch.library.opcheck(torch.ops.fastlstm.lstm_layer.default, args)


def _forced_op(monkeypatch):
    """Every layer call through the dispatcher (the op with its registered autograd), as in compile
    and export, though in eager mode."""
    monkeypatch.setattr(contract, "traced", lambda: True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", OP_CASES)
def test_the_op_path_matches_the_eager_path(case, backend, monkeypatch):
    """The same engine functions behind the op (its fake, its register_autograd backward, its
    backward op) and behind the eager autograd.Function: the same outputs and gradients, for a
    layer of every kind (the Triton engine interpreted)."""
    arch, cfg, lengths = OP_CASES[case]
    training = "zoneout" in cfg
    options, weights, x, h0, c0, masks = layer_inputs(arch, cfg, torch.float64, training=training)
    eager = run(on(backend), x, lengths, h0, c0, weights, options, masks, training)
    _forced_op(monkeypatch)
    through_op = run(on(backend), x, lengths, h0, c0, weights, options, masks, training)
    for a, b in zip(eager, through_op):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_cell_through_the_op(monkeypatch):
    """A single step (the CPU engine's fused form: the input projection inside) through the op."""
    cell = fastlstm.LSTMCell(5, 7, backend="cpu", peephole=True, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(4, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def results():
        cell.zero_grad()
        for t in (x, *hx):
            t.grad = None
        h, c = cell(x, hx)
        (h.sum() + 2 * c.square().sum()).backward()
        return [h, c, x.grad, *(t.grad for t in hx), *(p.grad for p in cell.parameters())]

    eager = results()
    _forced_op(monkeypatch)
    for a, b in zip(eager, results()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
