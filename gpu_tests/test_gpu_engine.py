"""The compiled Triton engine on a GPU against the reference (float64 truth) and cuDNN.

Tolerances follow flash-attention's rule (fastlstm.testing): at precision ``p``, our error against
the float64 reference is at most twice that of torch at ``p`` (the reference's torch ops in ``p``),
plus a few ulps of ``p`` at the tensor's scale.
"""

import dataclasses
import functools
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm
from fastlstm import functional, reference
from fastlstm.engines import select_engine
from fastlstm.engines.triton import layer as triton_layer
from fastlstm.engines.triton.grid import Grid
from fastlstm.masks import DirectionMasks, sample_direction_masks
from fastlstm.options import make_options
from fastlstm.testing import OPTIONS, assert_within_twice
from fastlstm.weights import DirectionWeights

triton_lstm_layer = functools.partial(functional.lstm_layer, backend="triton")

DEV = torch.device("cpu" if os.environ.get("FASTLSTM_GPU_TESTS_ON_CPU") == "1" else "cuda")
KERNEL_OPTIONS = dict(OPTIONS)  # every option runs in the kernels (the projection does not yet)
STOCHASTIC = ("zoneout", "recurrent_dropout", "weight_drop")


def _uniform(size, lo, hi):
    return torch.empty(size, dtype=torch.float64, device=DEV).uniform_(lo, hi)


def _layer(cfg, directions, batch, steps, input_size, hidden, bias=True, proj=0):
    """Random float64 weights, inputs and (training) masks on the GPU; ``proj``: the projection's size."""
    options = make_options(**cfg, has_bias=bias, has_projection=proj > 0,
                           proj_clip=0.3 if proj and "cell_clip" in cfg else None)
    k = hidden ** -0.5
    h_size = proj or hidden
    weights = []
    for _ in range(directions):
        w = dict(weight_ih=torch.empty(4 * hidden, input_size), weight_hh=torch.empty(4 * hidden, h_size))
        if proj:
            w["weight_hr"] = torch.empty(proj, hidden)
        if bias:
            w.update(bias_ih=torch.empty(4 * hidden), bias_hh=torch.empty(4 * hidden))
        if options.peephole:
            w["weight_peephole"] = torch.empty(3 * hidden)
        w = {n: t.double().uniform_(-k, k).to(DEV) for n, t in w.items()}
        if options.layer_norm:  # weights near 1, the cell's bias near 0
            w |= {"layer_norm_ih_weight": _uniform(4 * hidden, 0.7, 1.3),
                  "layer_norm_hh_weight": _uniform(4 * hidden, 0.7, 1.3),
                  "layer_norm_cell_weight": _uniform(hidden, 0.7, 1.3),
                  "layer_norm_cell_bias": _uniform(hidden, -0.2, 0.2)}
        weights.append(DirectionWeights(**w))
    x = torch.randn(steps, batch, input_size, dtype=torch.float64, device=DEV)
    h0 = torch.randn(directions, batch, h_size, dtype=torch.float64, device=DEV) * 0.5
    c0 = torch.randn(directions, batch, hidden, dtype=torch.float64, device=DEV) * 0.5
    training = any(s in cfg for s in STOCHASTIC)
    masks = None
    if training:
        masks = [sample_direction_masks(options, steps=steps, batch=batch, hidden_size=hidden, h_out=h_size,
                                        device=DEV, dtype=torch.float64) for _ in range(directions)]
    return options, weights, x, h0, c0, masks, training


