"""Run a fastlstm module and its torch.nn twin on the same inputs and collect everything comparable.

A "run" returns the outputs, final states and the gradients of the input, h0, c0 and every
parameter, under random cotangents on every output, so that two runs can be compared field by field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence


@dataclass
class Inputs:
    """One input in a user-facing form, built from a padded, time-major tensor."""

    x: torch.Tensor  # [T, B, I] time-major, padded
    form: str  # padded | batch_first | unbatched | unbatched_batch_first | packed_sorted | packed_unsorted
    lengths: list[int] | None
    h0: torch.Tensor | None
    c0: torch.Tensor | None


def make_inputs(form, steps, batch, input_size, states_shape_h, states_shape_c, *, dtype, with_hx, generator=None):
    g = generator
    if form.startswith("unbatched"):
        batch = 1
    x = torch.randn(steps, batch, input_size, dtype=dtype, generator=g)
    lengths = None
    if form == "packed_sorted":
        lengths = sorted(torch.randint(1, steps + 1, (batch,), generator=g).tolist(), reverse=True)
        lengths[0] = steps
    elif form == "packed_unsorted":
        lengths = torch.randint(1, steps + 1, (batch,), generator=g).tolist()
        lengths[batch // 2] = steps
    h0 = c0 = None
    if with_hx:
        h_shape = list(states_shape_h)
        c_shape = list(states_shape_c)
        h_shape[1] = c_shape[1] = batch
        h0 = torch.randn(h_shape, dtype=dtype, generator=g)
        c0 = torch.randn(c_shape, dtype=dtype, generator=g)
        if form.startswith("unbatched"):
            h0, c0 = h0[:, 0], c0[:, 0]
    return Inputs(x, form, lengths, h0, c0)


def to_user_form(inputs: Inputs, x: torch.Tensor):
    if inputs.form == "padded":
        return x
    if inputs.form == "batch_first":
        return x.transpose(0, 1)
    if inputs.form == "unbatched":
        return x[:, 0]
    if inputs.form == "unbatched_batch_first":
        return x[:, 0]
    enforce_sorted = inputs.form == "packed_sorted"
    return pack_padded_sequence(x, inputs.lengths, enforce_sorted=enforce_sorted)


@dataclass
class Run:
    output: torch.Tensor
    h_n: torch.Tensor
    c_n: torch.Tensor
    grads: dict[str, torch.Tensor]


def run_lstm(module, inputs: Inputs, cotangent_seed: int = 1) -> Run:
    """Forward + backward of an LSTM-like module with random cotangents on output, h_n and c_n."""
    module.zero_grad(set_to_none=True)
    x = inputs.x.clone().requires_grad_()
    args = [to_user_form(inputs, x)]
    h0 = c0 = None
    if inputs.h0 is not None:
        h0 = inputs.h0.clone().requires_grad_()
        c0 = inputs.c0.clone().requires_grad_()
        args.append((h0, c0))
    out, (h_n, c_n) = module(*args)
    out_tensor = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(cotangent_seed)
    loss = sum(
        (t * torch.randn(t.shape, dtype=t.dtype, generator=g)).sum() for t in (out_tensor, h_n, c_n)
    )
    loss.backward()
    grads = {"input": x.grad}
    if h0 is not None:
        grads["h0"] = h0.grad
        grads["c0"] = c0.grad
    for name, p in module.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return Run(out_tensor.detach(), h_n.detach(), c_n.detach(), grads)


def run_cell(module, x: torch.Tensor, hx, cotangent_seed: int = 1) -> Run:
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    args = [x]
    if hx is not None:
        hx = tuple(t.clone().requires_grad_() for t in hx)
        args.append(hx)
    h, c = module(*args)
    g = torch.Generator().manual_seed(cotangent_seed)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=g)).sum() for t in (h, c))
    loss.backward()
    grads = {"input": x.grad}
    if hx is not None:
        grads["h0"], grads["c0"] = hx[0].grad, hx[1].grad
    for name, p in module.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return Run(h.detach(), h.detach(), c.detach(), grads)


def assert_runs_close(ours: Run, theirs: Run, *, rtol: float, atol: float) -> None:
    torch.testing.assert_close(ours.output, theirs.output, rtol=rtol, atol=atol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(ours.h_n, theirs.h_n, rtol=rtol, atol=atol, msg=lambda m: f"h_n: {m}")
    torch.testing.assert_close(ours.c_n, theirs.c_n, rtol=rtol, atol=atol, msg=lambda m: f"c_n: {m}")
    assert ours.grads.keys() == theirs.grads.keys()
    for name in theirs.grads:
        torch.testing.assert_close(
            ours.grads[name], theirs.grads[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad of {n}: {m}"
        )
