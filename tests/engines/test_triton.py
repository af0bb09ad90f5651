"""The Triton engine against the reference engine: outputs, final states and every gradient.

Here the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
conftest), at tiny shapes. Interpreted programs run one after another, so the persistent kernels
run in their one-program mode (one program per barrier group, the barrier still executed); the
per-step mode, where a launch boundary is the barrier, runs several programs per group. The same
kernels run compiled, at real shapes, in ``gpu_tests/``.
"""

import pytest
import torch

from fastlstm import engines, reference
from fastlstm.engines.triton import grid as triton_grid
from fastlstm.engines.triton import helpers
from fastlstm.engines.triton import launch as triton_launch
from fastlstm.engines.triton import layer as triton_layer
from fastlstm.engines.triton.grid import Grid, hidden_pad
from fastlstm.masks import sample_direction_masks
from fastlstm.testing import assert_within_twice
from fastlstm.weights import DirectionWeights

from tests.engines.cases import (ARCHS, LENGTHS, OPTIONS, cast, compare, compare_float32, compare_packed, layer_inputs,
                                 on, run)


lstm_layer = on("triton")


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels fill starts as NaN (int8 buffers as -1): an element a kernel never
    wrote shows up in the comparisons."""
    def poisoned(like, *shape, dtype=None):
        t = like.new_empty(shape, dtype=dtype)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(triton_layer, "empty", poisoned)


def test_triton_is_installed_and_interpreting():
    """The test extras install triton; without it these tests would have nothing to run."""
    assert engines.supports("triton", torch.device("cpu"), torch.float64, explicit=True)
    assert triton_grid.INTERPRET


def _one_program(kind, batch, hidden, directions, dtype, device, *, w_as_a=True):
    """One program per group, the weight slice loaded once (the whole reduction in one chunk)."""
    h_pad = hidden_pad(hidden)
    return Grid(hb=h_pad, bb=max(16, triton_grid.pow2(batch)), persistent=True, barrier=True,
                k_chunk=h_pad if kind == "forward" else 4 * h_pad, w_as_a=w_as_a)


def _per_step(kind, batch, hidden, directions, dtype, device, *, w_as_a=False):
    """Several programs per group, one launch per step, the weights streamed in chunks of 16."""
    return Grid(hb=4 if kind == "forward" else 16, bb=16, persistent=False, barrier=False, k_chunk=16,
                w_as_a=w_as_a)


# Both operand orientations of the recurrent product in the persistent mode, and the per-step mode
# (several programs per group; its other orientation runs in test_several_programs_per_group_...).
GRIDS = {
    "persistent-w-as-a": _one_program,
    "persistent-w-as-b": lambda *a: _one_program(*a, w_as_a=False),
    "per-step-w-as-b": _per_step,
}


@pytest.fixture(params=GRIDS)
def grid(request, monkeypatch):
    monkeypatch.setattr(triton_layer, "choose_grid", GRIDS[request.param])
    return request.param


KERNEL_OPTIONS = dict(OPTIONS)  # every option runs in the kernels, and the projection
# for the slow several-programs tests, where layer norm's exchanges have their own
KERNEL_OPTIONS["everything-but-layer-norm"] = {k: v for k, v in OPTIONS["everything"].items() if k != "layer_norm"}
KERNEL_ARCHS = dict(ARCHS, bi=dict(directions=2, proj=0, bias=True))
FLOAT64_ARCHS = dict(ARCHS)  # uni, bi-proj, bi-nobias, uni-proj-nobias
STOCHASTIC = ("zoneout", "recurrent_dropout", "weight_drop")


def _training(cfg):
    return any(k in cfg for k in STOCHASTIC)


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("arch", FLOAT64_ARCHS.values(), ids=FLOAT64_ARCHS.keys())
@pytest.mark.parametrize("cfg", OPTIONS.values(), ids=OPTIONS.keys())
def test_kernels_match_reference_float64(cfg, arch, lengths, monkeypatch):
    monkeypatch.setattr(triton_layer, "choose_grid", _one_program)
    compare(lstm_layer, arch, cfg, lengths=lengths, training=_training(cfg), dtype=torch.float64,
            tol=1e-10)


@pytest.mark.parametrize("w_as_a", [False, True], ids=["w-as-b", "w-as-a"])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("cfg", ["plain", "coupled", "everything-but-layer-norm"])
def test_several_programs_per_group_match_reference(cfg, lengths, w_as_a, monkeypatch):
    """Per-step mode with H = 20, B = 18: 5 programs of 4 units in the forward, 2 of 16 in the
    backward, 2 batch blocks, both directions: every exchange between programs goes through memory;
    the weights are streamed in chunks of 16 (2 in the forward's reduction, 8 in the backward's)."""
    monkeypatch.setattr(triton_layer, "choose_grid", lambda *a: _per_step(*a, w_as_a=w_as_a))
    # sorted by length, the second batch block holds the two shortest: it stops after 1 step
    lengths = None if lengths is None else torch.tensor([3, 5, 1, 4, 5, 2, 5, 3, 1, 2, 4, 5, 5, 1, 3, 2, 4, 5])
    cfg = KERNEL_OPTIONS[cfg]
    compare(lstm_layer, KERNEL_ARCHS["bi"], cfg, lengths=lengths, training=_training(cfg),
            dtype=torch.float64, tol=1e-10, steps=5, batch=18, hidden=20)


@pytest.mark.parametrize("lengths", [[3, 2, 1, 3], [4, 1, 2, 2]], ids=["longest-3", "longest-4"])
@pytest.mark.parametrize("cfg", ["plain", "everything"])
def test_steps_past_every_sequence_end_are_skipped(cfg, lengths, grid):
    """T = 6 but no sequence is longer than 3 or 4: the forward direction stops early, the reverse
    one starts late, and the final h sits in either slot of the ping-pong buffer (odd, even)."""
    cfg = KERNEL_OPTIONS[cfg]
    compare(lstm_layer, KERNEL_ARCHS["bi"], cfg, lengths=torch.tensor(lengths), training=_training(cfg),
            dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", ["zoneout", "everything"])
def test_eval_and_train_modes(cfg, training, grid):
    """Eval mode uses the options' expectations (zoneout as constants), training the drawn masks."""
    compare(lstm_layer, KERNEL_ARCHS["bi"], KERNEL_OPTIONS[cfg], lengths=LENGTHS["unequal"],
            training=training, dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("cfg", ["plain", "activations", "peephole", "clip", "zoneout", "everything"])
def test_float32_error_is_at_most_twice_the_references(cfg, grid):
    """float32 within twice the float32 reference's error (tests/engines/cases.compare_float32)."""
    cfg = KERNEL_OPTIONS[cfg]
    compare_float32(lstm_layer, KERNEL_ARCHS["bi"], cfg, training=_training(cfg),
                    lengths=LENGTHS["unequal"])


def _torch_twin(weights, dtype):
    """torch.nn.LSTM holding ``weights`` (one layer, plain options), in ``dtype``."""
    twin = torch.nn.LSTM(weights[0].weight_ih.shape[1], weights[0].weight_hh.shape[1],
                         bidirectional=len(weights) == 2, dtype=torch.float64)
    with torch.no_grad():
        for d, w in enumerate(weights):
            for field in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(twin, f"{field}_l0{'_reverse' if d else ''}").copy_(getattr(w, field))
    return twin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_error_is_at_most_twice_torchs(dtype, grid):
    """bfloat16 / float16, cell state in float32: our error against the float64 reference is at most
    twice torch.nn.LSTM's own at that precision, plus a few ulps of the dtype, for the output, the
    final states and every gradient (flash-attention's rule, fastlstm.testing)."""
    options, weights, x, h0, c0, _ = layer_inputs(KERNEL_ARCHS["bi"], {}, torch.float64, hidden=12, batch=5)
    truth = run(reference.lstm_layer, x, None, h0, c0, weights, options, None, False)
    half = lambda ts: [cast(t, dtype) for t in ts]  # noqa: E731
    ours = run(lstm_layer, *half([x]), None, *half([h0, c0]), [DirectionWeights(*half(w)) for w in weights],
               options, None, False)

    twin = _torch_twin(weights, dtype)
    xt, h0t, c0t = half([x, h0, c0])
    y, (h, c) = twin(xt, (h0t, c0t))
    g = torch.Generator().manual_seed(9)  # the cotangents of `run`
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)).sum() for t in (y, h, c))
    params = [p for d in range(2) for p in (getattr(twin, f"{f}_l0{'_reverse' if d else ''}")
                                            for f in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))]
    theirs = [y, h, c, *torch.autograd.grad(loss, [xt, h0t, c0t, *params])]

    names = ["output", "h_n", "c_n", "x", "h0", "c0"] + [f"dir{d}.{f}" for d in range(2) for f in
                                                          ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    for name, a, b, t in zip(names, ours, theirs, truth):
        assert a.dtype == dtype and not a.isnan().any(), name
        assert_within_twice(a, b, t, name=name)


@pytest.mark.parametrize("cfg", ["plain", "everything"])
def test_inference_path_matches_reference(cfg, grid):
    """Without autograd the forward saves nothing: same outputs."""
    cfg = KERNEL_OPTIONS[cfg]
    training = _training(cfg)
    options, weights, x, h0, c0, masks = layer_inputs(KERNEL_ARCHS["bi"], cfg, torch.float64, training=training)
    with torch.no_grad():
        ours = lstm_layer(x, LENGTHS["unequal"], h0, c0, weights, options, masks, training=training)
        theirs = reference.lstm_layer(x, LENGTHS["unequal"], h0, c0, weights, options, masks, training=training)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", ["plain", "everything"])
def test_projection_across_programs(cfg, monkeypatch):
    """Per-step mode, H = 20, proj_size = 18, B = 17 (2 batch blocks, the second stops early): 5
    forward programs of 4 cell units, of which 2 own 16 units of h (the second 2 of them); 2 backward
    programs of 16 cell units and 16 units of h. m_t and d(m_t W_hr^T) are exchanged between the
    programs every step; with layer norm ("everything") a step is four launches."""
    monkeypatch.setattr(triton_layer, "choose_grid", _per_step)
    arch = dict(directions=2, proj=18, bias=True)
    lengths = torch.tensor([3, 4, 1, 4, 4, 2, 4, 3, 1, 2, 4, 4, 4, 1, 3, 2, 1])
    cfg = KERNEL_OPTIONS[cfg]
    compare(lstm_layer, arch, cfg, lengths=lengths, training=_training(cfg), dtype=torch.float64,
            tol=1e-10, steps=4, batch=17, hidden=20)


def test_a_barrier_that_times_out_raises_instead_of_hanging(monkeypatch):
    """Two programs per group in a persistent launch cannot meet in the interpreter (it runs them one
    after the other), exactly like programs that are not co-resident on a GPU: with a short spin
    limit the barrier gives up and the call raises a clear error."""
    monkeypatch.setattr(helpers, "BARRIER_SPIN_LIMIT", helpers.tl.constexpr(50))
    monkeypatch.setattr(triton_layer, "choose_grid",
                        lambda kind, *a: Grid(hb=4 if kind == "forward" else 16, bb=16, persistent=True, barrier=True,
                                              k_chunk=16))
    monkeypatch.setattr(triton_launch, "VERIFIED", set())
    options, weights, x, h0, c0, _ = layer_inputs(KERNEL_ARCHS["uni"], {}, torch.float64, hidden=8, steps=2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="barrier timed out"):
        lstm_layer(x, None, h0, c0, weights, options, None, training=False)


def test_masks_in_eval_mode_are_refused():
    options, weights, x, h0, c0, _ = layer_inputs(KERNEL_ARCHS["uni"], {}, torch.float64)
    masks = [sample_direction_masks(options, steps=6, batch=4, hidden_size=5, h_out=5, device="cpu",
                                    dtype=torch.float64)]
    with pytest.raises(ValueError, match="masks are only used in training"):
        lstm_layer(x, None, h0, c0, weights, options, masks, training=False)


def test_auto_picks_triton_only_for_cuda_float_types():
    from fastlstm.engines import select_engine
    from fastlstm.options import make_options

    opts = make_options()
    assert engines.supports("triton", torch.device("cuda"), torch.bfloat16, opts)
    assert engines.supports("triton", torch.device("cuda"), torch.float32, opts)
    assert not engines.supports("triton", torch.device("cuda"), torch.float64, opts)
    assert not engines.supports("triton", torch.device("cpu"), torch.float32, opts)
    assert select_engine("auto", torch.device("cuda"), torch.float16, opts) == "triton"
    assert select_engine("auto", torch.device("cpu"), torch.float32, opts) == "cpu"


def test_a_persistent_grid_that_does_not_fit_falls_back_to_per_step(monkeypatch):
    """When a persistent program does not fit an SM, Triton raises OutOfResources at launch: the
    call then runs one launch per step instead, and remembers that for the configuration."""
    monkeypatch.setattr(triton_launch, "DOES_NOT_FIT", set())
    monkeypatch.setattr(triton_layer, "choose_grid", lambda *a: _one_program(*a))
    persistent_hb = hidden_pad(5)
    launches = []

    class TooBig:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, shape):
            def launch(*args, HB, **kwargs):
                launches.append((shape, HB))
                if HB == persistent_hb and kwargs["USE_BARRIER"]:
                    raise triton_launch.OutOfResources(300000, 232448, "shared memory")
                return self.kernel[shape](*args, HB=HB, **kwargs)
            return launch

    monkeypatch.setattr(triton_layer, "forward_kernel", TooBig(triton_layer.forward_kernel))
    monkeypatch.setattr(triton_layer, "backward_kernel", TooBig(triton_layer.backward_kernel))
    compare(lstm_layer, KERNEL_ARCHS["bi"], {}, lengths=LENGTHS["unequal"], training=False,
            dtype=torch.float64, tol=1e-10)
    assert {hb for _, hb in launches} == {persistent_hb, 4, 16}  # tried persistent, then per-step fwd and bwd
    assert len(triton_launch.DOES_NOT_FIT) == 2


