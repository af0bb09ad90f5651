"""The CPU engine against the reference engine: outputs, final states and every gradient.

Every option, direction, projection, bias and length configuration runs on one thread and on a
team of threads that split the batch rows, in float64 (<= 1e-10) and float32 (error at most twice
the reference's own); gradcheck covers the hand-written backward on its own.
"""

import gc
import os
import platform

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm import functional, reference
from fastlstm.engines.cpu import kernels, layer
from fastlstm.engines.cpu import threads as cpu_threads
from fastlstm.masks import DirectionMasks, sample_direction_masks
from fastlstm.options import make_options
from fastlstm.packing import Layout
from fastlstm.weights import DirectionWeights

from tests.engines.cases import (ARCHS, LENGTHS, OPTIONS, cast, compare, compare_float32, compare_packed,
                                 layer_inputs, make_layer, on, run)



lstm_layer = on("cpu")


def lstm_cell(x, h0, c0, w, options, masks, *, training):
    return functional.lstm_cell(x, h0, c0, w, options, masks=masks, training=training, backend="cpu")


def test_kernels_were_built():
    """The kernels build at install (optional, so fastlstm installs without a compiler); in this
    project's CI they must have built, so their absence fails here rather than skipping tests."""
    assert kernels.available(), "fastlstm.engines.cpu._kernels is missing: pip install printed why it did not build"
    assert kernels.module().instruction_set() in ("avx512_bf16", "avx512", "avx2", "generic")
    # the best, unless FASTLSTM_CPU_ISA lowers it
    expected = os.environ.get(kernels.ISA_VARIABLE) or kernels.module().instruction_sets()[-1]
    assert kernels.module().instruction_set() == expected
    assert kernels.module().bfloat16_products() == (kernels.module().instruction_set() == "avx512_bf16")


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        return {flag for line in info if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_instruction_sets_follow_the_cpus_flags():
    """The best set the kernels pick is the one the CPU's flags allow (on Linux; other machines than
    x86-64 have the generic build only)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        assert kernels.module().instruction_sets() == ("generic",)
        return
    flags = _cpu_flags()
    assert flags, "no flags in /proc/cpuinfo"
    expected = "generic"
    if {"avx2", "fma"} <= flags:
        expected = "avx2"
    if {"avx512f", "avx512bw", "avx512vl", "fma"} <= flags:
        expected = "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    assert kernels.module().instruction_sets()[-1] == expected
    assert kernels.module().threading() in ("openmp", "threads")


THREADING = ["one-thread", "one-thread-natural", "rows", "rows-natural", "columns", "columns-natural"]


# Weights of odd sizes (N past a panel, K odd) read through each layout the engine packs from: a
# row-major W and its transpose (the forward's W^T), and strided slices of both.
PANEL_SOURCES = {"W": lambda w: w, "W^T": lambda w: w.t(), "W[:, ::2]": lambda w: w[:, ::2],
                 "W^T[::2]": lambda w: w.t()[::2]}


@pytest.mark.parametrize("shape", [(20, 7), (33, 5), (512, 128), (2048, 96), (1, 1)], ids=str)
@pytest.mark.parametrize("source", PANEL_SOURCES.values(), ids=PANEL_SOURCES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_panels_put_every_element_in_its_place(shape, source, dtype, instruction_set):
    """The packers' layouts (kernels.h, pack_panels / pack_bf16_pairs, in each instruction set's
    build), element by element: ``panels[q, k, c] = b[k, q*NR + c]`` and bfloat16 pairs
    ``[q, j, c, e] = b[2j + e, q*16 + c]``, zero past K and N."""
    b = source(torch.randn(shape, dtype=dtype))
    k, n = b.shape
    nr = 16 if dtype == torch.float32 else 8
    padded = torch.zeros(k + 1, -(-n // 16) * 16, dtype=dtype)  # (zero past K, to even, and past N)
    padded[:k, :n] = b
    panels = layer._panels(b)
    q, kk, c = torch.meshgrid(*(torch.arange(s) for s in panels.shape), indexing="ij")
    assert torch.equal(panels, padded[kk, q * nr + c])
    if dtype == torch.float32:
        pairs = layer._bfloat16_pair_panels(b.bfloat16().float())
        q, j, c, e = torch.meshgrid(*(torch.arange(s) for s in pairs.shape), indexing="ij")
        assert pairs.shape[1] == -(-k // 2)
        assert torch.equal(pairs, padded.bfloat16()[2 * j + e, q * 16 + c])


@pytest.fixture(params=THREADING)
def threads(request, monkeypatch):
    """Test shapes are small; force every threading mode (one thread, rows split across threads,
    each step's columns split across threads) and both weight layouts (packed, natural)."""
    _force_threading(request.param, monkeypatch)
    return request.param


@pytest.fixture(params=["one-thread", "rows-natural", "columns"])
def some_threads(request, monkeypatch):
    """The three threading modes, each with one of the layouts, for the largest grid."""
    _force_threading(request.param, monkeypatch)
    return request.param


@pytest.fixture(params=["one-thread", "rows-natural"])
def gradcheck_threads(request, monkeypatch):
    """gradcheck runs the forward hundreds of times: the threading modes whose math differs
    (layouts; rows) are enough here, column teams are compared with the reference elsewhere."""
    _force_threading(request.param, monkeypatch)
    return request.param


def _force_threading(mode, monkeypatch):
    """Forces one threading mode at any shape (the engine picks by weight size and batch)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for least in ("MIN_ROWS_PER_THREAD", "MIN_ROWS_PER_THREAD_AVX512"):
        monkeypatch.setattr(cpu_threads, least, 1 if mode.startswith("rows") else 1 << 30)
    for least in ("MIN_COLUMN_WEIGHT_BYTES", "MIN_COLUMN_WEIGHT_BYTES_UNSPLIT"):
        monkeypatch.setattr(cpu_threads, least, 0 if mode.startswith("columns") else 1 << 62)
    monkeypatch.setattr(cpu_threads, "MIN_COLUMNS_PER_MEMBER", 1)  # a team even at the tests' tiny H
    natural = mode.endswith("natural")
    monkeypatch.setattr(cpu_threads, "MIN_ROWS_TO_PACK", 1 << 30 if natural else 1)
    monkeypatch.setattr(cpu_threads, "MIN_STEPS_TO_PACK", 1 << 30 if natural else 1)


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_engine_matches_reference_float64(cfg, arch, lengths, some_threads):
    training = any(k in cfg for k in ("zoneout", "recurrent_dropout", "weight_drop", "everything"))
    compare(lstm_layer, arch, cfg, lengths=lengths, training=training, dtype=torch.float64, tol=1e-10)


# Every instruction set this machine runs (generic, avx2, avx512: kernels.h compiled once per set),
# forced one by one. The other tests run the best one.
INSTRUCTION_SETS = kernels.module().instruction_sets() if kernels.available() else ("(kernels not built)",)


@pytest.fixture(params=INSTRUCTION_SETS)
def instruction_set(request):
    with kernels.instruction_set(request.param):
        yield request.param


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_every_instruction_set_matches_reference(cfg, arch, instruction_set, some_threads):
    training = any(k in cfg for k in ("zoneout", "recurrent_dropout", "weight_drop", "everything"))
    compare(lstm_layer, arch, cfg, lengths=LENGTHS["unequal"], training=training, dtype=torch.float64, tol=1e-10)
    compare_float32(lstm_layer, arch, cfg, training=training, lengths=LENGTHS["unequal"])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_every_instruction_set_single_step_matches_torch(bias, instruction_set):
    """The fused single step (LSTMCell), forward and backward, against torch.nn.LSTMCell in float64."""
    torch.manual_seed(3)
    theirs = torch.nn.LSTMCell(6, 7, bias=bias, dtype=torch.float64)
    ours = fastlstm.LSTMCell.from_torch(theirs, backend="cpu")
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64))
    results = []
    for module in (ours, theirs):
        h, c = module(x, state)
        grads = torch.autograd.grad((h * 1.3 + c * 0.7).sum(), [x, *module.parameters()])
        results.append((h, c, *grads))
    for k, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"output/grad {k}: {m}")


def test_instruction_set_variable_lowers_or_refuses(tmp_path):
    """FASTLSTM_CPU_ISA lowers the set in a fresh process; a set the machine lacks raises naming it."""
    import subprocess
    import sys

    script = "import torch, fastlstm; fastlstm.LSTM(3, 4)(torch.randn(2, 1, 3)); " \
             "from fastlstm.engines.cpu import kernels; print(kernels.module().instruction_set())"
    for wanted in ("generic", "no-such-set"):
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, kernels.ISA_VARIABLE: wanted},
                              capture_output=True, text=True, timeout=120)
        if wanted == "generic":
            assert done.returncode == 0 and done.stdout.strip() == "generic", done.stderr
        else:
            assert done.returncode != 0 and "FASTLSTM_CPU_ISA='no-such-set'" in done.stderr


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", [OPTIONS["zoneout"], OPTIONS["everything"]], ids=["zoneout", "everything"])
def test_engine_eval_and_train_modes(cfg, training, threads):
    compare(lstm_layer, ARCHS["bi-proj"], cfg, lengths=LENGTHS["unequal"], training=training,
            dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_engine_float32_error_is_at_most_twice_the_references(cfg, threads):
    """float32 within twice the float32 reference's error (tests/engines/cases.compare_float32)."""
    training = any(k in cfg for k in ("zoneout", "recurrent_dropout", "weight_drop"))
    compare_float32(lstm_layer, ARCHS["bi-proj"], cfg, training=training, lengths=LENGTHS["unequal"])


@pytest.mark.parametrize("cfg", [OPTIONS["plain"], OPTIONS["layer_norm"], OPTIONS["everything"]], ids=["plain", "ln", "everything"])
def test_larger_shapes(cfg, threads):
    """Sizes past any small-size special case: H = 40, B = 9, T = 17."""
    options, weights = make_layer(ARCHS["bi-proj"], cfg, input_size=11, hidden=40, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(17, 9, 11, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 9, 3, generator=g, dtype=torch.float64).requires_grad_()
    c0 = torch.randn(2, 9, 40, generator=g, dtype=torch.float64).requires_grad_()
    lengths = torch.randint(1, 18, (9,), generator=g)
    training = options.is_stochastic
    masks = None
    if training:
        masks = [sample_direction_masks(options, steps=17, batch=9, hidden_size=40, h_out=3, device="cpu",
                                        dtype=torch.float64) for _ in range(2)]
    ours = run(lstm_layer, x, lengths, h0, c0, weights, options, masks, training)
    theirs = run(reference.lstm_layer, x, lengths, h0, c0, weights, options, masks, training)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


GRADCHECK = {k: OPTIONS[k] for k in ("plain", "peephole", "clip", "coupled", "layer_norm", "zoneout", "cell_clip", "everything")}


@pytest.mark.parametrize("cfg", GRADCHECK.values(), ids=GRADCHECK.keys())
def test_hand_written_backward_gradcheck(cfg, gradcheck_threads):
    options, weights = make_layer(ARCHS["bi-proj"], cfg, input_size=2, hidden=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 4, 3])
    masks = None
    if options.is_stochastic:
        masks = [sample_direction_masks(options, steps=4, batch=3, hidden_size=3, h_out=3, device="cpu",
                                        dtype=torch.float64) for _ in range(2)]
    flat = [p for w in weights for p in w]
    present = [i for i, p in enumerate(flat) if p is not None]

    def f(x, h0, c0, *params):
        full = list(flat)
        for i, p in zip(present, params):
            full[i] = p
        ws = [DirectionWeights(*full[k * 10 : (k + 1) * 10]) for k in range(2)]
        return lstm_layer(x, lengths, h0, c0, ws, options, masks, training=masks is not None)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *[flat[i] for i in present]), eps=1e-6, atol=1e-7, rtol=1e-5)


