"""Test cases shared by every engine's tests: option sets, layer architectures, random layers and
inputs, and a run that collects outputs, final states and every gradient under random cotangents."""

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from fastlstm import reference
from fastlstm.masks import sample_direction_masks
from fastlstm.options import make_options
from fastlstm.weights import DirectionWeights, direction_shapes

OPTIONS = {
    "plain": {},
    "activations": dict(activations=("hard_sigmoid", "softsign", "relu")),
    "activations2": dict(activations=("tanh", "sigmoid", "hard_sigmoid")),
    "peephole": dict(peephole=True),
    "clip": dict(clip=0.4),
    "coupled": dict(coupled_input_forget=True),
    "coupled-peephole-clip": dict(coupled_input_forget=True, peephole=True, clip=0.8),
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=(0.3, 0.6)),
    "zoneout_h_only": dict(zoneout=(0.4, 0.0)),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "weight_drop": dict(weight_drop=0.4),
    "cell_clip": dict(cell_clip=0.3),
    "everything": dict(
        activations=("sigmoid", "tanh", "softsign"), peephole=True, clip=1.5, layer_norm=True,
        zoneout=(0.2, 0.3), recurrent_dropout=0.3, weight_drop=0.3, cell_clip=0.8,
    ),
}
ARCHS = {
    "uni": dict(directions=1, proj=0, bias=True),
    "bi-proj": dict(directions=2, proj=3, bias=True),
    "bi-nobias": dict(directions=2, proj=0, bias=False),
    "uni-proj-nobias": dict(directions=1, proj=2, bias=False),
}


def make_layer(arch, cfg, *, input_size=4, hidden=5, dtype=torch.float64, seed=0):
    """Random weights for one layer (every direction) with the options' parameters."""
    g = torch.Generator().manual_seed(seed)
    options = make_options(**cfg, has_bias=arch["bias"], has_projection=arch["proj"] > 0,
                           proj_clip=0.2 if (arch["proj"] and "cell_clip" in cfg) else None)
    shapes = direction_shapes(input_size, hidden, arch["proj"], bias=arch["bias"], peephole=options.peephole,
                              layer_norm=options.layer_norm)
    weights = []
    for _ in range(arch["directions"]):
        params = {}
        for name, shape in shapes.items():
            scale = 0.3 if name.startswith("layer_norm") else 0.6
            base = 1.0 if name.startswith("layer_norm") and "bias" not in name else 0.0
            params[name] = (base + scale * (2 * torch.rand(shape, generator=g, dtype=dtype) - 1)).requires_grad_()
        weights.append(DirectionWeights(**params))
    return options, weights


def run(fn, x, lengths, h0, c0, weights, options, masks, training, **kw):
    leaves = [x, h0, c0] + [p for w in weights for p in w if p is not None]
    y, h, c = fn(x, lengths, h0, c0, weights, options, masks, training=training, **kw)
    if lengths is not None:
        valid = (torch.arange(x.shape[0]).unsqueeze(1) < lengths).unsqueeze(-1)
        assert (y.masked_select(~valid) == 0).all(), "padding of the output must be zero"
    g = torch.Generator().manual_seed(9)
    # float64 draws, so that every dtype gets the same cotangents
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in (y, h, c))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [y, h, c] + [torch.zeros_like(leaf) if gr is None else gr for gr, leaf in zip(grads, leaves)]


def inputs_and_masks(arch, cfg, dtype, steps=6, batch=4, training=False, hidden=5):
    options, weights = make_layer(arch, cfg, dtype=dtype, hidden=hidden)
    d = arch["directions"]
    h_out = arch["proj"] or hidden
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, 4, generator=g, dtype=dtype).requires_grad_()
    h0 = torch.randn(d, batch, h_out, generator=g, dtype=dtype).requires_grad_()
    c0 = torch.randn(d, batch, hidden, generator=g, dtype=dtype).requires_grad_()
    masks = None
    if training and options.is_stochastic:
        masks = [sample_direction_masks(options, steps=steps, batch=batch, hidden_size=hidden, h_out=h_out,
                                        device="cpu", dtype=dtype) for _ in range(d)]
    return options, weights, x, h0, c0, masks