PACKED_LENGTHS = {"sorted": [6, 5, 3, 1], "unsorted": [3, 6, 1, 4]}


@pytest.mark.parametrize("order", PACKED_LENGTHS)
@pytest.mark.parametrize("cfg", ["plain", "everything"])
def test_packed_rows_match_the_padded_reference(cfg, order, grid, monkeypatch):
    """A PackedSequence's rows go into the kernels as they are: outputs, final states and every
    gradient against the reference on the padded batch. Every per-token buffer the engine fills has
    one row per real token, none for padding."""
    token_rows = []
    poisoned = triton_layer.empty

    def recorded(like, *shape, dtype=None):
        token_rows.append(shape[0])
        return poisoned(like, *shape, dtype=dtype)

    monkeypatch.setattr(triton_layer, "empty", recorded)
    lengths = torch.tensor(PACKED_LENGTHS[order])
    n = compare_packed(lstm_layer, KERNEL_ARCHS["bi"], KERNEL_OPTIONS[cfg], lengths=lengths,
                       sorted_input=order == "sorted", tol=1e-10)
    per_token = [rows for rows in token_rows if rows != 2]  # the [2, D, B, H] ping-pong state aside
    assert per_token and all(rows == n for rows in per_token), (n, token_rows)


@pytest.mark.parametrize("cfg", ["plain", "everything-but-layer-norm"])
def test_packed_rows_with_several_programs_per_group(cfg, monkeypatch):
    """Per-step mode, H = 20, B = 18 (2 batch blocks, 5 forward / 2 backward programs per group): each
    step's rows start at their own offset, and rows past a sequence's end do not exist."""
    monkeypatch.setattr(triton_layer, "choose_grid", _per_step)
    lengths = torch.tensor([3, 5, 1, 4, 5, 2, 5, 3, 1, 2, 4, 5, 5, 1, 3, 2, 4, 5])
    compare_packed(lstm_layer, KERNEL_ARCHS["bi"], KERNEL_OPTIONS[cfg], lengths=lengths,
                   sorted_input=False, tol=1e-10, steps=5, batch=18, hidden=20)


