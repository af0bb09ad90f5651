"""Comparisons every engine's tests share: one layer on an engine against the reference engine,
outputs, final states and every gradient (the random layers and the tolerance rule are
:mod:`fastlstm.testing`'s)."""

import functools

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from fastlstm import functional, reference
from fastlstm.testing import ARCHS, OPTIONS, assert_within_twice, gradient_names, layer_inputs, make_layer
from fastlstm.testing import outputs_and_gradients as run
from fastlstm.weights import DirectionWeights

__all__ = ["ARCHS", "OPTIONS", "LENGTHS", "compare", "compare_float32", "compare_packed", "layer_inputs", "make_layer",
           "on", "run", "cast"]

LENGTHS = {"full": None, "unequal": torch.tensor([3, 6, 1, 4])}


def on(backend: str):
    """One layer on ``backend``, with the signature of :func:`fastlstm.reference.lstm_layer`."""
    return functools.partial(functional.lstm_layer, backend=backend)


def compare(engine, arch, cfg, *, lengths, training, dtype, tol, **shape):
    """``engine`` against the reference engine on one layer: every output and gradient within ``tol``."""
    options, weights, x, h0, c0, masks = layer_inputs(arch, cfg, dtype, training=training, **shape)
    ours = run(engine, x, lengths, h0, c0, weights, options, masks, training)
    theirs = run(reference.lstm_layer, x, lengths, h0, c0, weights, options, masks, training)
    for name, a, b in zip(gradient_names(weights), ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def cast(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def compare_float32(engine, arch, cfg, *, training, lengths):
    """float32: ``engine`` and the reference engine against the float64 reference; ours may err at
    most twice the float32 reference's error plus the floor (fastlstm.testing: 16 float32 ulps of
    the tensor's largest true value, since at float32 both errors are rounding noise accumulated
    through the recurrence, and gradients summed over many tokens reach magnitudes of 10-20)."""
    options, weights, x, h0, c0, masks = layer_inputs(arch, cfg, torch.float64, training=training)
    truth = run(reference.lstm_layer, x, lengths, h0, c0, weights, options, masks, training)
    f32 = lambda ts: [cast(t, torch.float32) for t in ts]  # noqa: E731
    weights32 = [DirectionWeights(*f32(w)) for w in weights]
    masks32 = None if masks is None else [type(m)(*f32([m.zoneout_h, m.zoneout_c, m.recurrent, m.weight_hh]))
                                          for m in masks]
    args32 = (*f32([x]), lengths, *f32([h0, c0]), weights32, options, masks32, training)
    ours = run(engine, *args32)
    theirs = run(reference.lstm_layer, *args32)
    for name, a, b, t in zip(gradient_names(weights), ours, theirs, truth):
        assert_within_twice(a, b, t, name=name)


def compare_packed(layer, arch, cfg, *, lengths, sorted_input, tol, **shape):
    """``layer`` (the signature of :func:`fastlstm.reference.lstm_layer`) on a PackedSequence's rows
    against the reference engine on the padded batch: the output rows, the final states (user
    order) and every gradient, the input's taken row by row. Returns the number of rows."""
    training = any(k in cfg for k in ("zoneout", "recurrent_dropout", "weight_drop"))
    options, weights, x, h0, c0, masks = layer_inputs(arch, cfg, torch.float64, training=training, **shape)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=sorted_input)
    data = packed.data.detach().requires_grad_()
    rows = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    y, h, c = layer(rows, None, h0, c0, weights, options, masks, training=training)
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
    for name, a, b in zip(gradient_names(weights)[4:], ours[1:], theirs[1:]):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    return data.shape[0]