def _run(fn, dtype, options, weights, x, lengths, h0, c0, masks, training, cotangents):
    """Outputs, final states and every gradient of ``fn`` with everything cast to ``dtype``."""
    cast = lambda t: None if t is None else t.detach().to(dtype).requires_grad_()  # noqa: E731
    ws = [DirectionWeights(*(cast(t) for t in w)) for w in weights]
    xx, hh, cc = cast(x), cast(h0), cast(c0)
    ms = None if masks is None else [DirectionMasks(*(None if t is None else t.to(dtype) for t in (
        m.zoneout_h, m.zoneout_c, m.recurrent, m.weight_hh))) for m in masks]
    y, h, c = fn(xx, lengths, hh, cc, ws, options, ms, training=training)
    loss = sum((t.double() * u).sum() for t, u in zip((y, h, c), cotangents))
    leaves = [xx, hh, cc] + [p for w in ws for p in w if p is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [y, h, c, *grads]


def _half_precision_reference(x, lengths, h0, c0, weights, options, masks, *, training):
    """The reference's torch ops run in the input's own precision (no float32 upcast, cell state
    included): torch's error at that precision, for the variants cuDNN does not have."""
    outs = [reference.lstm_direction(reference.input_gates(x, w, options), lengths, h0[d], c0[d], w, options,
                                     None if masks is None else masks[d], training=training, reverse=d == 1)
            for d, w in enumerate(weights)]
    return torch.cat([o[0] for o in outs], 2), torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])


def _check(ours, baseline, truth, dtype, names):
    """Ours within twice the baseline's error of float64, plus the floor (fastlstm.testing)."""
    for name, a, b, t in zip(names, ours, baseline, truth):
        assert not a.isnan().any(), f"{name}: NaN (an element never written?)"
        assert_within_twice(a, b, t, name=name, dtype=dtype)


def _compare(cfg, dtype, *, directions, batch, steps, hidden, input_size=None, lengths=None, ours_fn=None, proj=0):
    options, weights, x, h0, c0, masks, training = _layer(cfg, directions, batch, steps, input_size or hidden,
                                                          hidden, proj=proj)
    if lengths is not None:
        lengths = lengths.to(DEV)
    h_size = proj or hidden
    cot = [torch.randn(s, dtype=torch.float64, device=DEV) for s in
           ((steps, batch, directions * h_size), (directions, batch, h_size), (directions, batch, hidden))]
    args = (options, weights, x, lengths, h0, c0, masks, training, cot)
    truth = _run(reference.lstm_layer, torch.float64, *args)
    ours = _run(ours_fn or triton_lstm_layer, dtype, *args)
    base_fn = reference.lstm_layer if dtype == torch.float32 else _half_precision_reference
    baseline = _run(base_fn, dtype, *args)
    names = ["output", "h_n", "c_n", "x", "h0", "c0"] + [
        f"dir{d}.{f}" for d, w in enumerate(weights) for f, p in zip(DirectionWeights._fields, w) if p is not None]
    _check(ours, baseline, truth, dtype, names)


