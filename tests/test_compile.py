"""torch.compile: a model containing fastlstm traces without graph breaks (``fullgraph=True``) and
matches eager, forward and backward, on each engine that runs here.

The compiled engines appear to dynamo as the ``fastlstm::layer`` custom op (engines/ops.py); the
reference is plain torch and is traced through.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm.engines import ops, triton_lstm
from fastlstm.options import make_options

from engine_cases import inputs_and_masks, run

pytestmark = pytest.mark.skipif(not ops.AVAILABLE, reason="torch.library.custom_op needs torch >= 2.4")


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


def _compare(backend, compiler, *args_fn, options=None, train=False):
    torch.manual_seed(0)
    model = Tagger(backend, **(options or {})).double().train(train)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    torch._dynamo.reset()
    x, kwargs = args_fn[0]()
    eager = _outputs_and_grads(model, x, **kwargs)
    traced = _outputs_and_grads(compiled, x, **kwargs)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def _padded():
    return torch.randn(6, 4, 5, dtype=torch.float64), {}


def _packed():
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    return pack_padded_sequence(x, [6, 2, 5, 3], enforce_sorted=False), {}


@pytest.mark.parametrize("backend, inputs", [("reference", _padded), ("cpu", _padded), ("cpu", _packed)],
                         ids=["reference-padded", "cpu-padded", "cpu-packed"])
def test_compiled_model_matches_eager(backend, inputs):
    _compare(backend, "aot_eager", inputs, options=dict(peephole=True, zoneout=0.2, cell_clip=2.0))


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
    """The default backend (inductor) too, in float32."""
    torch.manual_seed(0)
    model = Tagger("cpu", layer_norm=True)
    x = torch.randn(6, 4, 5)
    eager = _outputs_and_grads(model, x)
    traced = _outputs_and_grads(torch.compile(model, fullgraph=True), x)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compiled_graph_calls_the_engine_as_one_op():
    """No graph break, and the cpu engine's layers are fastlstm::layer nodes in the captured graph."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = Tagger("cpu").double()
    torch.compile(model, fullgraph=True, backend=capture)(torch.randn(6, 4, 5, dtype=torch.float64))
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "fastlstm" in str(n.target)]
    assert len(calls) == 2  # one per layer


def test_compiled_cell_matches_eager():
    torch.manual_seed(0)
    cell = fastlstm.LSTMCell(5, 7, backend="cpu", peephole=True, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    hx = (torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64))
    eager = cell(x, hx)
    traced = torch.compile(cell, fullgraph=True, backend="aot_eager")(x, hx)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", [{}, dict(peephole=True, clip=0.5, zoneout=(0.2, 0.3)), dict(layer_norm=True)],
                         ids=["plain", "options", "layer_norm-proj"])
def test_triton_engine_through_the_custom_op(cfg):
    """The Triton engine's layer as the custom op (interpreted here), forward and backward, against
    the reference: the op's backward runs the engine's forward and backward as plain functions."""
    arch = dict(directions=2, proj=3 if "layer_norm" in cfg else 0, bias=True)
    training = "zoneout" in cfg
    options, weights, x, h0, c0, masks = inputs_and_masks(arch, cfg, torch.float64, training=training)
    lengths = torch.tensor([3, 6, 1, 4])
    ours = run(ops.layer_as_op("triton"), x, lengths, h0, c0, weights, options, masks, training)
    theirs = run(triton_lstm.lstm_layer, x, lengths, h0, c0, weights, options, masks, training)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_options_survive_the_op_encoding():
    options = make_options(activations=("relu", "softsign", "hard_sigmoid"), zoneout=(0.1, 0.2), clip=3.0,
                           cell_clip=1.0, peephole=True, coupled_input_forget=True, recurrent_dropout=0.1)
    layouts = ((True, False, True), (False, True))
    assert ops.decode(ops.encode(options, *layouts)) == (options, *layouts)
