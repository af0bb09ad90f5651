"""A stream's chunks on the CPU without autograd: one C++ call per chunk, every layer and step inside
(``LSTM.step``'s fast path, :mod:`fastlstm.streaming`).

:class:`PackedWeights` holds a module's weights as the kernels read them, once per weights' version:
``W_ih^T`` and ``W_hh^T`` in the column panels the kernels' GEMM streams (a B = 1 product over
panels has no horizontal sums) and ``b_ih + b_hh``. A :class:`StreamPlan` over them, per batch
size, holds for each layer the single step's plan (:mod:`.step`) pointed at buffers it owns. A chunk
``x [T, B, I]`` then costs one ``stream_forward`` call and its output allocations; a batch of
streams splits its rows across threads by the layers' rule (rows never meet, so the threads run the
whole chunk without a barrier). For the single step's form: one direction, no projection, no layer
norm (:func:`takes`).
The plan points at the weights it was built from: its caller (:func:`fastlstm.streaming._fast_step`)
rebuilds it when a parameter is replaced or changed (a new version or address).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...masks import DirectionMasks
from ...options import LSTMOptions
from ...packing import Layout
from ...weights import DirectionWeights
from ..contract import LayerInputs, _step_call
from . import kernels, step, threads
from .layer import _panels

_NO_MASKS = DirectionMasks()


def takes(layers: list[list[DirectionWeights]], options: LSTMOptions) -> bool:
    """Whether a stream plan runs these layers: one direction, no projection, no layer norm."""
    return len(layers[0]) == 1 and layers[0][0].weight_hr is None and not options.layer_norm


class PackedWeights:
    """What every batch size's plan shares: each layer's weights (dense, in ``dtype``), ``W_ih^T``
    and ``W_hh^T`` in column panels, and ``b_ih + b_hh`` (packing is most of a plan's cost)."""

    def __init__(self, layers: list[list[DirectionWeights]], dtype: torch.dtype):
        self.dtype = dtype
        self.weights = [DirectionWeights(*(None if t is None else t.detach().to(dtype).contiguous()
                                           for t in directions[0])) for directions in layers]
        self.panels = [(_panels(w.weight_ih.t()), _panels(w.weight_hh.t())) for w in self.weights]
        self.biases = [None if w.bias_ih is None else (w.bias_ih + w.bias_hh).contiguous() for w in self.weights]


class StreamPlan:
    """Every layer's step plan for batches of ``batch`` rows, over :class:`PackedWeights`."""

    def __init__(self, packed: PackedWeights, options: LSTMOptions, batch: int):
        self.packed, self.batch, self.dtype = packed, batch, packed.dtype
        self.hidden = packed.weights[0].weight_hh.shape[0] // 4
        self.layers = len(packed.weights)
        self.state_shape = torch.Size((self.layers, batch, self.hidden))  # (h0 and c0's, checked per call)
        self._keep: list = []  # every tensor, template and plan a C++ pointer refers to
        rows = []
        for w, (w_ih, w_hh), bias in zip(packed.weights, packed.panels, packed.biases):
            rows += self._layer(w, w_ih, w_hh, bias, options)
        self.table = torch.tensor(rows, dtype=torch.int64)
        self._table, self._forward = self.table.data_ptr(), kernels.module().stream_forward

    def _layer(self, w: DirectionWeights, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None,
               options: LSTMOptions) -> list[int]:
        batch, hidden, dtype = self.batch, self.hidden, self.dtype
        call = _step_call("cpu", options, False, False, tuple(t is not None for t in w))
        zeros = torch.zeros(batch, hidden, dtype=dtype)
        inputs = LayerInputs(torch.empty(batch, w.weight_ih.shape[1], dtype=dtype),
                             Layout.of_full(1, batch, zeros.device), zeros, zeros, [w], [_NO_MASKS])
        template = step._template(call, inputs)  # (its layout holds the step's row counts the plan points at)
        arena = torch.empty(template.kept[1] + template.scratch[1], dtype=dtype)
        kept = arena.data_ptr()
        keep = [arena, zeros, template]
        plan = step._plan(template, kept, kept + template.kept[1] * arena.element_size(), w, _NO_MASKS, zeros, keep)
        output = torch.empty(batch, hidden, dtype=dtype)  # (the next layer's input)
        plan.y, plan.w_hh_packed, plan.bias = output.data_ptr(), w_hh.data_ptr(), kernels.pointer(bias)
        self._keep += [*keep, plan, output]
        return [kernels.address(plan), w_ih.data_ptr(), w.weight_ih.shape[1]]

    def run(self, x: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x [T, B, I]``, ``h0``, ``c0 [L, B, H]`` (contiguous, the plan's dtype and batch), ``lengths``
        int64 ``[B]`` (contiguous) or None -> ``(y [T, B, H], h_n, c_n)``; a row at or past its length
        keeps its state and outputs zeros. The batch rows split across threads by the layers' rule
        (:func:`threads.row_threads`: a batch of streams runs on every core torch may use)."""
        steps = x.shape[0]
        y = torch.empty(steps, self.batch, self.hidden, dtype=self.dtype)  # (ints: faster than new_empty's tuple)
        h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
        self._forward(self._table, self.layers, steps, x.data_ptr(), y.data_ptr(), h0.data_ptr(), c0.data_ptr(),
                      h_n.data_ptr(), c_n.data_ptr(), 0 if lengths is None else lengths.data_ptr(),
                      threads.row_threads(self.batch) if self.batch > 1 else 1)  # (B = 1: no lookups)
        return y, h_n, c_n
