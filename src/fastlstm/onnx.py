"""ONNX export of models that contain ``fastlstm.LSTM`` / ``LSTMCell``.

:func:`export` is ``torch.onnx.export(..., dynamo=True)`` with fastlstm's translation and every
input's dimensions dynamic where the model allows; :func:`translation_table` is the translation for
those who call ``torch.onnx.export`` themselves; :func:`export_streaming` writes one LSTM as a graph
``(x, h, c) -> (y, h_out, c_out)`` for servers that feed the state back chunk by chunk.

What a layer becomes is decided in :mod:`fastlstm.exporting`: one ONNX ``LSTM`` node where the
operator computes it, else a ``Scan`` over the reference cell step; ``batch_first`` by Transpose
(onnxruntime has no ``layout=1``). Models export in eval mode (training-mode randomness cannot be
reproduced by a graph) and take padded input with ``lengths=`` (a PackedSequence cannot be exported).

Needs the ``onnx`` extra: ``pip install fastlstm[onnx]`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.utils.rnn import PackedSequence

from . import convert
from .exporting import NotExportableError, check_exportable
from .modules import LSTM, LSTMCell
from .options import make_options

# Constants up to this many elements are folded into initializers by the export's optimizer pass
# (onnxscript's default, 8192, would leave the gate reordering of every weight above 64 x 128 to run
# in each call).
_FOLD_LIMIT = 1 << 28


def translation_table() -> dict:
    """``{op: translation}`` for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``:
    writes ``fastlstm::onnx_lstm`` (a layer ONNX's LSTM computes) as one ``LSTM`` node, and the graph's
    check of ``lengths`` (``fastlstm::checked_lengths``) as the lengths."""
    return {torch.ops.fastlstm.onnx_lstm.default: _lstm_node,
            torch.ops.fastlstm.checked_lengths.default: _unchecked_lengths}


def _unchecked_lengths(lengths, steps):
    """The graph's lengths as they come (ONNX's ``sequence_lens`` is not checked either)."""
    from onnxscript import opset18 as op

    return op.Identity(lengths)


def _lstm_node(x, w, r, b, sequence_lens, initial_h, initial_c, p, activations, clip, input_forget):
    from onnxscript import opset18 as op

    directions, hidden = w.shape[0], r.shape[2]
    names = make_options(activations=tuple(activations.split(",")))
    return op.LSTM(x, w, r, b, sequence_lens, initial_h, initial_c, p, hidden_size=hidden,
                   direction="bidirectional" if directions == 2 else "forward", clip=clip,
                   input_forget=int(input_forget), **convert.onnx_activation_attributes(names, directions))


def export(model: torch.nn.Module, args: tuple = (), f=None, *, kwargs: dict | None = None, dynamic: bool = True,
           opset_version: int | None = None, **torch_onnx_kwargs):
    """Export ``model`` (in eval mode where it holds a stochastic fastlstm option) to ONNX.

    Args:
        model: any module; each ``fastlstm.LSTM`` layer becomes an ONNX ``LSTM`` node or a ``Scan``.
        args, kwargs: example inputs (use sizes of at least 2 for the dimensions to stay dynamic:
            torch.export fixes dimensions of size 0 or 1).
        f: a path to save the model to, or None.
        dynamic: every dimension of every tensor input dynamic where the model allows it (the time
            and batch dimensions of an LSTM's input; the feature dimension stays fixed), unless
            ``dynamic_shapes`` is given.
        opset_version, torch_onnx_kwargs: passed to ``torch.onnx.export`` (``input_names``,
            ``output_names``, ``custom_translation_table`` (merged with :func:`translation_table`), ...).

    Returns:
        torch's ``ONNXProgram`` (``.model_proto``, ``.save(path)``, ``.call_reference(...)``).

    Raises:
        ValueError: naming the option or input that cannot be exported and what to do instead.
    """
    # (an example's strides are not the graph's business: a strided view put sym_stride nodes,
    # which ONNX has no function for, into a Scan layer's trace)
    args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.contiguous,
                                                     (tuple(args), dict(kwargs or {})))
    _check_model(model, args, kwargs)
    table = {**translation_table(), **torch_onnx_kwargs.pop("custom_translation_table", {})}
    dynamic_shapes = torch_onnx_kwargs.pop("dynamic_shapes", None)
    if dynamic and dynamic_shapes is None:
        dynamic_shapes = _every_dimension(model, args, kwargs)
    # (torch's optimizer pass, run here once with a fold limit that takes the weights: see _FOLD_LIMIT)
    optimize = torch_onnx_kwargs.pop("optimize", True)
    try:
        program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    opset_version=opset_version, custom_translation_table=table, optimize=False,
                                    **torch_onnx_kwargs)
    except Exception as error:  # (torch's exporter wraps what its trace raises: fastlstm's refusal is the answer)
        refusal = _refusal_in(error)
        if refusal is None:
            raise
        raise NotExportableError(str(refusal)) from None  # (a new one: the refusal's context is torch's error)
    if optimize:
        _optimize(program)
    _fix_static_dimensions(program)
    if f is not None:
        program.save(f)
    return program


def export_streaming(module: LSTM, f=None, *, opset_version: int | None = None):
    """A unidirectional ``module`` as a streaming graph: inputs ``x`` (one chunk, ``[T, B, I]``, or
    ``[B, T, I]`` with ``batch_first``), ``h [L, B, H_out]``, ``c [L, B, H]``; outputs ``y``, ``h_out``,
    ``c_out`` (feed them back as the next chunk's ``h``, ``c``). T and B are dynamic."""
    if not isinstance(module, LSTM):
        raise TypeError(f"module should be a fastlstm.LSTM, got {type(module).__name__}")
    state = module.initial_state(2)  # (raises for a bidirectional module)
    x = state.h.new_zeros(2, 2, module.input_size)
    steps, batch = torch.export.Dim("T"), torch.export.Dim("B")
    x_dims = {0: batch, 1: steps} if module.batch_first else {0: steps, 1: batch}
    return export(StreamingGraph(module), (x, state.h, state.c), f, opset_version=opset_version,
                  dynamic_shapes=(x_dims, {1: batch}, {1: batch}), input_names=["x", "h", "c"],
                  output_names=["y", "h_out", "c_out"])


class StreamingGraph(torch.nn.Module):
    """``lstm`` (fastlstm's or torch's) with the streaming graph's signature:
    ``forward(x, h, c) -> (y, h_out, c_out)``."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h, c):
        y, (h_out, c_out) = self.lstm(x, (h, c))
        return y, h_out, c_out


def _check_model(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """The checks the trace would make, raised before it (torch.onnx.export wraps what its trace raises)."""
    for name, module in model.named_modules():
        if isinstance(module, (LSTM, LSTMCell)):
            dropout = module.dropout if isinstance(module, LSTM) and module.num_layers > 1 else 0.0
            try:
                check_exportable(module.options, training=module.training, dropout=dropout)
            except ValueError as error:
                raise ValueError(f"{name or 'model'}: {error}") from None
    leaves = torch.utils._pytree.tree_leaves((args, kwargs), is_leaf=lambda v: isinstance(v, PackedSequence))
    if any(isinstance(leaf, PackedSequence) for leaf in leaves):
        check_exportable(make_options(), training=False, packed=True)


def _refusal_in(error: BaseException) -> NotExportableError | None:
    """The fastlstm refusal that caused ``error`` (through its causes and contexts), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, NotExportableError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _every_dimension(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """``dynamic_shapes`` by parameter name: every dimension of every tensor ``Dim.AUTO`` (dynamic
    unless the model fixes it)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value):
        return {d: torch.export.Dim.AUTO for d in range(value.dim())} if isinstance(value, torch.Tensor) else None

    return {name: torch.utils._pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _optimize(program) -> None:
    """torch's ``ONNXProgram.optimize`` (onnxscript's optimizer), with the weights folded too."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize(program.model, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT)


def _fix_static_dimensions(program) -> None:
    """Write the dimensions that export found fixed (a dynamic feature dimension the model pins to
    its input size: range ``[k, k]``) as numbers; torch's exporter keeps them named."""
    fixed = {str(symbol): int(bounds.lower) for symbol, bounds in program.exported_program.range_constraints.items()
             if bounds.lower == bounds.upper}
    for value in [*program.model.graph.inputs, *program.model.graph.outputs]:
        if value.shape is not None:
            value.shape = type(value.shape)([fixed.get(str(d), d) if not isinstance(d, int) else d
                                             for d in value.shape])
