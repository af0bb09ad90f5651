"""bfloat16 and float16 modules, and float32 modules under ``torch.autocast("cpu")``, on the CPU
engine (which computes their time loop in float32): outputs, states and every gradient within twice
the error of a trusted computation in the same dtype (torch.nn.LSTM where torch has the option, else
fastlstm's reference engine), against torch.nn.LSTM in float64 (fastlstm.testing's rule)."""

import pytest
import torch

import fastlstm
from fastlstm.engines import select_engine
from fastlstm.testing import assert_within_twice

T, B, I, H = 9, 4, 6, 8
HALF = [torch.bfloat16, torch.float16]
TORCH_ARCHS = {
    "2-layer": dict(num_layers=2),
    "bidirectional-proj": dict(bidirectional=True, proj_size=5),
    "no-bias-batch-first": dict(bias=False, batch_first=True),
}
VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "peephole-clip-cell_clip": dict(peephole=True, clip=1.0, cell_clip=0.8),
    "zoneout-eval": dict(zoneout=(0.2, 0.3)),
    "activations": dict(activations=("hardsigmoid", "softsign", "relu"), bidirectional=True),
}


def _inputs(batch_first: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    return x.transpose(0, 1).contiguous() if batch_first else x


def _run(module, x, dtype, cotangents=None):
    """Outputs, states and the gradients of x and every parameter, for a weighted sum of outputs."""
    module = module.to(dtype)
    x = x.detach().to(dtype).requires_grad_()
    y, (h, c) = module(x)
    outs = [y, h, c]
    if cotangents is None:
        g = torch.Generator().manual_seed(2)
        cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    names = ["output", "h_n", "c_n", "d input", *(f"d {n}" for n, _ in module.named_parameters())]
    return dict(zip(names, [*outs, *grads])), cotangents


def _check(ours, base, truth, dtype):
    assert ours.keys() == truth.keys()
    for name in truth:
        assert ours[name].dtype == dtype, f"{name}: {ours[name].dtype}"
        assert_within_twice(ours[name], base[name], truth[name], name=name, dtype=dtype)


def test_auto_picks_the_cpu_engine_for_half_precision():
    for dtype in HALF:
        assert select_engine("auto", torch.device("cpu"), dtype, None) == "cpu"


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", TORCH_ARCHS.values(), ids=TORCH_ARCHS.keys())
def test_half_module_against_torch(arch, dtype):
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(I, H, **arch, dtype=torch.float64)
    ours = fastlstm.LSTM.from_torch(theirs, backend="cpu")
    x = _inputs(arch.get("batch_first", False))
    truth, cot = _run(theirs, x, torch.float64)
    theirs_half = torch.nn.LSTM(I, H, **arch, dtype=torch.float64)
    theirs_half.load_state_dict(theirs.state_dict())
    base, _ = _run(theirs_half, x, dtype, cot)
    mine, _ = _run(ours, x, dtype, cot)
    _check(mine, base, truth, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_half_variants_against_the_reference_engine(options, dtype):
    torch.manual_seed(0)
    make = lambda backend: fastlstm.LSTM(I, H, **options, backend=backend, dtype=torch.float64).eval()  # noqa: E731
    ours, reference = make("cpu"), make("reference")
    reference.load_state_dict(ours.state_dict())
    x = _inputs(False)
    truth, cot = _run(reference, x, torch.float64)
    base, _ = _run(reference, x, dtype, cot)
    mine, _ = _run(ours, x, dtype, cot)
    _check(mine, base, truth, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_autocast_training_step_against_torch_in_that_dtype(dtype):
    """Under autocast the module's float32 weights and input are cast to ``dtype`` (what torch's
    autocast does for torch.nn.LSTM, whose oneDNN primitive this AVX2 machine refuses under autocast):
    outputs in ``dtype``, gradients of the float32 parameters in float32."""
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(I, H, num_layers=2, dtype=torch.float64)
    ours = fastlstm.LSTM.from_torch(theirs).float()
    x = _inputs(False)
    truth, cot = _run(theirs, x, torch.float64)
    theirs_half = torch.nn.LSTM(I, H, num_layers=2, dtype=torch.float64)
    theirs_half.load_state_dict(theirs.state_dict())
    base, _ = _run(theirs_half, x, dtype, cot)
    x32 = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y, (h, c) = ours(x32)
    assert y.dtype == h.dtype == c.dtype == dtype
    loss = sum((o.float() * w.float()).sum() for o, w in zip((y, h, c), cot))
    grads = torch.autograd.grad(loss, [x32, *ours.parameters()])
    assert all(g.dtype == torch.float32 for g in grads)
    for name, value in zip(truth, [y, h, c, *grads]):
        # the float32 gradients carry the rounding of the half-precision forward: bounded like it
        assert_within_twice(value, base[name], truth[name], name=name, dtype=dtype)
