"""The export route: an LSTM as graph ops that an ONNX exporter translates, with T and B dynamic.

While ``torch.onnx.export`` traces a model (``onnx_exporting()``), :func:`fastlstm.functional.lstm`
hands each call here instead of to an engine (whose op takes the input gates in the engines'
sorted-rows layout, which ONNX cannot express). Each layer becomes:

* one ``fastlstm::onnx_lstm`` op where ONNX's ``LSTM`` operator computes the float32 layer (plain layers,
  bias or not, both directions, peepholes, ``clip``, coupled gates, activations, lengths, and
  ``recurrent_dropout``/``weight_drop``, which eval mode does not apply): the op *is* that operator
  (its inputs in ONNX's gate order, reordered here as torch ops on the parameters), and
  :func:`fastlstm.onnx.translation_table` writes it as one ``LSTM`` node;
* otherwise (layer norm, projection, ``cell_clip``, zoneout) a ``torch.scan`` over
  :func:`fastlstm.reference.cell_step`, which the exporter writes as an ONNX ``Scan``.

Lengths follow the spec: a step at or past a sequence's length keeps its state and outputs zeros,
so the reverse direction starts at each sequence's end. Training-mode randomness and
``PackedSequence`` inputs cannot be exported: :func:`check_exportable` names them.

Shape legend: ``T`` steps, ``B`` batch, ``I`` input features, ``H`` hidden size, ``H_out`` size of
``h``, ``D`` directions, ``L`` layers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import convert, reference
from .options import LSTMOptions, make_options
from .weights import DirectionWeights, accumulation_dtype


def onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing (without importing ``torch.onnx``)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


class NotExportableError(ValueError):
    """What an exported graph cannot compute, named (:func:`fastlstm.onnx.export` raises it as it is,
    where torch's exporter would wrap it in its own error)."""


def check_exportable(options: LSTMOptions, *, training: bool, dropout: float = 0.0, packed: bool = False) -> None:
    """Raise :class:`NotExportableError` (a ``ValueError``) naming what an exported graph cannot compute."""
    if packed:
        raise NotExportableError("input: a PackedSequence cannot be exported to ONNX; pass the padded input and "
                                 "lengths= (LSTM.forward(x, lengths=lengths)), which export as sequence lengths")
    if training:
        random = {"zoneout": options.has_zoneout, "recurrent_dropout": options.recurrent_dropout > 0,
                  "weight_drop": options.weight_drop > 0, "dropout": dropout > 0}
        for name, present in random.items():
            if present:
                raise NotExportableError(f"{name}: a training-mode forward draws random masks, which an exported "
                                         "graph cannot reproduce; call model.eval() before exporting")


def onnx_expressible(options: LSTMOptions, weights: DirectionWeights) -> bool:
    """Whether ONNX's ``LSTM`` operator computes an eval-mode layer with these options (in float32:
    onnxruntime's LSTM runs no other dtype, so :func:`lstm` scans the others)."""
    return not (options.layer_norm or options.has_zoneout or options.cell_clip is not None
                or weights.weight_hr is not None)


def lstm(x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor, weights: Sequence[Sequence[DirectionWeights]],
         options: LSTMOptions) -> tuple[Tensor, Tensor, Tensor]:
    """An eval-mode LSTM as exportable ops: ``x [T, B, I]``, ``lengths [B]`` or None, ``h0
    [L * D, B, H_out]``, ``c0 [L * D, B, H]`` -> ``(y [T, B, D * H_out], h_n, c_n)``."""
    num_directions = len(weights[0])
    h_n, c_n = [], []
    for layer, directions in enumerate(weights):
        # (the layer's input size is fixed: the check makes a dynamic dimension of the input static)
        torch._check(x.shape[2] == directions[0].weight_ih.shape[1], lambda: "input: wrong number of features")
        states = slice(layer * num_directions, (layer + 1) * num_directions)
        if x.dtype == torch.float32 and onnx_expressible(options, directions[0]):
            x, h, c = _onnx_layer(x, lengths, h0[states], c0[states], directions, options)
        else:
            x, h, c = _scanned_layer(x, lengths, h0[states], c0[states], directions, options)
        h_n.append(h)
        c_n.append(c)
    return x, torch.cat(h_n), torch.cat(c_n)


def _onnx_layer(x, lengths, h0, c0, weights, options):
    onnx = convert.onnx_weights(weights)
    y, h_n, c_n = torch.ops.fastlstm.onnx_lstm(
        x, onnx["W"], onnx["R"], onnx["B"], None if lengths is None else lengths.to(torch.int32), h0, c0,
        onnx.get("P"), ",".join(options.activations), options.clip, options.coupled_input_forget)
    steps, batch = x.shape[0], x.shape[1]
    if lengths is not None:  # (onnxruntime's LSTM gives zeros as a length-0 sequence's state: it keeps h0, c0)
        empty = (lengths == 0).view(1, -1, 1)
        h_n, c_n = torch.where(empty, h0, h_n), torch.where(empty, c0, c_n)
    return y.permute(0, 2, 1, 3).reshape(steps, batch, -1), h_n, c_n


def _scanned_layer(x, lengths, h0, c0, weights, options):
    from torch._higher_order_ops.scan import scan  # (torch's scan: the exporter writes it as ONNX's Scan)

    acc = accumulation_dtype(x.dtype)
    x = x.to(acc)
    keep_h, keep_c = options.zoneout_h or None, options.zoneout_c or None  # (eval zoneout: expectations)
    active = None
    if lengths is not None:  # [T, B, 1]: whether step t is inside sequence b
        active = (torch.arange(x.shape[0], device=x.device).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)
    outputs, h_n, c_n = [], [], []
    for d, w in enumerate(weights):
        # Detached: an exported graph has no backward, but the exporter's decomposition retraces the
        # graph with grad enabled (a no_grad block does not survive export), and scan's autograd rule
        # then partitions a backward whose saved values can include the batch size (the coupled gate's
        # unused forget slice, a layer norm over one element), which scan cannot stack over time.
        w = DirectionWeights(*(None if p is None else p.detach().to(acc) for p in w))

        def step(state, inputs, w=w):
            h, c = state
            h_new, c_new = reference.cell_step(inputs[0], h, c, w, w.weight_hh, options, zoneout_h=keep_h,
                                               zoneout_c=keep_c)
            if len(inputs) == 1:
                return (h_new, c_new), h_new.clone()  # (scan's outputs may not alias its carry)
            inside = inputs[1]
            return ((torch.where(inside, h_new, h), torch.where(inside, c_new, c)),
                    torch.where(inside, h_new, torch.zeros_like(h_new)))

        scanned = (reference.input_gates(x.detach(), w, options),) + (() if active is None else (active,))
        # (fresh tensors, not views of h0: scan's trace guards on a view's base, which fixed B in the
        # reverse direction's)
        initial = (h0[d].detach().to(acc).clone(), c0[d].detach().to(acc).clone())
        (h, c), y = scan(step, initial, scanned, reverse=d == 1)
        outputs.append(y)
        h_n.append(h)
        c_n.append(c)
    dtype = h0.dtype
    return torch.cat(outputs, 2).to(dtype), torch.stack(h_n).to(dtype), torch.stack(c_n).to(dtype)


# -- the op that is ONNX's LSTM operator -------------------------------------------------------------

@torch.library.custom_op("fastlstm::onnx_lstm", mutates_args=())
def onnx_lstm(x: Tensor, w: Tensor, r: Tensor, b: Tensor, sequence_lens: Tensor | None, initial_h: Tensor,
              initial_c: Tensor, p: Tensor | None, activations: str, clip: float | None,
              input_forget: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX's ``LSTM`` operator (layout 0): ``x [T, B, I]``, ``w [D, 4H, I]``, ``r [D, 4H, H]``,
    ``b [D, 8H]`` (gates ``i, o, f, c``), ``sequence_lens`` int32 ``[B]`` or None, ``initial_h``,
    ``initial_c [D, B, H]``, ``p [D, 3H]`` (``i, o, f``) or None; ``activations``: fastlstm's
    names, comma-separated -> ``(Y [T, D, B, H], Y_h [D, B, H], Y_c [D, B, H])``, a sequence of
    length 0 ending in zeros (as onnxruntime computes it). Eagerly, the reference on the weights put
    back in torch's order."""
    options = make_options(activations=tuple(activations.split(",")), peephole=p is not None, clip=clip,
                           coupled_input_forget=input_forget)
    weights = [DirectionWeights(**convert.from_onnx_direction(w[d], r[d], b[d], None if p is None else p[d]))
               for d in range(w.shape[0])]
    lengths = None if sequence_lens is None else sequence_lens.long()
    y, h_n, c_n = reference.lstm_layer(x, lengths, initial_h, initial_c, weights, options, None, training=False)
    if lengths is not None:  # (as onnxruntime: a sequence of length 0 ends in zeros)
        h_n, c_n = (torch.where((lengths == 0).view(1, -1, 1), 0.0, t) for t in (h_n, c_n))
    steps, batch, directions = x.shape[0], x.shape[1], w.shape[0]
    return y.reshape(steps, batch, directions, -1).permute(0, 2, 1, 3).contiguous(), h_n, c_n


@onnx_lstm.register_fake
def _(x, w, r, b, sequence_lens, initial_h, initial_c, p, activations, clip, input_forget):
    directions, hidden = w.shape[0], r.shape[2]
    return (x.new_empty(x.shape[0], directions, x.shape[1], hidden), initial_h.new_empty(initial_h.shape),
            initial_c.new_empty(initial_c.shape))
