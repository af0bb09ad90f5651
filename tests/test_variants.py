"""The options torch and ONNX do not define, each against an oracle fastlstm did not compute.

* torch-built oracles where torch can express the option: zoneout and recurrent dropout around
  ``torch.nn.LSTMCell``, DropConnect through ``torch.func.functional_call`` on ``torch.nn.LSTM``,
  inter-layer dropout between single-layer ``torch.nn.LSTM``s;
* the hand-written, sequence-at-a-time oracle of ``tests/oracles.py`` for layer norm, the clips,
  and every option combined with every architecture and input form;
* replayed masks for the random options, and the eval-mode expectation identities.
"""

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastlstm
from tests import oracles
from fastlstm.masks import DirectionMasks, LSTMMasks

F64 = torch.float64


def randomise(module, scale=0.6):
    """Move every parameter off its initial value so that gains, shifts and peepholes all matter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layer_norm" in name and "weight" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.uniform_(-scale, scale)
    return module


def grads_of(outputs, leaves, seed=5):
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=g)).sum() for t in outputs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(leaf) if gr is None else gr for gr, leaf in zip(grads, leaves)]


def assert_all_close(ours, theirs, names, tol=1e-10):
    for a, b, name in zip(ours, theirs, names):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def check_against_oracle(module, cfg, *, steps=5, batch=3, lengths=(4, 5, 2), training=False, masks=None, scale=1.0):
    """ours(packed x, hx) vs oracles.lstm: outputs, states and the gradients of x, h0, c0, every parameter."""
    module = module.train(training)
    d = 2 if module.bidirectional else 1
    h_out = module.proj_size or module.hidden_size
    x = (scale * torch.randn(steps, batch, module.input_size, dtype=F64)).requires_grad_()
    h0 = torch.randn(module.num_layers * d, batch, h_out, dtype=F64, requires_grad=True)
    c0 = torch.randn(module.num_layers * d, batch, module.hidden_size, dtype=F64, requires_grad=True)
    lengths = list(lengths)[:batch]
    lengths[0] = steps
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    y_packed, (h_n, c_n) = module(packed, (h0, c0), **({"masks": masks} if masks is not None else {}))
    y, _ = pad_packed_sequence(y_packed, total_length=steps)
    y_o, h_o, c_o = oracles.lstm(module, x, lengths, h0, c0, cfg, masks=masks, training=training)
    names = ["output", "h_n", "c_n"]
    assert_all_close((y, h_n, c_n), (y_o, h_o, c_o), names)
    params = dict(module.named_parameters())
    leaves = [x, h0, c0, *params.values()]
    assert_all_close(
        grads_of((y, h_n, c_n), leaves), grads_of((y_o, h_o, c_o), leaves), ["x", "h0", "c0", *params]
    )
    return y


ARCHS = {
    "uni": dict(num_layers=1),
    "bi": dict(num_layers=1, bidirectional=True),
    "proj": dict(num_layers=1, proj_size=3),
    "bi-proj-nobias": dict(num_layers=1, bidirectional=True, proj_size=3, bias=False),
    "2layer-bi": dict(num_layers=2, bidirectional=True),
}


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize(
    "cfg",
    [
        dict(layer_norm=True),
        dict(layer_norm=True, peephole=True, clip=1.5),
        dict(layer_norm=True, coupled_input_forget=True, activations=("hard_sigmoid", "softsign", "relu")),
    ],
    ids=["ln", "ln-peephole-clip", "ln-coupled-acts"],
)
def test_layer_norm_matches_hand_written_step(arch, cfg, backend):
    module = randomise(fastlstm.LSTM(4, 5, dtype=F64, **arch, **cfg, backend=backend))
    check_against_oracle(module, cfg)


def test_layer_norm_is_the_written_definition(backend):
    """One step by hand, with numbers: gates = LN(x W_ih^T) + LN(h W_hh^T) + b; h = o * tanh(LN(c))."""
    cell = randomise(fastlstm.LSTMCell(3, 2, layer_norm=True, dtype=F64, backend=backend))
    x, h, c = torch.randn(3, dtype=F64), torch.randn(2, dtype=F64), torch.randn(2, dtype=F64)

    def ln(v, gain, shift=0.0):
        mu = sum(v.tolist()) / len(v)
        var = sum((e - mu) ** 2 for e in v.tolist()) / len(v)
        return torch.tensor([(e - mu) / math.sqrt(var + 1e-5) for e in v.tolist()], dtype=F64) * gain + shift

    p = dict(cell.named_parameters())
    gates = ln(p["weight_ih"] @ x, p["layer_norm_ih_weight"]) + ln(p["weight_hh"] @ h, p["layer_norm_hh_weight"])
    gates = gates + p["bias_ih"] + p["bias_hh"]
    i, f, g, o = torch.sigmoid(gates[0:2]), torch.sigmoid(gates[2:4]), torch.tanh(gates[4:6]), torch.sigmoid(gates[6:8])
    c_new = f * c + i * g
    h_new = o * torch.tanh(ln(c_new, p["layer_norm_cell_weight"], p["layer_norm_cell_bias"]))
    h_ours, c_ours = cell(x, (h, c))
    torch.testing.assert_close(h_ours, h_new, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_ours, c_new, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", [ARCHS["uni"], ARCHS["bi"], ARCHS["bi-proj-nobias"]], ids=["uni", "bi", "bi-proj"])
def test_cell_clip_matches_oracle_and_binds(arch, backend):
    cfg = dict(cell_clip=0.2)
    module = randomise(fastlstm.LSTM(4, 5, dtype=F64, **arch, **cfg, backend=backend), scale=1.5)
    y = check_against_oracle(module, cfg, scale=2.0)
    unclipped = fastlstm.LSTM(4, 5, dtype=F64, **arch, backend=backend)
    unclipped.load_state_dict(module.state_dict())
    torch.manual_seed(0)
    x = 2.0 * torch.randn(5, 3, 4, dtype=F64)
    _, (_, c_free) = unclipped(x)
    _, (_, c_clipped) = module(x)
    assert c_free.abs().max() > 0.2, "inputs too small for the clip to bind"
    assert c_clipped.abs().max() <= 0.2 + 1e-15


@pytest.mark.parametrize("bidirectional", [False, True])
def test_proj_clip_matches_oracle_and_binds(bidirectional, backend):
    cfg = dict(proj_clip=0.1)
    module = randomise(fastlstm.LSTM(4, 5, proj_size=3, bidirectional=bidirectional, dtype=F64, **cfg, backend=backend), scale=1.5)
    y = check_against_oracle(module, cfg, scale=2.0)
    assert y.abs().max().item() == pytest.approx(0.1)


EVERYTHING = dict(
    activations=("hard_sigmoid", "tanh", "softsign"),
    peephole=True,
    clip=2.0,
    layer_norm=True,
    zoneout=(0.2, 0.3),
    recurrent_dropout=0.25,
    weight_drop=0.3,
    cell_clip=1.0,
)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("proj", [0, 3])
def test_every_option_at_once_two_layers_bidirectional(training, proj, backend):
    cfg = dict(EVERYTHING, **({"proj_clip": 0.5} if proj else {}))
    module = randomise(fastlstm.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=proj, dropout=0.4, dtype=F64, **cfg, backend=backend))
    masks = None
    if training:
        x_shape = torch.zeros(5, 3, 4, dtype=F64)
        masks = module.train().sample_masks(x_shape)
        assert masks.inter_layer[0] is not None
    check_against_oracle(module, cfg, training=training, masks=masks)


# --- zoneout ------------------------------------------------------------------------------------


def torch_cell_twin(lstm):
    """A torch.nn.LSTMCell holding layer 0 of a one-directional fastlstm.LSTM."""
    cell = torch.nn.LSTMCell(lstm.input_size, lstm.hidden_size, dtype=F64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(lstm, f"{name}_l0"))
    return cell


def test_zoneout_replays_masks_against_torch_cell(backend):
    lstm = fastlstm.LSTM(3, 4, zoneout=(0.3, 0.5), dtype=F64, backend=backend).train()
    x = torch.randn(6, 2, 3, dtype=F64, requires_grad=True)
    masks = lstm.sample_masks(x)
    keep_h, keep_c = masks.layers[0][0].zoneout_h, masks.layers[0][0].zoneout_c
    assert keep_h.shape == keep_c.shape == (6, 2, 4)
    y, (h_n, c_n) = lstm(x, masks=masks)

    cell = torch_cell_twin(lstm)
    h = c = torch.zeros(2, 4, dtype=F64)
    outs = []
    for t in range(6):
        h_fresh, c_fresh = cell(x[t], (h, c))
        h = keep_h[t] * h + (1 - keep_h[t]) * h_fresh
        c = keep_c[t] * c + (1 - keep_c[t]) * c_fresh
        outs.append(h)
    y_ref = torch.stack(outs)
    assert_all_close((y, h_n[0], c_n[0]), (y_ref, h, c), ["output", "h_n", "c_n"])
    assert_all_close(grads_of((y,), [x]), grads_of((y_ref,), [x]), ["x"])


def test_zoneout_eval_uses_the_expectation(backend):
    lstm = fastlstm.LSTM(3, 4, zoneout=(0.3, 0.5), dtype=F64, backend=backend).eval()
    x = torch.randn(6, 2, 3, dtype=F64)
    y, (h_n, c_n) = lstm(x)
    cell = torch_cell_twin(lstm)
    h = c = torch.zeros(2, 4, dtype=F64)
    for t in range(6):
        h_fresh, c_fresh = cell(x[t], (h, c))
        h, c = 0.3 * h + 0.7 * h_fresh, 0.5 * c + 0.5 * c_fresh
        torch.testing.assert_close(y[t], h, rtol=1e-12, atol=1e-12)
    # identity: eval == training with every keep mask replaced by its mean
    mean_masks = LSTMMasks(layers=[[DirectionMasks(zoneout_h=torch.full((6, 2, 4), 0.3, dtype=F64),
                                                   zoneout_c=torch.full((6, 2, 4), 0.5, dtype=F64))]])
    y_train, _ = lstm.train()(x, masks=mean_masks)
    torch.testing.assert_close(y_train, y, rtol=0, atol=0)


def test_zoneout_eval_is_the_expected_training_output_of_one_step(backend):
    """For one step h = m h0 + (1 - m) h~ is linear in m, so E[train] = eval exactly; Monte Carlo checks it."""
    lstm = fastlstm.LSTM(3, 8, zoneout=0.4, dtype=F64, backend=backend)
    x = torch.randn(1, 4, 3, dtype=F64)
    hx = (torch.randn(1, 4, 8, dtype=F64), torch.randn(1, 4, 8, dtype=F64))
    expected, _ = lstm.eval()(x, hx)
    lstm.train()
    n = 4000
    samples = torch.stack([lstm(x, hx)[0] for _ in range(n)])
    spread = samples.std(0)
    assert ((samples.mean(0) - expected).abs() <= 5 * spread / math.sqrt(n) + 1e-12).all()


# --- recurrent (variational) dropout ------------------------------------------------------------


def test_recurrent_dropout_replays_one_mask_per_sequence_against_torch_cell(backend):
    p = 0.4
    lstm = fastlstm.LSTM(3, 6, recurrent_dropout=p, dtype=F64, backend=backend).train()
    x = torch.randn(7, 3, 3, dtype=F64, requires_grad=True)
    hx = (torch.randn(1, 3, 6, dtype=F64), torch.randn(1, 3, 6, dtype=F64))
    masks = lstm.sample_masks(x, hx)
    mask = masks.layers[0][0].recurrent
    assert mask.shape == (3, 6)  # one mask per sequence, fixed over time
    assert set(mask.unique().tolist()) <= {0.0, 1 / (1 - p)}
    y, (h_n, c_n) = lstm(x, hx, masks=masks)
    cell = torch_cell_twin(lstm)
    h, c = hx[0][0], hx[1][0]
    outs = []
    for t in range(7):
        h, c = cell(x[t], (h * mask, c))
        outs.append(h)
    y_ref = torch.stack(outs)
    assert_all_close((y, h_n[0], c_n[0]), (y_ref, h, c), ["output", "h_n", "c_n"])
    assert_all_close(grads_of((y,), [x]), grads_of((y_ref,), [x]), ["x"])


def test_recurrent_dropout_and_weight_drop_are_identity_in_eval(backend):
    ours = fastlstm.LSTM(3, 6, num_layers=2, bidirectional=True, dropout=0.5, recurrent_dropout=0.5,
                         weight_drop=0.5, dtype=F64, backend=backend).eval()
    theirs = torch.nn.LSTM(3, 6, num_layers=2, bidirectional=True, dropout=0.5, dtype=F64).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64)
    for a, b in zip(ours(x)[0], theirs(x)[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # and training with all-ones masks (their mean) equals eval
    ones = LSTMMasks(
        layers=[[DirectionMasks(recurrent=torch.ones(2, 6, dtype=F64), weight_hh=torch.ones(24, 6, dtype=F64))] * 2] * 2,
        inter_layer=[torch.ones(5, 2, 12, dtype=F64)],
    )
    torch.testing.assert_close(ours.train()(x, masks=ones)[0], theirs(x)[0], rtol=1e-10, atol=1e-10)


# --- weight drop (DropConnect) ------------------------------------------------------------------


def test_weight_drop_matches_torch_lstm_with_masked_weight_and_keeps_the_parameter(backend):
    p = 0.5
    ours = fastlstm.LSTM(3, 5, bidirectional=True, weight_drop=p, dtype=F64, backend=backend).train()
    theirs = torch.nn.LSTM(3, 5, bidirectional=True, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    stored = {n: t.detach().clone() for n, t in ours.named_parameters()}
    x = torch.randn(6, 2, 3, dtype=F64, requires_grad=True)
    masks = ours.sample_masks(x)
    m_fwd, m_rev = masks.layers[0][0].weight_hh, masks.layers[0][1].weight_hh
    assert m_fwd.shape == (20, 5) and set(m_fwd.unique().tolist()) <= {0.0, 1 / (1 - p)}

    y, (h_n, c_n) = ours(x, masks=masks)
    w_fwd = theirs.weight_hh_l0.detach().clone().requires_grad_()
    w_rev = theirs.weight_hh_l0_reverse.detach().clone().requires_grad_()
    params = dict(theirs.named_parameters())
    params["weight_hh_l0"] = w_fwd * m_fwd
    params["weight_hh_l0_reverse"] = w_rev * m_rev
    y_ref, (h_ref, c_ref) = torch.func.functional_call(theirs, params, (x,))
    assert_all_close((y, h_n, c_n), (y_ref, h_ref, c_ref), ["output", "h_n", "c_n"])

    ours_grads = grads_of((y, h_n, c_n), [x, ours.weight_hh_l0, ours.weight_hh_l0_reverse])
    ref_grads = grads_of((y_ref, h_ref, c_ref), [x, w_fwd, w_rev])
    assert_all_close(ours_grads, ref_grads, ["x", "weight_hh_l0", "weight_hh_l0_reverse"])
    for name, value in ours.named_parameters():
        assert torch.equal(value, stored[name]), f"{name} was modified"


def test_weight_drop_draws_a_new_mask_every_forward_call(backend):
    lstm = fastlstm.LSTM(3, 5, weight_drop=0.5, backend=backend).train()
    x = torch.randn(4, 2, 3)
    assert not torch.equal(lstm(x)[0], lstm(x)[0])
    torch.manual_seed(3)
    first = lstm.sample_masks(x).layers[0][0].weight_hh
    second = lstm.sample_masks(x).layers[0][0].weight_hh
    assert not torch.equal(first, second)


# --- inter-layer dropout ------------------------------------------------------------------------


def test_inter_layer_dropout_against_stacked_torch_layers(backend):
    ours = fastlstm.LSTM(3, 4, num_layers=3, bidirectional=True, dropout=0.5, dtype=F64, backend=backend).train()
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    masks = ours.sample_masks(x)
    assert len(masks.inter_layer) == 2 and masks.inter_layer[0].shape == (5, 2, 8)
    y, (h_n, c_n) = ours(x, masks=masks)

    layer_input, hs, cs = x, [], []
    for layer in range(3):
        single = torch.nn.LSTM(3 if layer == 0 else 8, 4, bidirectional=True, dtype=F64)
        single.load_state_dict({k.replace(f"_l{layer}", "_l0"): v for k, v in ours.state_dict().items()
                                if f"_l{layer}" in k})
        out, (h, c) = single(layer_input)
        hs.append(h)
        cs.append(c)
        layer_input = out * masks.inter_layer[layer] if layer < 2 else out
    assert_all_close((y, h_n, c_n), (layer_input, torch.cat(hs), torch.cat(cs)), ["output", "h_n", "c_n"])
    assert_all_close(grads_of((y,), [x]), grads_of((layer_input,), [x]), ["x"])


# --- randomness: seeds, replay, statistics ------------------------------------------------------

STOCHASTIC = dict(num_layers=2, bidirectional=True, dropout=0.3, zoneout=(0.1, 0.2), recurrent_dropout=0.3, weight_drop=0.2)


def test_manual_seed_reproduces_a_training_run(backend):
    lstm = fastlstm.LSTM(3, 4, **STOCHASTIC, backend=backend).train()
    x = torch.randn(5, 2, 3)
    torch.manual_seed(11)
    a = lstm(x)[0]
    torch.manual_seed(11)
    b = lstm(x)[0]
    torch.manual_seed(12)
    c = lstm(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("form", ["padded", "batch_first", "unbatched", "packed"])
def test_sample_masks_replays_exactly_what_forward_draws(form, backend):
    lstm = fastlstm.LSTM(3, 4, batch_first=form == "batch_first", **STOCHASTIC, backend=backend).train()
    x = torch.randn(5, 3, 3)
    inp = {
        "padded": x,
        "batch_first": x.transpose(0, 1),
        "unbatched": x[:, 0],
        "packed": pack_padded_sequence(x, [3, 5, 2], enforce_sorted=False),
    }[form]
    torch.manual_seed(21)
    drawn = lstm(inp)
    torch.manual_seed(21)
    masks = lstm.sample_masks(inp)
    replayed = lstm(inp, masks=masks)
    first = drawn[0].data if form == "packed" else drawn[0]
    second = replayed[0].data if form == "packed" else replayed[0]
    assert torch.equal(first, second)
    assert torch.equal(drawn[1][0], replayed[1][0]) and torch.equal(drawn[1][1], replayed[1][1])


def test_mask_statistics(backend):
    lstm = fastlstm.LSTM(16, 64, num_layers=2, dropout=0.3, zoneout=(0.1, 0.25), recurrent_dropout=0.4,
                         weight_drop=0.2, backend=backend).train()
    masks = lstm.sample_masks(torch.zeros(50, 32, 16))
    layer = masks.layers[0][0]
    checks = [
        (layer.zoneout_h.mean(), 0.1),
        (layer.zoneout_c.mean(), 0.25),
        ((layer.recurrent == 0).double().mean(), 0.4),
        ((layer.weight_hh == 0).double().mean(), 0.2),
        ((masks.inter_layer[0] == 0).double().mean(), 0.3),
    ]
    for observed, p in checks:
        assert abs(observed.item() - p) < 0.03, (observed, p)
    # dropout masks are scaled to keep the expectation at one
    assert layer.recurrent.mean().item() == pytest.approx(1.0, abs=0.05)
    assert masks.inter_layer[0].mean().item() == pytest.approx(1.0, abs=0.02)


def test_partial_masks_keep_given_fields_and_draw_the_rest(backend):
    cell = fastlstm.LSTMCell(3, 4, zoneout=0.5, recurrent_dropout=0.5, backend=backend).train()
    x = torch.randn(2, 3)
    fixed = torch.full((2, 4), 2.0)
    masks = fastlstm.functional.draw_cell_masks(x, cell._weights(x.dtype), cell.options, training=True,
                                                given=DirectionMasks(recurrent=fixed))
    assert torch.equal(masks.recurrent, fixed) and masks.zoneout_h is not None


# --- LSTMCell with options ----------------------------------------------------------------------

CELL_CFGS = [
    dict(peephole=True),
    dict(layer_norm=True),
    dict(clip=0.5, coupled_input_forget=True),
    dict(activations=("hard_sigmoid", "relu", "softsign"), cell_clip=0.3),
    dict(EVERYTHING),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", CELL_CFGS, ids=["peephole", "ln", "clip-coupled", "acts-cellclip", "everything"])
def test_cell_options_against_oracle(cfg, training, backend):
    cell = randomise(fastlstm.LSTMCell(3, 4, dtype=F64, **cfg, backend=backend)).train(training)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=F64, requires_grad=True)
    c0 = torch.randn(2, 4, dtype=F64, requires_grad=True)
    masks = cell.sample_masks(x) if training else None
    h, c = cell(x, (h0, c0), **({"masks": masks} if masks is not None else {}))
    p = dict(cell.named_parameters())
    if masks is not None and masks.weight_hh is not None:
        p = dict(p, weight_mask=masks.weight_hh)
    z = cfg.get("zoneout", (0.0, 0.0))
    rows = []
    for b in range(2):
        if training:
            m = masks if masks is not None else DirectionMasks()
            keep_h = None if m.zoneout_h is None else m.zoneout_h[0, b]
            keep_c = None if m.zoneout_c is None else m.zoneout_c[0, b]
            rec = None if m.recurrent is None else m.recurrent[b]
        else:
            keep_h, keep_c, rec = z[0] or None, z[1] or None, None
        rows.append(oracles.step(x[b], h0[b], c0[b], p, cfg, rec_mask=rec, keep_h=keep_h, keep_c=keep_c))
    h_o = torch.stack([r[0] for r in rows])
    c_o = torch.stack([r[1] for r in rows])
    assert_all_close((h, c), (h_o, c_o), ["h", "c"])
    leaves = [x, h0, c0, *cell.parameters()]
    assert_all_close(grads_of((h, c), leaves), grads_of((h_o, c_o), leaves), ["x", "h0", "c0", *dict(cell.named_parameters())])


# --- every option with every input form ---------------------------------------------------------

OPTION_SETS = {
    "activations": dict(activations=("softsign", "hard_sigmoid", "relu")),
    "peephole": dict(peephole=True),
    "clip": dict(clip=0.7),
    "coupled": dict(coupled_input_forget=True),
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=(0.2, 0.4)),
    "cell_clip": dict(cell_clip=0.3),
    "proj_clip": dict(proj_clip=0.2),
}


@pytest.mark.parametrize("form", ["padded", "batch_first", "unbatched"])
@pytest.mark.parametrize("cfg", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_every_option_with_every_input_form_matches_oracle(cfg, form, backend):
    """Eval-mode forms (packed is covered by check_against_oracle above); bidirectional, projected, 2 layers."""
    module = randomise(fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2,
                                     batch_first=form == "batch_first", dtype=F64, **cfg, backend=backend)).eval()
    batch = 1 if form == "unbatched" else 3
    x = torch.randn(4, batch, 3, dtype=F64)
    h0 = torch.randn(4, batch, 2, dtype=F64)
    c0 = torch.randn(4, batch, 5, dtype=F64)
    y_o, h_o, c_o = oracles.lstm(module, x, None, h0, c0, cfg)
    if form == "padded":
        y, (h, c) = module(x, (h0, c0))
    elif form == "batch_first":
        y, (h, c) = module(x.transpose(0, 1), (h0, c0))
        y = y.transpose(0, 1)
    else:
        y, (h, c) = module(x[:, 0], (h0[:, 0], c0[:, 0]))
        y, h, c = y.unsqueeze(1), h.unsqueeze(1), c.unsqueeze(1)
    assert_all_close((y, h, c), (y_o, h_o, c_o), ["output", "h_n", "c_n"])
