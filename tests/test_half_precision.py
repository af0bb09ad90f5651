"""bfloat16 and float16 modules, and float32 modules under ``torch.autocast("cpu")``, on the CPU
engine (which computes their time loop in float32): outputs, states and every gradient within twice
the error of a trusted computation in the same dtype (torch.nn.LSTM where torch has the option, else
fastlstm's reference engine), against torch.nn.LSTM in float64 (fastlstm.testing's rule)."""

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastlstm
from fastlstm.engines import select_engine
from fastlstm.engines.cpu import gemm
from fastlstm.engines.cpu import threads as cpu_threads
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


@pytest.fixture(params=["native", "widened"])
def projection(request, monkeypatch):
    """Each way of computing a half-precision input projection (engines/cpu/gemm.py), forced on
    whatever this machine would choose: torch's GEMM in the half precision (gates rounded to it), or
    float32 copies. Torch runs both anywhere; the rule picks one by the CPU's instructions."""
    monkeypatch.setattr(gemm, "NATIVE_HALF", {d: request.param == "native" for d in gemm.NATIVE_HALF})
    return request.param


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
def test_half_module_against_torch(arch, dtype, projection):
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
def test_half_variants_against_the_reference_engine(options, dtype, projection):
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
def test_autocast_training_step_against_torch_in_that_dtype(dtype, projection):
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


def _packed(x, lengths):
    """``x`` packed by ``lengths`` (outside autocast: packing is not an op autocast takes), or ``x``."""
    return x if lengths is None else pack_padded_sequence(x, lengths)


def _lstm_outputs(module, x, state):
    """``(output, h_n, c_n)``; the output's data for a packed input."""
    y, (h, c) = module(x, state)
    return (y.data if isinstance(y, PackedSequence) else y), h, c


@pytest.mark.parametrize("autocast", HALF, ids=["autocast-bf16", "autocast-fp16"])
@pytest.mark.parametrize("form", ["plain", "projection", "packed", "packed-equal-lengths"])
@pytest.mark.parametrize("states", [None, torch.float32, torch.bfloat16],
                         ids=["no-state", "states-fp32", "states-bf16"])
def test_an_lstm_under_cpu_autocast_returns_torchs_dtypes(states, form, autocast):
    """torch.nn.LSTM under CPU autocast takes one of two paths (ATen's RNN.cpp): oneDNN's (unpacked, or
    packed with every sequence of one length, which torch runs padded; no projection; an input dtype
    oneDNN takes on this CPU), where autocast casts every input and output
    to its dtype, or ATen's loop, where only the products are cast and the pointwise math promotes
    them with the cell state (c_n, and h_n and the output without a projection, in promote(autocast
    dtype, c's dtype)). An input and states of different dtypes are taken either way. fastlstm's
    outputs have torch's dtypes for every weights and input dtype, and errors within twice torch's
    against float64. (Where oneDNN refuses a dtype on this CPU, torch raises under autocast: there
    its module in the autocast dtype stands in, which is what the oneDNN path computes.)"""
    proj = 3 if form == "projection" else 0
    lengths = {"packed": torch.tensor([T, 7, 4, 2]), "packed-equal-lengths": torch.tensor([T] * B)}.get(form)
    for weights, x_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                             (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        torch.manual_seed(0)
        theirs = torch.nn.LSTM(I, H, proj_size=proj).to(weights)
        ours = fastlstm.LSTM.from_torch(theirs)
        oracle = torch.nn.LSTM(I, H, proj_size=proj, dtype=torch.float64)
        oracle.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
        g = torch.Generator().manual_seed(4)
        x = torch.randn(T, B, I, generator=g).to(x_dtype)
        state = None if states is None else (torch.randn(1, B, proj or H, generator=g).to(states),
                                             torch.randn(1, B, H, generator=g).to(states))
        truth = _lstm_outputs(oracle, _packed(x.double(), lengths), state and tuple(t.double() for t in state))
        inputs = _packed(x, lengths)
        with torch.autocast("cpu", dtype=autocast):
            mine = _lstm_outputs(ours, inputs, state)
            try:
                base = _lstm_outputs(theirs, inputs, state)
            except RuntimeError as refused:  # (oneDNN's "could not create a primitive descriptor")
                assert form in ("plain", "packed-equal-lengths"), refused
                base = None
        if base is None:
            converted = copy.deepcopy(theirs).to(autocast)
            base = _lstm_outputs(converted, _packed(x.to(autocast), lengths),
                                 state and tuple(t.to(autocast) for t in state))
        for name, a, b, t in zip(("output", "h_n", "c_n"), mine, base, truth):
            assert a.dtype == b.dtype, f"{name} ({weights}, input {x_dtype}): {a.dtype}, torch's {b.dtype}"
            assert_within_twice(a, b, t, name=name, dtype=autocast)


# -- the CPU engine's storage in half precision (engines/cpu/layer.py) ----------------------------------

from fastlstm.engines.cpu import kernels  # noqa: E402

INSTRUCTION_SETS = kernels.module().instruction_sets()


def _same_bits(ours, torchs, dtype):
    """Bit for bit, NaNs compared as NaNs (their payloads aside)."""
    nan = torchs.isnan()
    assert torch.equal(ours.isnan(), nan)
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    mismatch = (ours[~nan].view(int_type) != torchs[~nan].view(int_type)).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.numel()} values differ, first at {torchs[~nan][mismatch[0]]}"


