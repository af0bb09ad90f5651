"""One allocation carved into the named buffers a plan points at: a call makes one allocator request
per dtype instead of one per buffer (it matters for single steps), and what a forward keeps for its
backward is one tensor per dtype, which autograd (or the custom op) carries between them."""

from __future__ import annotations

import torch
from torch import Tensor


def arena_layout(sizes: dict[str, int]) -> tuple[dict[str, int | None], int]:
    """Each buffer's offset (None if empty) and the total, in elements. The buffers lie end to end,
    with no gap: every element of an arena is written by the forward, so what the custom op returns
    is deterministic (the kernels load through memcpy, so no alignment is needed)."""
    offsets: dict[str, int | None] = {}
    total = 0
    for name, count in sizes.items():
        offsets[name] = total if _nonzero(count) else None
        total += count
    return offsets, total


def _nonzero(count) -> bool:
    """``count != 0``; a data-dependent count (``torch.compile`` of a PackedSequence's rows) is taken
    as nonzero without a guard (only the total is read there: the custom op's fake result)."""
    if isinstance(count, int):
        return count != 0
    from torch.fx.experimental.symbolic_shapes import guard_or_true  # (imports sympy: compiling has)

    return guard_or_true(count != 0)


class Arena:
    """Named views of one tensor, laid out by :func:`arena_layout`."""

    def __init__(self, tensor: Tensor, offsets: dict[str, int | None]):
        self.tensor, self.offsets = tensor, offsets
        self._base, self._item = tensor.data_ptr(), tensor.element_size()
        self._start = tensor.storage_offset()

    @staticmethod
    def allocate(dtype: torch.dtype, sizes: dict[str, int], *, zero: bool = False) -> Arena:
        offsets, total = arena_layout(sizes)
        return Arena((torch.zeros if zero else torch.empty)(total, dtype=dtype), offsets)

    def ptr(self, name: str) -> int | None:
        offset = self.offsets[name]
        return None if offset is None else self._base + offset * self._item

    def view(self, name: str, *shape: int) -> Tensor:
        offset = self.offsets[name]
        if offset is None:  # a buffer of no elements (B = 0, say)
            return self.tensor[:0].view(shape)
        # (as_strided: half the cost of a slice and a view, paid twice in each single step's backward)
        strides, stride = [], 1
        for extent in reversed(shape):
            strides.append(stride)
            stride *= extent
        return self.tensor.as_strided(shape, strides[::-1], self._start + offset)

    def point(self, plan, names) -> None:
        """Set the plan's fields ``names`` to these buffers (null where a buffer is empty)."""
        for name in names:
            setattr(plan, name, self.ptr(name))

