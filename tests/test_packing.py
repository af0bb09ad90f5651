"""The one variable-length layout (packing.Layout): rows, sorted slots, and back."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastlstm.packing import Layout, layout_of

LENGTHS = {"unsorted": [3, 6, 1, 4], "sorted": [6, 4, 3, 1], "with-zeros": [0, 6, 2, 0], "all-equal": [6, 6, 6, 6]}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_padded_input_with_lengths_becomes_a_packed_sequences_rows(lengths):
    """The rows of padded input with lengths are exactly torch's PackedSequence data of it (zero
    lengths aside, which a PackedSequence cannot hold), and padded() puts them back, zeros past
    every end."""
    x = torch.randn(6, 4, 3)
    layout = layout_of(x, torch.tensor(lengths))
    rows = layout.rows(x)
    assert layout.total == rows.shape[0] == sum(lengths)
    present = [k for k, n in enumerate(lengths) if n > 0]
    packed = pack_padded_sequence(x[:, present], [lengths[k] for k in present], enforce_sorted=False)
    torch.testing.assert_close(rows, packed.data, rtol=0, atol=0)
    valid = (torch.arange(6)[:, None] < torch.tensor(lengths)[None, :])[..., None]
    torch.testing.assert_close(layout.padded(rows), torch.where(valid, x, 0.0), rtol=0, atol=0)
    assert layout.full == (len(set(lengths)) == 1 and lengths[0] == 6)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_a_packed_sequence_is_the_layout_already(enforce_sorted):
    lengths = [6, 4, 3, 1] if enforce_sorted else [3, 6, 1, 4]
    packed = pack_padded_sequence(torch.randn(6, 4, 3), lengths, enforce_sorted=enforce_sorted)
    layout = Layout.of_packed(packed)
    assert (layout.steps, layout.batch, layout.total) == (6, 4, packed.data.shape[0])
    torch.testing.assert_close(layout.batch_sizes, packed.batch_sizes, rtol=0, atol=0)
    assert layout.lengths().tolist() == sorted(lengths, reverse=True)
    assert layout.offsets().tolist() == (torch.cumsum(packed.batch_sizes, 0) - packed.batch_sizes).tolist()
    padded, _ = pad_packed_sequence(packed)
    torch.testing.assert_close(layout.padded(packed.data), padded, rtol=0, atol=0)


def test_sort_and_unsort_are_inverse_and_differentiable():
    x = torch.randn(6, 4, 3)
    layout = layout_of(x, torch.tensor([3, 6, 1, 4]))
    h = torch.randn(2, 4, 5, requires_grad=True)
    sorted_h = layout.sort(h, 1)
    assert [int(n) for n in layout.lengths()] == [6, 4, 3, 1]
    torch.testing.assert_close(sorted_h[:, 0], h[:, 1], rtol=0, atol=0)  # the longest first
    back = layout.unsort(sorted_h, 1)
    torch.testing.assert_close(back, h, rtol=0, atol=0)
    back.sum().backward()
    torch.testing.assert_close(h.grad, torch.ones_like(h), rtol=0, atol=0)


def test_a_full_batch_costs_no_copy():
    """Every sequence of length T: the rows are the padded tensor's memory, and back."""
    x = torch.randn(6, 4, 3)
    layout = layout_of(x, None)
    rows = layout.rows(x)
    assert rows.data_ptr() == x.data_ptr() and layout.padded(rows).data_ptr() == x.data_ptr()
    assert layout.batch_sizes.tolist() == [4] * 6 and layout.order is None


def test_the_engines_view_rebuilt_from_batch_sizes():
    """Inside the custom op only batch_sizes travels: B, N and full come back from the shapes."""
    layout = Layout.of_batch_sizes(torch.tensor([4, 3, 3, 2, 1, 1]), 5, 14, torch.device("cpu"))
    assert not layout.full and layout.lengths().tolist() == [6, 4, 3, 1, 0]
    assert Layout.of_batch_sizes(torch.tensor([4, 4]), 4, 8, torch.device("cpu")).full