def _narrowing_inputs(dtype):
    """Random float32 bit patterns (every class: zeros, subnormals, normals, infinities, NaNs), the
    largest finite values, and every midpoint between neighbouring ``dtype`` values with its two
    float32 neighbours: where rounding to nearest even decides."""
    g = torch.Generator().manual_seed(3)
    random_bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    values = values[values.isfinite()].sort().values.unique()
    mid = (values[:-1].double() + values[1:].double()) / 2  # exact in float32 (a half's significand is short)
    mid_bits = mid.float().view(torch.int32)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 1e-45, 65504.0,
                             65519.99, 65520.0, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8])
    bits = torch.cat([random_bits, mid_bits - 1, mid_bits, mid_bits + 1, specials.view(torch.int32)])
    return bits.view(torch.float32)


@pytest.mark.parametrize("instruction_set", INSTRUCTION_SETS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_kernel_conversions_round_as_torch(dtype, instruction_set):
    """The kernels' conversions (outputs, output gradients, saved gates) against torch's, bit for bit:
    every half-precision value widened, and float32 values narrowed at every rounding boundary."""
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    widened = torch.empty(every.shape, dtype=torch.float32)
    source = _narrowing_inputs(dtype)
    narrowed = torch.empty(source.shape, dtype=dtype)
    with kernels.instruction_set(instruction_set):
        kernels.module().convert(kernels.HALF_CODES[dtype], False, every.data_ptr(), widened.data_ptr(), every.numel())
        kernels.module().convert(kernels.HALF_CODES[dtype], True, source.data_ptr(), narrowed.data_ptr(), source.numel())
    _same_bits(widened, every.float(), torch.float32)
    _same_bits(narrowed, source.to(dtype), dtype)


HALF_STORAGE_CASES = {
    "bidirectional-proj": (dict(bidirectional=True, proj_size=5), 1.0, 1.0),
    # outputs near zero: float16 subnormals (one layer: a second would take the first's rounded output)
    "tiny": (dict(bias=True), 1e-6, 1.0),
    # relu outputs beyond float16's range: rounded to infinity
    "relu-large": (dict(activations=("sigmoid", "relu", "relu"), batch_first=True), 1e4, 10.0),
}


# (bfloat16 under avx512_bf16 multiplies bfloat16 operands: test_bfloat16_products below)
FLOAT32_LOOPS = [(d, isa) for d in HALF for isa in INSTRUCTION_SETS if (d, isa) != (torch.bfloat16, "avx512_bf16")]


@pytest.mark.parametrize("dtype,instruction_set", FLOAT32_LOOPS,
                         ids=[f"{str(d)[6:]}-{isa}" for d, isa in FLOAT32_LOOPS])
@pytest.mark.parametrize("case", HALF_STORAGE_CASES.values(), ids=HALF_STORAGE_CASES.keys())
def test_half_outputs_are_the_float32_outputs_rounded(case, dtype, instruction_set, monkeypatch):
    """A half-precision call computes in float32 and writes its output rows in ``dtype`` itself: they
    equal, bit for bit, the float32 module's outputs (same weights and input) narrowed by torch. (With
    the input projection in float32: a native half-precision one rounds the gates to ``dtype`` first,
    which the tests above bound by the 2x rule.)"""
    monkeypatch.setattr(gemm, "NATIVE_HALF", {d: False for d in gemm.NATIVE_HALF})
    arch, scale, weight_scale = case
    torch.manual_seed(0)
    half_module = fastlstm.LSTM(I, H, **arch, backend="cpu", dtype=dtype)
    with torch.no_grad():
        for name, p in half_module.named_parameters():
            p.mul_(weight_scale if name.startswith("weight_ih") else 0.0 if scale < 1 and name.startswith("bias") else 1)
    wide_module = fastlstm.LSTM(I, H, **arch, backend="cpu")
    wide_module.load_state_dict({k: v.float() for k, v in half_module.state_dict().items()})
    x = (_inputs(arch.get("batch_first", False)) * scale).to(dtype)
    with kernels.instruction_set(instruction_set):
        for grad in (False, True):  # (inference keeps one step's gates in float32; training saves them in dtype)
            with torch.set_grad_enabled(grad):
                y, (h, c) = half_module(x.clone().requires_grad_(grad))
                y32, (h32, c32) = wide_module(x.float())
            for ours, wide in ((y, y32), (h, h32), (c, c32)):
                assert ours.dtype == dtype
                _same_bits(ours.detach(), wide.detach().to(dtype), dtype)
    if scale < 1 and dtype == torch.float16:
        assert ((y != 0) & (y.abs() < 6.1e-5)).any()  # (the case reaches the subnormals)
    if scale > 1 and dtype == torch.float16:
        assert y.isinf().any()


def _without_bfloat16_products() -> bool:
    """On a CPU without AVX512-BF16: asserts that the kernels do not offer the set, and says so."""
    if "avx512_bf16" in INSTRUCTION_SETS:
        return False
    assert not kernels.module().bfloat16_products()
    with pytest.raises(ValueError, match="avx512_bf16"):
        kernels.module().set_instruction_set("avx512_bf16")
    return True


BF16_PRODUCT_CASES = {  # (batch, hidden, arch, rows per thread at least: the engine sees 2 threads)
    # one thread: 13 rows, a block of 8, a block of 4 and a single row; 4H = 160 columns: 8 panels at once, then 2
    "rows-and-blocks": (13, 40, dict(num_layers=2), 1 << 30),
    # 2 threads of 6 rows each (a block of 4 and two single rows)
    "rows-of-six": (12, 40, dict(), 4),
    # 2 threads of 8 rows each; an odd projection (K = 5, padded to a pair) in both directions
    "odd-reduction": (16, 24, dict(bidirectional=True, proj_size=5), 8),
    # 8 rows on 2 threads: a column team (each member its panels), with recurrent dropout in training
    "column-team": (8, 64, dict(recurrent_dropout=0.3), 1 << 30),
    # an output one wide (H = 1; a projection of 1): W_hh [4H, 1] has strides (1, 1)
    "hidden-of-one": (8, 1, dict(), 4),
    "projection-of-one": (8, 24, dict(proj_size=1), 4),
}


@pytest.mark.parametrize("case", BF16_PRODUCT_CASES.values(), ids=BF16_PRODUCT_CASES.keys())
def test_bfloat16_products(case, monkeypatch):
    """Where the CPU multiplies bfloat16 pairs (AVX512-BF16), a bfloat16 layer's recurrent products
    (forward h W_hh^T, backward dgates W_hh) take bfloat16 operands (as torch's bfloat16 LSTM does)
    and accumulate in float32: outputs,
    states and every gradient within the 2x rule of torch.nn.LSTM in bfloat16, against float64, and
    the forced lower set (float32 products) agrees by the same rule. A CPU without the instruction
    must not offer the set."""
    if _without_bfloat16_products():
        return
    batch, hidden, arch, min_rows = case
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for least in ("MIN_ROWS_PER_THREAD", "MIN_ROWS_PER_THREAD_AVX512"):
        monkeypatch.setattr(cpu_threads, least, min_rows)
    torch.manual_seed(0)
    options = {k: v for k, v in arch.items() if k != "recurrent_dropout"}
    theirs = torch.nn.LSTM(I, hidden, **options, dtype=torch.float64)
    ours = fastlstm.LSTM(I, hidden, **arch, backend="cpu", dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, batch, I, generator=g, dtype=torch.float64)
    if "recurrent_dropout" in arch:  # (torch has no such option: the reference engine, same masks)
        reference = fastlstm.LSTM(I, hidden, **arch, backend="reference", dtype=torch.float64)
        reference.load_state_dict(ours.state_dict())
        theirs = reference
    runs = {}
    for name, module, dtype, isa in (("truth", theirs, torch.float64, None), ("base", theirs, torch.bfloat16, None),
                                     ("products", ours, torch.bfloat16, "avx512_bf16"),
                                     ("float32", ours, torch.bfloat16, "avx512")):
        torch.manual_seed(5)  # (the same recurrent dropout masks in every run)
        with kernels.instruction_set(isa or kernels.module().instruction_set()):
            runs[name], cot = _run(module, x, dtype, runs.get("cot"))
        runs["cot"] = cot
        module.double()
    assert not torch.equal(runs["products"]["output"], runs["float32"]["output"])  # (two different products)
    for name in ("products", "float32"):
        _check(runs[name], runs["base"], runs["truth"], torch.bfloat16)


def test_bfloat16_products_on_packed_sequences():
    """The bfloat16 products on a PackedSequence (each step's rows a shrinking prefix, both
    directions, two layers) against torch.nn.LSTM's packed path in bfloat16 and float64."""
    if _without_bfloat16_products():
        return
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(I, 24, num_layers=2, bidirectional=True, dtype=torch.float64)
    theirs_half = copy.deepcopy(theirs)
    ours = fastlstm.LSTM.from_torch(theirs, backend="cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 13, I, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 13, (13,), generator=g)
    lengths[0] = 12

    def run(module, dtype):
        module = module.to(dtype)
        xs = x.to(dtype).requires_grad_()
        y, (h, c) = module(pack_padded_sequence(xs, lengths, enforce_sorted=False))
        y = pad_packed_sequence(y)[0]
        loss = (y.double() * 1.3).sum() + (h.double() ** 2).sum() + c.double().sum()
        return [y, h, c, *torch.autograd.grad(loss, [xs, *module.parameters()])]

    truth, base, mine = run(theirs, torch.float64), run(theirs_half, torch.bfloat16), run(ours, torch.bfloat16)
    assert mine[0].dtype == torch.bfloat16
    for k, (a, b, t) in enumerate(zip(mine, base, truth)):
        assert_within_twice(a, b, t, name=f"result {k}", dtype=torch.bfloat16)


@pytest.mark.parametrize("autocast", HALF, ids=["autocast-bf16", "autocast-fp16"])
@pytest.mark.parametrize("weights", [torch.float32, *HALF], ids=["w-fp32", "w-bf16", "w-fp16"])
@pytest.mark.parametrize("states", [torch.float32, *HALF], ids=["x-and-states-fp32", "x-and-states-bf16",
                                                                  "x-and-states-fp16"])
def test_a_cell_under_cpu_autocast_returns_torchs_dtypes(states, weights, autocast):
    """torch.nn.LSTMCell under CPU autocast: the cell is on none of the CPU's autocast lists, but its
    products are (they run in the autocast dtype) and its pointwise math promotes them with the cell
    state, so h and c come back in promote(autocast dtype, c's dtype) (float32 from float32 states;
    float32 from bfloat16 states under float16 autocast). fastlstm's cell runs in that dtype: the
    same dtypes as torch's, and errors within twice torch's against float64 (with and without a state)."""
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(I, H).to(weights)
    ours = fastlstm.LSTMCell(I, H, dtype=weights)
    ours.load_state_dict(theirs.state_dict())
    oracle = torch.nn.LSTMCell(I, H, dtype=torch.float64)
    oracle.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    g = torch.Generator().manual_seed(4)
    x, h, c = (torch.randn(B, n, generator=g).to(states) for n in (I, H, H))
    for x_in, state in ((x, (h, c)), (x, None), (x.to(autocast), (h, c))):  # (the input's dtype does not matter)
        truth = oracle(x_in.double(), None if state is None else tuple(t.double() for t in state))
        with torch.autocast("cpu", dtype=autocast):
            base = theirs(x_in, state)
            mine = ours(x_in, state)
        for name, a, b, t in zip(("h", "c"), mine, base, truth):
            assert a.dtype == b.dtype, f"{name}: {a.dtype}, torch's {b.dtype}"
            assert_within_twice(a, b, t, name=name, dtype=autocast)


@pytest.mark.parametrize("arch", [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=3)],
                         ids=["plain", "L2-bi", "proj"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_float32_cell_state_under_half_precision_stays_float32(dtype, arch, backend):
    """A half-precision LSTM given a float32 ``c_0`` reads it as it is and returns ``c_n`` (and c_0's
    gradient) in float32, ``y`` and ``h_n`` in the input's dtype, as torch's oneDNN LSTM does for a
    bfloat16 input (its loop fails at the second step): within 2x torch's own half-precision error
    (torch run with c_0 rounded to the input's dtype) of float64."""
    exact = torch.nn.LSTM(6, 5, dtype=torch.float64, **arch)
    theirs = torch.nn.LSTM(6, 5, dtype=dtype, **arch)
    ours = fastlstm.LSTM(6, 5, dtype=dtype, backend=backend, **arch)
    theirs.load_state_dict(exact.state_dict())
    ours.load_state_dict(exact.state_dict())
    exact.load_state_dict(ours.state_dict())  # (the half-precision weights, exactly)
    g = torch.Generator().manual_seed(0)
    layers = exact.num_layers * (2 if exact.bidirectional else 1)
    x = torch.randn(7, 3, 6, generator=g).to(dtype)
    h0 = torch.randn(layers, 3, exact.proj_size or 5, generator=g).to(dtype)
    c0 = torch.randn(layers, 3, 5, generator=g).requires_grad_()
    y, (h, c) = ours(x, (h0, c0))
    assert (y.dtype, h.dtype, c.dtype) == (dtype, dtype, torch.float32)
    (c.sum() + y.float().sum()).backward()
    assert c0.grad.dtype == torch.float32
    truth = exact(x.double(), (h0.double(), c0.detach().double()))
    torchs = theirs(x, (h0, c0.detach().to(dtype)))
    for mine, true, other in zip((y, h, c), (truth[0], *truth[1]), (torchs[0], *torchs[1])):
        err_ours = (mine.detach().double() - true).abs().max().item()
        err_torch = (other.detach().double() - true).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-3, (err_ours, err_torch)
