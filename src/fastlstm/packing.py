"""``PackedSequence`` <-> padded, time-major tensors, in the user's batch order.

A ``PackedSequence`` stores its rows step by step, each step's sequences in sorted (longest first)
order. Engines instead take a padded ``[T, B, F]`` tensor with per-sequence ``lengths [B]``, both in
the user's original batch order, so a user-supplied ``hx`` needs no permutation and ``h_n``/``c_n``
come back in the original order, as torch promises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence


@dataclass(frozen=True)
class PackedLayout:
    """Where each packed row lives in the padded layout.

    Attributes:
        steps: ``T``, the longest length.
        batch: ``B``, the number of sequences.
        lengths: ``[B]`` int64, each sequence's length, in the user's batch order.
        flat_index: ``[N]`` int64, row ``r`` of the packed data is element ``flat_index[r]`` of
            the padded tensor viewed as ``[T * B, F]``.
    """

    steps: int
    batch: int
    lengths: Tensor
    flat_index: Tensor


def layout_of(packed: PackedSequence) -> PackedLayout:
    """Index maps of a ``PackedSequence`` (sorted or not)."""
    batch_sizes = packed.batch_sizes.to(torch.int64).cpu()
    steps = batch_sizes.numel()
    batch = int(batch_sizes[0])
    device = packed.data.device

    # Sequence j (in sorted order) is present at step t iff batch_sizes[t] > j.
    lengths_sorted = (batch_sizes.unsqueeze(1) > torch.arange(batch).unsqueeze(0)).sum(0)
    step_offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    time_index = torch.repeat_interleave(torch.arange(steps), batch_sizes)
    sorted_slot = torch.arange(int(batch_sizes.sum())) - step_offsets[time_index]

    if packed.sorted_indices is None:
        batch_index = sorted_slot
        lengths = lengths_sorted
    else:
        sorted_indices = packed.sorted_indices.cpu()
        batch_index = sorted_indices[sorted_slot]
        lengths = torch.empty_like(lengths_sorted)
        lengths[sorted_indices] = lengths_sorted
    return PackedLayout(
        steps=steps,
        batch=batch,
        lengths=lengths.to(device),
        flat_index=(time_index * batch + batch_index).to(device),
    )


def unpack(data: Tensor, layout: PackedLayout) -> Tensor:
    """Packed rows ``[N, F]`` -> zero-padded ``[T, B, F]`` (differentiable)."""
    features = data.shape[1]
    padded = data.new_zeros(layout.steps * layout.batch, features)
    return padded.index_copy(0, layout.flat_index, data).view(layout.steps, layout.batch, features)


def pack(padded: Tensor, layout: PackedLayout) -> Tensor:
    """Padded ``[T, B, F]`` -> packed rows ``[N, F]`` (differentiable); padding is dropped."""
    return padded.reshape(layout.steps * layout.batch, -1).index_select(0, layout.flat_index)