def compare(engine, arch, cfg, *, lengths, training, dtype, tol, **shape):
    """``engine`` against the reference engine on one layer: every output and gradient within ``tol``."""
    options, weights, x, h0, c0, masks = inputs_and_masks(arch, cfg, dtype, training=training, **shape)
    ours = run(engine, x, lengths, h0, c0, weights, options, masks, training)
    theirs = run(reference.lstm_layer, x, lengths, h0, c0, weights, options, masks, training)
    names = ["output", "h_n", "c_n", "x", "h0", "c0"] + [
        f"dir{k}.{f}" for k, w in enumerate(weights) for f, p in zip(DirectionWeights._fields, w) if p is not None
    ]
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


LENGTHS = {"full": None, "unequal": torch.tensor([3, 6, 1, 4])}


def _cast(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def compare_float32(engine, arch, cfg, *, training, lengths):
    """float32: ``engine`` and the reference engine against the float64 reference; ours may err at
    most 2x the float32 reference's error (flash-attention's rule for low-precision comparisons),
    plus an atol of 16 float32 ulps of the tensor's largest true value: at float32 both errors are
    rounding noise accumulated through the recurrence (one lucky rounding of the reference makes the
    ratio meaningless), and gradients summed over many tokens reach magnitudes of 10-20, where a
    fixed 1e-6 is below one ulp."""
    options, weights, x, h0, c0, masks = inputs_and_masks(arch, cfg, torch.float64, training=training)
    truth = run(reference.lstm_layer, x, lengths, h0, c0, weights, options, masks, training)
    f32 = lambda ts: [_cast(t, torch.float32) for t in ts]  # noqa: E731
    weights32 = [DirectionWeights(*f32(w)) for w in weights]
    masks32 = None if masks is None else [type(m)(*f32([m.zoneout_h, m.zoneout_c, m.recurrent, m.weight_hh]))
                                          for m in masks]
    args32 = (*f32([x]), lengths, *f32([h0, c0]), weights32, options, masks32, training)
    ours = run(engine, *args32)
    theirs = run(reference.lstm_layer, *args32)
    for k, (a, b, t) in enumerate(zip(ours, theirs, truth)):
        err_ours = (a.double() - t).abs().max().item()
        err_ref = (b.double() - t).abs().max().item()
        atol = 16 * torch.finfo(torch.float32).eps * max(1.0, t.abs().max().item())
        assert err_ours <= 2 * err_ref + atol, (k, err_ours, err_ref, atol)


def compare_packed(packed_layer, arch, cfg, *, lengths, sorted_input, tol, **shape):
    """An engine's packed entry point on a PackedSequence's rows against the reference engine on the
    padded batch: the output rows, the final states (user order) and every gradient, the input's
    taken row by row."""
    training = any(k in cfg for k in ("zoneout", "recurrent_dropout", "weight_drop"))
    options, weights, x, h0, c0, masks = inputs_and_masks(arch, cfg, torch.float64, training=training, **shape)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=sorted_input)
    data = packed.data.detach().requires_grad_()
    rows = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    y, h, c = packed_layer(rows, None, h0, c0, weights, options, masks, training=training)
    y_ref, h_ref, c_ref = reference.lstm_layer(x, lengths, h0, c0, weights, options, masks, training=training)
    y_ref_rows = pack_padded_sequence(y_ref, lengths, enforce_sorted=sorted_input).data
    for name, a, b in (("output", y, y_ref_rows), ("h_n", h, h_ref), ("c_n", c, c_ref)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    leaves = [h0, c0, *[p for w in weights for p in w if p is not None]]
    g = torch.Generator().manual_seed(3)
    cot = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (y, h, c)]
    ours = torch.autograd.grad(sum((t * u).sum() for t, u in zip((y, h, c), cot)), [data, *leaves], allow_unused=True)
    theirs = torch.autograd.grad(sum((t * u).sum() for t, u in zip((y_ref_rows, h_ref, c_ref), cot)), [x, *leaves],
                                 allow_unused=True)
    d_x_rows = pack_padded_sequence(theirs[0], lengths, enforce_sorted=sorted_input).data
    torch.testing.assert_close(ours[0], d_x_rows, rtol=tol, atol=tol, msg=lambda m: f"x: {m}")
    names = ["h0", "c0"] + [f"dir{k}.{f}" for k, w in enumerate(weights) for f, p in zip(DirectionWeights._fields, w)
                            if p is not None]
    for name, a, b in zip(names, ours[1:], theirs[1:]):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    return data.shape[0]