FORMS = ["padded", "batch_first", "unbatched", "packed"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", [dict(num_layers=1), dict(num_layers=3, bidirectional=True, proj_size=2)], ids=["1", "3bi-proj"])
def test_module_backend_cpu_matches_torch(arch, form, threads):
    """The whole contract through the module: backend="cpu" against torch.nn.LSTM in float64."""
    ours = fastlstm.LSTM(4, 5, batch_first=form == "batch_first", backend="cpu", dtype=torch.float64, **arch)
    theirs = torch.nn.LSTM(4, 5, batch_first=form == "batch_first", dtype=torch.float64, **arch)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        xx = x.clone().requires_grad_()
        inp = {"padded": xx, "batch_first": xx.transpose(0, 1), "unbatched": xx[:, 0],
               "packed": pack_padded_sequence(xx, [4, 6, 2], enforce_sorted=False)}[form]
        out, (h, c) = model(inp)
        out = out.data if form == "packed" else out
        (out.sum() + 2 * h.sum() + 3 * c.sum()).backward()
        results.append([out, h, c, xx.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_auto_picks_cpu_for_floating_cpu_tensors_and_reference_otherwise():
    from fastlstm.engines import select_engine

    opts = make_options()
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert select_engine("auto", torch.device("cpu"), dtype, opts) == "cpu"
    assert select_engine("auto", torch.device("meta"), torch.float32, opts) == "reference"
    with pytest.raises(ValueError, match="backend='cpu'"):
        select_engine("cpu", torch.device("meta"), torch.float32, opts)


def test_cell_backend_cpu_matches_torch_cell():
    ours = fastlstm.LSTMCell(4, 6, backend="cpu", dtype=torch.float64)
    theirs = torch.nn.LSTMCell(4, 6, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64)
    hx = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    for a, b in zip(ours(x, hx), theirs(x, hx)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_inference_path_matches_reference(cfg, arch, some_threads):
    """Without autograd the engine keeps one step of buffers instead of all: same results."""
    training = any(k in cfg for k in ("zoneout", "recurrent_dropout", "weight_drop"))
    options, weights, x, h0, c0, masks = layer_inputs(arch, cfg, torch.float64, training=training)
    lengths = LENGTHS["unequal"]
    with torch.no_grad():
        ours = lstm_layer(x, lengths, h0, c0, weights, options, masks, training=training)
        theirs = reference.lstm_layer(x, lengths, h0, c0, weights, options, masks, training=training)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


UNI_NOBIAS = dict(directions=1, proj=0, bias=False)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_single_step_inference_path_matches_reference(cfg, training, bias):
    """LSTMCell and T = 1 calls without autograd take a path of their own (one C++ call)."""
    options, weights = make_layer(ARCHS["uni"] if bias else UNI_NOBIAS, cfg, dtype=torch.float64)
    w = weights[0]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    c0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    masks = None
    if training and options.is_stochastic:
        masks = sample_direction_masks(options, steps=1, batch=3, hidden_size=5, h_out=5, device="cpu",
                                       dtype=torch.float64)
    train = training and masks is not None
    with torch.no_grad():
        h, c = lstm_cell(x, h0, c0, w, options, masks, training=train)
        y1, h1, c1 = lstm_layer(x[None], None, h0[None], c0[None], [w], options,
                                    None if masks is None else [masks], training=train)
        _, h_ref, c_ref = reference.lstm_layer(x[None], None, h0[None], c0[None], [w], options,
                                               None if masks is None else [masks], training=train)
    for ours in ((h, c), (h1[0], c1[0]), (y1[0], c1[0])):
        torch.testing.assert_close(ours[0], h_ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours[1], c_ref[0], rtol=1e-10, atol=1e-10)
    assert y1.data_ptr() != h1.data_ptr()  # output and h_n must not alias


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_single_step_autograd_path_matches_reference(cfg, training, bias):
    """LSTMCell and T = 1 calls with autograd take the step's own Function (one C++ call each way):
    outputs, final states and every gradient against the reference, under random cotangents."""
    options, weights = make_layer(ARCHS["uni"] if bias else UNI_NOBIAS, cfg, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    c0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    cot = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    masks = None
    if training and options.is_stochastic:
        masks = sample_direction_masks(options, steps=1, batch=3, hidden_size=5, h_out=5, device="cpu",
                                       dtype=torch.float64)
    train = training and masks is not None

    def gradients(call):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        params = [None if p is None else p.detach().clone().requires_grad_() for p in weights[0]]
        outs = call(*leaves, DirectionWeights(*params))
        loss = sum((o * u).sum() for o, u in zip(outs, cot))
        wanted = leaves + [p for p in params if p is not None]
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, wanted))

    def layer(engine):
        def call(x, h0, c0, w):
            y, h, c = engine(x[None], None, h0[None], c0[None], [w], options,
                             None if masks is None else [masks], training=train)
            return y[0], h[0], c[0]
        return call

    def cell(x, h0, c0, w):
        h, c = lstm_cell(x, h0, c0, w, options, masks, training=train)
        return h, h, c  # (as the layer's y, h_n, c_n)

    truth = gradients(layer(reference.lstm_layer))
    for ours in (gradients(cell), gradients(layer(lstm_layer))):
        assert len(ours) == len(truth)
        for a, b in zip(ours, truth):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _final_state_gradients(engine, inputs, *, output_zero_cotangent):
    """Gradients of a loss on ``h_n`` and ``c_n`` alone (a classifier's), or with ``0 * y`` added
    (an output gradient of zeros, which the backward then reads row by row)."""
    options, weights, x, h0, c0, masks = inputs
    y, h, c = engine(x, None, h0, c0, weights, options, masks, training=False)
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in (h, c))
    if output_zero_cotangent:
        loss = loss + (y * 0).sum()
    leaves = [x, h0, c0] + [p for w in weights for p in w if p is not None]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("steps", [1, 6], ids=["one-step", "layer"])
@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("cfg", ["plain", "peephole", "zoneout", "layer_norm"])
def test_a_loss_on_the_final_state_alone(cfg, arch, steps, some_threads):
    """No gradient reaches the output: the backward reads one shared row of zeros as every row's
    ``dy`` (T = 1 calls take the single step's form). Every gradient against the reference."""
    inputs = layer_inputs(arch, OPTIONS[cfg], torch.float64, steps=steps)
    ours = _final_state_gradients(lstm_layer, inputs, output_zero_cotangent=False)
    theirs = _final_state_gradients(reference.lstm_layer, inputs, output_zero_cotangent=False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [1, 6], ids=["one-step", "layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_no_output_gradient_equals_a_zero_output_gradient(dtype, steps):
    """In every dtype (half precision's ``dy`` is read in it), the shared row of zeros gives the
    gradients of an output gradient of zeros, bit for bit."""
    inputs = layer_inputs(ARCHS["bi-proj"] if steps > 1 else ARCHS["uni"], OPTIONS["peephole"], torch.float64,
                          steps=steps)
    options, weights, x, h0, c0, masks = inputs
    half = [cast(t, dtype) for t in (x, h0, c0)]
    weights = [DirectionWeights(*(cast(p, dtype) for p in w)) for w in weights]
    inputs = (options, weights, *half, masks)
    none = _final_state_gradients(lstm_layer, inputs, output_zero_cotangent=False)
    zeros = _final_state_gradients(lstm_layer, inputs, output_zero_cotangent=True)
    for a, b in zip(none, zeros):
        assert torch.equal(a, b)


def test_single_step_autograd_path_gradcheck():
    """The step's hand-written backward by finite differences (every option that it takes at once)."""
    cfg = dict(peephole=True, clip=0.9, cell_clip=0.5, zoneout=(0.3, 0.4), recurrent_dropout=0.3, weight_drop=0.3,
               activations=("hard_sigmoid", "softsign", "relu"))
    cell = fastlstm.LSTMCell(2, 3, dtype=torch.float64, backend="cpu", **cfg).train()
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    masks = cell.sample_masks(x)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def f(x, h0, c0, *flat):
        return torch.func.functional_call(cell, dict(zip(names, flat)), (x, (h0, c0)), {"masks": masks})

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_cell_module_no_grad_and_grad_agree():
    cell = fastlstm.LSTMCell(4, 6, peephole=True, zoneout=0.2, dtype=torch.float64).eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    hx = (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))
    with torch.no_grad():
        fast = cell(x, hx)
    slow = cell(x, hx)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sorted_input", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("cfg", [OPTIONS["plain"], OPTIONS["layer_norm"], OPTIONS["everything"]], ids=["plain", "ln", "everything"])
def test_packed_rows_are_taken_as_they_are(cfg, sorted_input, some_threads):
    """A PackedSequence's rows against the reference on the padded batch."""
    lengths = torch.tensor([6, 5, 3, 1]) if sorted_input else LENGTHS["unequal"]
    compare_packed(lstm_layer, ARCHS["bi-proj"], cfg, lengths=lengths, sorted_input=sorted_input, tol=1e-10)


@pytest.mark.parametrize("batch, hidden, threads, expected", [
    (1, 128, 2, 2),  # a batch too small to split into rows: columns from 64 KB of W_hh
    (1, 32, 2, 1),  # 16 KB: the barriers would cost more than they save
    (16, 256, 2, 1),  # rows (8 per thread) below 4 MB
    (16, 512, 2, 2),  # 4 MB: columns even where rows split
    (1, 1024, 1, 1),  # one thread: nobody to split with
    (1, 64, 16, 4),  # 16 threads, H = 64: one member per 16 columns of the backward's product
])
def test_threading_choice(batch, hidden, threads, expected, monkeypatch):
    """Which team a layer's step gets: the measured rule of engines/cpu/threads.py."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    options, weights = make_layer(ARCHS["uni"], {}, input_size=4, hidden=hidden, dtype=torch.float32)
    call = cpu_call(options, weights)
    inputs = cpu_inputs(Layout.of_full(3, batch, torch.device("cpu")), weights, hidden)
    direction = layer.Direction(call, inputs, 0)
    assert direction.column_threads == expected
    assert direction.threads == (1 if expected > 1 else min(threads, max(1, batch // 8)))


def cpu_call(options, weights):
    from fastlstm.engines.contract import LayerCall

    return LayerCall("cpu", options, training=False, save=False, fused_input=False,
                     weights=tuple(t is not None for w in weights for t in w), masks=(False,) * 4 * len(weights))


def cpu_inputs(layout, weights, hidden):
    from fastlstm.engines.contract import LayerInputs

    D, B = len(weights), layout.batch
    return LayerInputs(torch.empty(layout.total, D * 4 * hidden), layout, torch.zeros(D, B, hidden),
                       torch.zeros(D, B, hidden), weights, [DirectionMasks() for _ in weights])


@pytest.mark.parametrize("steps", [1, 4], ids=["step", "layer"])
def test_saved_buffers_do_not_outlive_the_graph(steps):
    """What a call keeps for its backward lives in autograd's saved tensors (no reference cycle
    through the graph, which Python's collector cannot see): it is freed with the graph, after a
    backward or when a graph is dropped without one."""
    import weakref

    lstm = fastlstm.LSTM(4, 6, backend="cpu")
    kept = []

    def pack(t):
        if not t.requires_grad:  # (not the parameters, which the module keeps)
            kept.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(5):
            y, (h, c) = lstm(torch.randn(steps, 2, 4, requires_grad=True))
            (y.sum() + c.sum()).backward()
            lstm(torch.randn(steps, 2, 4))[0].sum()  # a graph dropped without backward
    del y, h, c
    gc.collect()
    assert kept and all(ref() is None for ref in kept)


def test_a_one_element_layer_norm_passes_no_gradient():
    """Over one hidden unit the cell's layer norm outputs its shift whatever the cell: its gradient is
    exactly 0. The backward's last line once formed dout * gain again inside an FMA, subtracting the
    rounded product (the mean) from the exact one: 0 became the rounding error times 1/sqrt(eps),
    which peepholes and ReLU gates grew into a relative error of 2.4e-7 in dx."""
    grads = {}
    for backend in ("cpu", "reference"):
        g = torch.Generator().manual_seed(97)
        m = fastlstm.LSTM(3, 1, bias=False, dtype=torch.float64, backend=backend, peephole=True, layer_norm=True,
                          activations=("relu", "relu", "softsign"))
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 2)
        x = torch.randn(3, 1, 3, dtype=torch.float64, generator=g).requires_grad_()
        h0, c0 = (torch.randn(1, 1, 1, dtype=torch.float64, generator=g) for _ in range(2))
        y, _ = m(x, (h0, c0))
        grads[backend] = torch.autograd.grad((y * torch.randn(y.shape, dtype=y.dtype, generator=g)).sum(), x)[0]
    scale = grads["reference"].abs().max()
    torch.testing.assert_close(grads["cpu"], grads["reference"], rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("peephole", [False, True])
def test_step_gradients_keep_no_scratch_alive(peephole):
    """The gradients a step hands back (h0's, c0's, the peephole weights') are tensors of their own
    size: as views of the backward's scratch they would keep it, the gates' gradient included
    (4x their size), alive while the caller holds them."""
    cell = fastlstm.LSTMCell(4, 6, backend="cpu", peephole=peephole)
    x, h0, c0 = (torch.randn(3, n, requires_grad=True) for n in (4, 6, 6))
    h, c = cell(x, (h0, c0))
    (h.sum() + c.sum()).backward()
    grads = [h0.grad, c0.grad] + ([cell.weight_peephole.grad] if peephole else [])
    for grad in grads:
        assert grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()


def test_single_step_backward_with_no_rows():
    """B = 0 through the step's backward: zero weight gradients, empty input gradients, no crash."""
    cell = fastlstm.LSTMCell(4, 6, backend="cpu", peephole=True)
    x = torch.randn(0, 4, requires_grad=True)
    h, c = cell(x)
    (h.sum() + c.sum()).backward()
    assert x.grad.shape == (0, 4)
    assert all(p.grad is not None and not p.grad.any() for p in cell.parameters())


@pytest.mark.parametrize("steps", [1, 3], ids=["step", "layer"])
def test_backward_sees_c0_changed_in_place(steps):
    """The backward reads c0 (through the plans' pointers): changing it in place between forward
    and backward raises, as torch does, instead of giving wrong gradients."""
    lstm = fastlstm.LSTM(4, 6, backend="cpu")
    h0, c0 = torch.randn(1, 2, 6), torch.randn(1, 2, 6, requires_grad=True)
    c_start = c0.clone()
    y, (h, c) = lstm(torch.randn(steps, 2, 4), (h0, c_start))
    c_start.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + c.sum()).backward()


@pytest.mark.parametrize("cfg", ["plain", "layer_norm", "clip", "zoneout"])
@pytest.mark.parametrize("arch", ["uni", "bi-proj"])
def test_retained_graph_runs_backward_twice(cfg, arch, some_threads):
    """The recurrence hands its per-step buffers to autograd's saved tensors: with
    ``retain_graph=True`` a second backward reads them again and gives the same gradients (as
    torch.nn.LSTM does), checked against the reference engine."""
    options_cfg = {"plain": {}, "layer_norm": dict(layer_norm=True), "clip": dict(clip=0.4, cell_clip=0.5),
                   "zoneout": dict(zoneout=(0.3, 0.2))}[cfg]
    options, weights, x, h0, c0, masks = layer_inputs(ARCHS[arch], options_cfg, torch.float64, training=True)
    grads = {}
    for fn in (lstm_layer, reference.lstm_layer):
        leaves = [x, h0, c0] + [p for w in weights for p in w if p is not None]
        y, h, c = fn(x, None, h0, c0, weights, options, masks, training=True)
        loss = y.pow(2).sum() + h.sum() + c.pow(2).sum()
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        grads[fn] = second
    for a, b in zip(grads[lstm_layer], grads[reference.lstm_layer]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_backward_frees_the_saved_buffers():
    """Without ``retain_graph`` autograd frees the recurrence's saved buffers once its backward is
    done (before the input projection's backward allocates dx and dW_ih); a second backward then
    raises torch's error rather than reading freed memory."""
    lstm = fastlstm.LSTM(4, 6, backend="cpu")
    y, (h, c) = lstm(torch.randn(5, 3, 4, requires_grad=True))
    loss = y.sum() + c.sum()
    node = c.grad_fn
    while type(node).__name__ != "_EagerLayerBackward":
        node = node.next_functions[0][0]
    assert len(node.saved_tensors) >= 3  # c0, then each direction's buffers
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        node.saved_tensors
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


class _CopyingHooks:
    """Saved-tensor hooks that keep a copy of every saved tensor and, once the forward is done,
    fill the originals of the engine's own buffers (no grad, not views) with NaN: whatever still
    read an original would read NaN, as it would read freed memory once the allocator reuses it."""

    def __init__(self):
        self.originals = []

    def pack(self, t):
        if t.is_floating_point() and not t.requires_grad and t._base is None:
            self.originals.append(t)
        return t.clone()

    def poison(self):
        for t in self.originals:
            t.fill_(float("nan"))


def _twin_modules(**kwargs):
    ours = fastlstm.LSTM(4, 6, backend="cpu", **kwargs).double()
    theirs = fastlstm.LSTM(4, 6, backend="reference", **kwargs).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _gradients(module, run):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    h0, c0 = (torch.randn(module.num_layers * 2, 3, 6, dtype=torch.float64, generator=g).requires_grad_()
              for _ in range(2))
    y, (h, c) = run(module, x, (h0, c0))
    (y.pow(2).sum() + h.sum() + c.pow(2).sum()).backward()
    return [x.grad, h0.grad, c0.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("kwargs", [dict(bidirectional=True, num_layers=2),
                                    dict(bidirectional=True, layer_norm=True, cell_clip=0.5, clip=0.5),
                                    dict(bidirectional=True, proj_size=3)], ids=["bi-2layer", "bi-ln-clips", "bi-proj"])
@pytest.mark.parametrize("how", ["copying-hooks", "checkpoint", "save_on_cpu"])
def test_saved_tensor_hooks_that_copy_or_recompute(kwargs, how):
    """The recurrence's saved buffers pass through saved-tensor hooks, which may hand back a copy
    (``save_on_cpu``, offloading) or a recomputation (``torch.utils.checkpoint`` without
    reentrance) instead of the allocation the forward wrote: the backward reads what they hand
    back (the plans point at it again), checked against the reference engine."""
    from torch.utils.checkpoint import checkpoint

    ours, theirs = _twin_modules(**kwargs)
    plain = lambda m, x, s: m(x, (s[0][..., : m.proj_size or 6], s[1]))  # noqa: E731

    def hooked(module, x, state):
        if how == "copying-hooks":
            hooks = _CopyingHooks()
            with torch.autograd.graph.saved_tensors_hooks(hooks.pack, lambda t: t):
                outputs = plain(module, x, state)
            assert hooks.originals, "the engine saved no buffers of its own: the test tests nothing"
            hooks.poison()
            return outputs
        if how == "checkpoint":
            return checkpoint(plain, module, x, state, use_reentrant=False)
        with torch.autograd.graph.save_on_cpu():
            return plain(module, x, state)

    for a, b in zip(_gradients(ours, hooked), _gradients(theirs, plain)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lengths", [[0, 6, 2, 0], [0, 0, 0, 0]], ids=["some-zero", "all-zero"])
@pytest.mark.parametrize("arch", ["uni", "bi-proj"])
@pytest.mark.parametrize("cfg", ["plain", "everything"])
def test_zero_lengths(cfg, arch, lengths, some_threads):
    """Sequences of length 0 (padded input with lengths; a PackedSequence cannot hold them) keep
    their initial state and output zeros, as in the reference engine (the layout took the batch
    size from the rows of the first step, which a zero-length sequence is not among)."""
    compare(lstm_layer, ARCHS[arch], OPTIONS[cfg], lengths=torch.tensor(lengths), training=cfg == "everything",
            dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rows_result_does_not_depend_on_its_place_in_the_batch(dtype):
    """The same sequence in every row of a batch of 7 (one block of four rows and three rows past
    it, which the kernels' GEMM takes by another loop) gives, through step's native path (every
    product the kernels'), the same bits in every row as alone: a stream's output does not depend on
    the streams batched with it. (The layer's input projection is torch's GEMM, whose blocking may
    depend on the batch.)"""
    torch.manual_seed(0)
    model = fastlstm.LSTM(6, 40, num_layers=2, backend="cpu", dtype=dtype).eval()
    one = torch.randn(5, 1, 6, dtype=dtype)
    with torch.no_grad():
        alone, _ = model.step(one)
        batch, _ = model.step(one.expand(5, 7, 6).contiguous())
    assert all(torch.equal(batch[:, r], alone[:, 0]) for r in range(7))


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch-default"])
def test_float32_projection_by_either_gemm(onednn, monkeypatch):
    """The float32 input projection runs oneDNN's linear or torch's default GEMM by gemm.py's rule
    (shapes and the CPU's instruction set); each is forced here, whatever this machine would pick:
    outputs, states and every gradient within the 2x rule of torch.nn.LSTM in float32, against
    float64, and the forced GEMM is the one that ran."""
    from fastlstm.engines.cpu import gemm
    from fastlstm.testing import assert_within_twice

    calls = []
    onednn_product = gemm._onednn
    monkeypatch.setattr(gemm, "uses_onednn", lambda *shape: onednn)
    monkeypatch.setattr(gemm, "_onednn", lambda x, w: calls.append(x.shape) or onednn_product(x, w))
    torch.manual_seed(0)
    truth_module = torch.nn.LSTM(12, 20, num_layers=2, bidirectional=True, dtype=torch.float64)
    base_module = torch.nn.LSTM(12, 20, num_layers=2, bidirectional=True)
    base_module.load_state_dict(truth_module.state_dict())
    ours = fastlstm.LSTM.from_torch(base_module, backend="cpu")
    x = torch.randn(7, 5, 12, dtype=torch.float64)
    results = []
    for module in (truth_module, base_module, ours):
        xs = x.to(next(module.parameters()).dtype).requires_grad_()
        y, (h, c) = module(xs)
        loss = y.sum() + (h * h).sum() + (c * 3).sum()
        results.append([y, h, c, *torch.autograd.grad(loss, [xs, *module.parameters()])])
    assert (len(calls) > 0) == onednn
    for name, mine, base, truth in zip(range(len(results[0])), results[2], results[1], results[0]):
        assert_within_twice(mine, base, truth, name=str(name))