def _steps(cfg, steps):
    """A layer-norm LSTM at these initialisations is chaotic: the float32 reference's own error grows
    from 1e-6 at 8 steps to 3e-5 at 40 ("everything", B=16, H=256), so in half precision every answer
    is noise by step 40 and comparing errors tests nothing. Those configurations run 12 steps."""
    return min(steps, 12) if cfg.get("layer_norm") else steps


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {  # (D, B, T, H): small and large H, B = 1, odd sizes, B past one batch block
    "uni-B1-H256": (1, 1, 64, 256),
    "uni-B16-H768": (1, 16, 48, 768),
    "bi-B5-H100": (2, 5, 33, 100),
    "uni-B64-H1024": (1, 64, 32, 1024),
    "bi-B200-H256": (2, 200, 16, 256),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_plain_lstm_at_real_shapes(dtype, shape):
    d, b, t, h = shape
    _compare({}, dtype, directions=d, batch=b, steps=t, hidden=h)


@pytest.mark.parametrize("cfg", KERNEL_OPTIONS.values(), ids=KERNEL_OPTIONS.keys())
def test_every_option_bf16(cfg):
    steps = _steps(cfg, 40)
    _compare(cfg, torch.bfloat16, directions=2, batch=16, steps=steps, hidden=256,
             lengths=torch.randint(1, steps + 1, (16,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_option_at_once_other_dtypes(dtype):
    steps = _steps(KERNEL_OPTIONS["everything"], 40)
    _compare(KERNEL_OPTIONS["everything"], dtype, directions=2, batch=16, steps=steps, hidden=256,
             lengths=torch.randint(1, steps + 1, (16,)))


def _through_packed_rows(x, lengths, h0, c0, weights, options, masks, *, training):
    """The packed entry point behind the padded signature: ``x`` packed (unsorted lengths), its rows
    through the kernels, the output rows padded again (differentiably) for the comparison."""
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    y, h, c = triton_lstm_layer(packed, None, h0, c0, weights, options, masks, training=training)
    y, _ = pad_packed_sequence(packed._replace(data=y), total_length=x.shape[0])
    return y, h, c


@pytest.mark.parametrize("cfg", ["plain", "everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_rows(dtype, cfg):
    """A PackedSequence's rows straight into the kernels (no padding built), unsorted lengths from 1
    to T, both directions, two batch blocks."""
    steps = _steps(KERNEL_OPTIONS[cfg], 48)
    _compare(KERNEL_OPTIONS[cfg], dtype, directions=2, batch=100, steps=steps, hidden=256,
             lengths=torch.randint(1, steps + 1, (100,)), ours_fn=_through_packed_rows)


@pytest.mark.parametrize("cfg", ["layer_norm", "everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_norm_inference(dtype, cfg):
    """Layer norm without autograd (nothing saved), at a shape whose groups hold several programs
    (their moments exchanged each step): output and final states."""
    steps = _steps(KERNEL_OPTIONS[cfg], 40)
    options, weights, x, h0, c0, masks, training = _layer(KERNEL_OPTIONS[cfg], 2, 48, steps, 512, 512)
    lengths = torch.randint(1, steps + 1, (48,), device=DEV)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    ws = [DirectionWeights(*(cast(t) for t in w)) for w in weights]
    ms = None if masks is None else [DirectionMasks(*(cast(t) for t in (
        m.zoneout_h, m.zoneout_c, m.recurrent, m.weight_hh))) for m in masks]
    with torch.no_grad():
        truth = reference.lstm_layer(x, lengths, h0, c0, weights, options, masks, training=training)
        ours = triton_lstm_layer(cast(x), lengths, cast(h0), cast(c0), ws, options, ms, training=training)
        base_fn = reference.lstm_layer if dtype == torch.float32 else _half_precision_reference
        baseline = base_fn(cast(x), lengths, cast(h0), cast(c0), ws, options, ms, training=training)
    _check(ours, baseline, truth, dtype, ["output", "h_n", "c_n"])


GRIDS = {
    "per-step-w-as-a": Grid(hb=16, bb=16, persistent=False, barrier=False, k_chunk=128, w_as_a=True),
    "per-step-w-as-b": Grid(hb=16, bb=16, persistent=False, barrier=False, k_chunk=128, w_as_a=False),
    "persistent-w-as-b": None,  # chosen by choose_grid, with the other orientation
}


@pytest.mark.parametrize("grid", GRIDS, ids=GRIDS.keys())
def test_other_launch_modes(grid, monkeypatch):
    choose = triton_layer.choose_grid
    if GRIDS[grid] is None:
        monkeypatch.setattr(triton_layer, "choose_grid", lambda *a: dataclasses.replace(choose(*a), w_as_a=False))
    else:
        monkeypatch.setattr(triton_layer, "choose_grid", lambda *a: GRIDS[grid])
    _compare(KERNEL_OPTIONS["everything"], torch.bfloat16, directions=2, batch=24, steps=20, hidden=512,
             lengths=torch.randint(1, 21, (24,)))


def test_auto_picks_triton_on_cuda():
    opts = make_options()
    for dtype in DTYPES.values():
        assert select_engine("auto", DEV, dtype, opts) == "triton"


@pytest.mark.parametrize("form", ["padded", "batch_first", "unbatched", "packed"])
def test_module_matches_torch_float32(form):
    """The whole module on CUDA (auto picks the kernels): 2 layers, bidirectional, against
    torch.nn.LSTM in float64, float32 tolerance."""
    ours = fastlstm.LSTM(24, 48, num_layers=2, bidirectional=True, batch_first=form == "batch_first", device=DEV)
    theirs = torch.nn.LSTM(24, 48, num_layers=2, bidirectional=True, batch_first=form == "batch_first",
                           device=DEV, dtype=torch.float64)
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(30, 6, 24, device=DEV, dtype=torch.float64)
    lengths = [30, 7, 19, 1, 30, 12]
    results = []
    for model, dtype in ((ours, torch.float32), (theirs, torch.float64)):
        xx = x.to(dtype).requires_grad_()
        inp = {"padded": xx, "batch_first": xx.transpose(0, 1), "unbatched": xx[:, 0],
               "packed": pack_padded_sequence(xx, lengths, enforce_sorted=False)}[form]
        out, (h, c) = model(inp)
        out = out.data if form == "packed" else out
        (out.sum() + 2 * h.sum() + 3 * c.sum()).backward()
        results.append([out, h, c, xx.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_products_follow_torchs_cudnn_tf32_flag(tf32):
    """float32 products are IEEE with ``torch.backends.cudnn.allow_tf32`` off (error near float32's)
    and TF32 with it on, as torch.nn.LSTM's (error near TF32's 1e-3, and torch's own at that setting)."""
    options, weights, x, h0, c0, _, _ = _layer({}, 1, 16, 64, 512, 512)
    torch.backends.cudnn.allow_tf32 = tf32
    with torch.no_grad():
        truth = reference.lstm_layer(x, None, h0, c0, weights, options, None, training=False)[0]
        f32 = [DirectionWeights(*(None if t is None else t.float() for t in w)) for w in weights]
        ours = triton_lstm_layer(x.float(), None, h0.float(), c0.float(), f32, options, None, training=False)[0]
        theirs = torch.nn.LSTM(512, 512, device=DEV)
        theirs.load_state_dict(dict(weight_ih_l0=f32[0].weight_ih, weight_hh_l0=f32[0].weight_hh,
                                    bias_ih_l0=f32[0].bias_ih, bias_hh_l0=f32[0].bias_hh))
        torch_err = (theirs(x.float(), (h0.float(), c0.float()))[0].double() - truth).abs().max().item()
    err = (ours.double() - truth).abs().max().item()
    if tf32:
        assert 1e-5 < err < 2 * torch_err + 1e-4, (err, torch_err)
    else:
        assert err < 1e-4, err


@pytest.mark.parametrize("cfg", ["plain", "everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_projection(dtype, cfg):
    """proj_size in the kernels: m_t and d(m_t W_hr^T) exchanged between the programs each step."""
    steps = _steps(KERNEL_OPTIONS[cfg], 32)
    _compare(KERNEL_OPTIONS[cfg], dtype, directions=2, batch=64, steps=steps, hidden=512, proj=128,
             lengths=torch.randint(1, steps + 1, (64,)))


def test_module_with_projection_matches_torch():
    """fastlstm.LSTM with proj_size on CUDA (the kernels) against torch.nn.LSTM's own proj_size in
    float64: 2 layers, bidirectional, packed input."""
    ours = fastlstm.LSTM(24, 64, num_layers=2, bidirectional=True, proj_size=20, device=DEV)
    theirs = torch.nn.LSTM(24, 64, num_layers=2, bidirectional=True, proj_size=20, device=DEV, dtype=torch.float64)
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(30, 6, 24, device=DEV, dtype=torch.float64)
    lengths = [30, 7, 19, 1, 30, 12]
    results = []
    for model, dtype in ((ours, torch.float32), (theirs, torch.float64)):
        xx = x.to(dtype).requires_grad_()
        out, (h, c) = model(pack_padded_sequence(xx, lengths, enforce_sorted=False))
        (out.data.sum() + 2 * h.sum() + 3 * c.sum()).backward()
        results.append([out.data, h, c, xx.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