@pytest.mark.parametrize("cfg", ["plain", "everything"])
def test_packed_rows_with_projection(cfg, grid):
    compare_packed(lstm_layer, ARCHS["bi-proj"], KERNEL_OPTIONS[cfg],
                   lengths=torch.tensor([3, 6, 1, 4]), sorted_input=False, tol=1e-10)


@pytest.mark.parametrize("form", ["full", "unequal", "packed"])
@pytest.mark.parametrize("cfg", ["layer_norm", "everything"])
def test_layer_norm_in_the_kernels(cfg, form, grid):
    """Layer norm, forward and backward, in the kernels: LN(x W_ih^T) with the input GEMM,
    LN(h W_hh^T) and LN(c_t) from every program's share of a row's moments (forward) and sums
    (backward), exchanged each step. Every output and gradient against the reference."""
    cfg = KERNEL_OPTIONS[cfg]
    if form == "packed":
        compare_packed(lstm_layer, KERNEL_ARCHS["bi"], cfg, lengths=LENGTHS["unequal"],
                       sorted_input=False, tol=1e-10)
    else:
        compare(lstm_layer, KERNEL_ARCHS["bi"], cfg, lengths=LENGTHS[form], training=_training(cfg),
                dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("cfg", ["everything"])
def test_layer_norm_statistics_combine_across_programs(cfg, monkeypatch):
    """Per-step mode, H = 21: 6 forward programs of 4 units (the last holds 1) and 2 backward ones
    of 16, 2 batch blocks, each step three launches (the phases): a row's statistics combine every
    program's share, forward and backward."""
    monkeypatch.setattr(triton_layer, "choose_grid", _per_step)
    lengths = torch.tensor([3, 5, 1, 4, 5, 2, 5, 3, 1, 2, 4, 5, 5, 1, 3, 2, 4, 5])
    cfg = KERNEL_OPTIONS[cfg]
    compare(lstm_layer, KERNEL_ARCHS["bi"], cfg, lengths=lengths, training=_training(cfg),
            dtype=torch.float64, tol=1e-10, steps=5, batch=18, hidden=21)


def test_layer_norm_inference_matches_reference(grid):
    """Without autograd (nothing saved): the same outputs."""
    options, weights, x, h0, c0, _ = layer_inputs(KERNEL_ARCHS["bi"], OPTIONS["layer_norm"], torch.float64)
    with torch.no_grad():
        ours = lstm_layer(x, LENGTHS["unequal"], h0, c0, weights, options, None, training=False)
        theirs = reference.lstm_layer(x, LENGTHS["unequal"], h0, c0, weights, options, None, training=False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
