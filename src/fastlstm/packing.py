"""The one variable-length layout every engine takes: a batch of sequences as rows.

Rows are step-major, and each step's sequences are sorted longest first, so the sequences still
running at step ``t`` are the first ``n_t`` slots of the batch (``batch_sizes[t] = n_t``) and step
``t``'s rows are ``[offsets[t], offsets[t] + n_t)``. This is a ``PackedSequence``'s own layout, so
its data is used as it is; padded input with ``lengths`` is gathered into it once per call; padded
input without ``lengths`` already is it (``T * B`` rows, a view). No engine computes padding, and
the reverse direction walks the same prefixes from ``t = T - 1`` down, a sequence joining at its own
last step.

:func:`fastlstm.functional.lstm` builds one :class:`Layout` per call and hands it to every layer;
the engines read ``batch_sizes``, ``offsets`` and the sorted ``lengths``. States (``h0 [D, B, .]``)
and per-sequence masks travel in sorted order (:meth:`Layout.sort`); outputs go back to the user's
form with :meth:`Layout.padded` and :meth:`Layout.unsort`.

Shape legend: ``T`` steps, ``B`` sequences (those of length 0 included: they have no rows and keep
their initial state), ``N`` rows (real tokens), ``F`` features.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence


class Layout:
    """Where each row of one call lives (see the module docstring). Built once per call; its index
    tensors are computed on first use and kept.

    Attributes:
        steps: ``T``.
        batch: ``B``.
        total: ``N``.
        order: ``[B]`` int64, sorted slot -> user batch index (on the data's device), or None when
            the slots are in the user's order already.
        full: every sequence has length ``T``: the rows are the padded tensor's own, no gather.
    """

    __slots__ = ("steps", "batch", "total", "device", "order", "full", "_batch_sizes", "_memo")

    def __init__(self, steps: int, batch: int, total: int, device: torch.device, *, batch_sizes: Tensor | None = None,
                 order: Tensor | None = None, full: bool = False):
        self.steps, self.batch, self.total, self.device = steps, batch, total, device
        self.order, self.full = order, full
        self._batch_sizes = batch_sizes
        self._memo: dict[str, Tensor] = {}

    # -- construction ---------------------------------------------------------------------------

    @staticmethod
    def of_full(steps: int, batch: int, device: torch.device) -> Layout:
        """Every one of ``batch`` sequences has ``steps`` steps (padded input without lengths)."""
        return Layout(steps, batch, steps * batch, device, full=True)

    @staticmethod
    def of_lengths(lengths: Tensor, steps: int, device: torch.device) -> Layout:
        """Padded ``[T, B, .]`` input with per-sequence ``lengths [B]`` (user order; 0 allowed)."""
        lengths = lengths.to(device="cpu", dtype=torch.int64)
        tracing = torch.compiler.is_compiling()  # (the lengths are data then: no branch on their values)
        if not tracing and bool((lengths == steps).all()):
            return Layout.of_full(steps, lengths.numel(), device)
        # (the very sort pack_padded_sequence does, unstable above 16 sequences: equal lengths then take
        # its order, so the rows, and inter-layer dropout drawn over them, are the PackedSequence's)
        sorted_lengths, order = torch.sort(lengths, descending=True)
        batch_sizes = (sorted_lengths.unsqueeze(0) > torch.arange(steps).unsqueeze(1)).sum(1)
        total = sorted_lengths.sum().item()  # (traced: a SymInt, which int() would specialize)
        layout = Layout(steps, lengths.numel(), total, device, batch_sizes=batch_sizes, order=order.to(device))
        layout._memo["lengths"] = sorted_lengths
        return layout

    @staticmethod
    def of_packed(packed: PackedSequence) -> Layout:
        """A PackedSequence's rows are this layout already (checked: :func:`check_batch_sizes`)."""
        batch_sizes = packed.batch_sizes
        if not torch.compiler.is_compiling():  # (traced, the op checks them when it runs)
            check_batch_sizes(batch_sizes, packed.data.shape[0])
            check_permutation(packed.sorted_indices, packed.unsorted_indices, int(batch_sizes[0]))
        return Layout(batch_sizes.numel(), int(batch_sizes[0]), packed.data.shape[0], packed.data.device,
                      batch_sizes=batch_sizes, order=packed.sorted_indices)

    @staticmethod
    def of_batch_sizes(batch_sizes: Tensor, batch: int, total: int, device: torch.device) -> Layout:
        """The layout an engine gets inside the custom op, where only ``batch_sizes`` travels
        (``B`` and ``N`` come from the shapes of ``h0`` and the rows)."""
        return Layout(batch_sizes.numel(), batch, total, device, batch_sizes=batch_sizes,
                      full=total == batch_sizes.numel() * batch)

    # -- what engines read ------------------------------------------------------------------------

    @property
    def batch_sizes(self) -> Tensor:
        """``[T]`` int64 on the CPU: the rows of each step."""
        if self._batch_sizes is None:
            self._batch_sizes = torch.full((self.steps,), self.batch, dtype=torch.int64)
        elif self._batch_sizes.dtype != torch.int64 or self._batch_sizes.device.type != "cpu":
            self._batch_sizes = self._batch_sizes.to(device="cpu", dtype=torch.int64)
        return self._batch_sizes

    def offsets(self) -> Tensor:
        """``[T]`` int64 on the CPU: each step's first row."""
        if "offsets" not in self._memo:
            sizes = self.batch_sizes
            self._memo["offsets"] = torch.cumsum(sizes, 0) - sizes
        return self._memo["offsets"]

    def lengths(self) -> Tensor:
        """``[B]`` int64 on the CPU: each sorted slot's length, longest first."""
        if "lengths" not in self._memo:
            self._memo["lengths"] = (self.batch_sizes.unsqueeze(0) > torch.arange(self.batch).unsqueeze(1)).sum(1)
        return self._memo["lengths"]

    # -- converting tensors (differentiable) ------------------------------------------------------

    def _flat_index(self, sorted_slots: bool) -> Tensor:
        """``[N]``: row ``r`` is element ``t * B + b`` of a padded ``[T * B, F]``, ``b`` the user's index
        (or, with ``sorted_slots``, the sorted slot)."""
        key = "sorted_index" if sorted_slots or self.order is None else "user_index"
        if key not in self._memo:
            sizes = self.batch_sizes
            step = torch.repeat_interleave(torch.arange(self.steps), sizes, output_size=self.total)
            slot = torch.arange(self.total) - self.offsets()[step]
            if key == "user_index":
                slot = self.order.cpu()[slot]
            self._memo[key] = (step * self.batch + slot).to(self.device)
        return self._memo[key]

    def rows(self, padded: Tensor, *, sorted_slots: bool = False) -> Tensor:
        """``[T, B, F]`` (user order, or sorted with ``sorted_slots``) -> rows ``[N, F]``."""
        flat = padded.reshape(self.steps * self.batch, padded.shape[-1])
        return flat if self.full else flat.index_select(0, self._flat_index(sorted_slots))

    def padded(self, rows: Tensor, *, sorted_slots: bool = False) -> Tensor:
        """Rows ``[N, F]`` -> ``[T, B, F]`` (user order, or sorted with ``sorted_slots``), zeros where
        a sequence has ended."""
        if self.full:
            return rows.view(self.steps, self.batch, rows.shape[-1])
        flat = rows.new_zeros(self.steps * self.batch, rows.shape[-1])
        return flat.index_copy(0, self._flat_index(sorted_slots), rows).view(self.steps, self.batch, rows.shape[-1])

    def sort(self, per_sequence: Tensor, dim: int) -> Tensor:
        """User order -> sorted slots along ``dim`` (the batch dimension)."""
        return per_sequence if self.order is None else per_sequence.index_select(dim, self.order)

    def unsort(self, per_sequence: Tensor, dim: int) -> Tensor:
        """Sorted slots -> user order along ``dim``."""
        if self.order is None:
            return per_sequence
        return torch.zeros_like(per_sequence).index_copy(dim, self.order, per_sequence)


def check_batch_sizes(batch_sizes: Tensor, rows: int, *, trailing_zeros: bool = False) -> None:
    """A PackedSequence's ``batch_sizes`` must describe its rows (a hand-made one may not, and the
    compiled engines index rows by them): else a RuntimeError, as torch's. ``trailing_zeros``: steps
    without rows may end them (the layout of ``lengths=`` whose longest is below ``T``)."""
    if batch_sizes.dim() != 1 or not batch_sizes.numel() or int(batch_sizes.sum()) != rows \
            or bool((batch_sizes[1:] > batch_sizes[:-1]).any()) or int(batch_sizes[-1]) < (0 if trailing_zeros else 1):
        raise RuntimeError(
            f"input: a PackedSequence's batch_sizes should be {'non-negative' if trailing_zeros else 'positive'} "
            f"and non-increasing and sum to its data's "
            f"{rows} rows, got batch_sizes {batch_sizes.tolist()}; build it with "
            "torch.nn.utils.rnn.pack_padded_sequence with lengths <= T (torch does not check them)"
        )


def check_permutation(sorted_indices: Tensor | None, unsorted_indices: Tensor | None, batch: int) -> None:
    """A PackedSequence's ``sorted_indices`` must order its ``batch`` sequences and ``unsorted_indices``
    undo it (a hand-made one may not: torch reads only ``unsorted_indices`` without ``hx``, and each
    index where it permutes, so its result then depends on which it read): else a RuntimeError."""
    if sorted_indices is None:
        return
    identity = torch.arange(batch, device=sorted_indices.device)
    if sorted_indices.shape != (batch,) or unsorted_indices is None or unsorted_indices.shape != (batch,) \
            or not torch.equal(sorted_indices.sort().values, identity) \
            or not torch.equal(unsorted_indices[sorted_indices], identity):
        raise RuntimeError(
            f"input: a PackedSequence's sorted_indices should be a permutation of its {batch} sequences and "
            f"unsorted_indices its inverse, got {sorted_indices.tolist()} and "
            f"{None if unsorted_indices is None else unsorted_indices.tolist()}; build it with "
            "torch.nn.utils.rnn.pack_padded_sequence or pack_sequence"
        )


def layout_of(input: Tensor | PackedSequence, lengths: Tensor | None) -> Layout:
    """The layout of padded, time-major ``input [T, B, F]`` (with optional ``lengths [B]``) or of a
    ``PackedSequence``."""
    if isinstance(input, PackedSequence):
        return Layout.of_packed(input)
    if lengths is None:
        return Layout.of_full(input.shape[0], input.shape[1], input.device)
    return Layout.of_lengths(lengths, input.shape[0], input.device)
