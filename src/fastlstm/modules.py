"""``LSTM`` and ``LSTMCell``: torch's arguments, parameters, input forms and errors. No math.

Both modules validate their arguments like ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` (same order,
same exception types), own their parameters under torch's names, parse every input form into the
engines' padded, time-major layout, and hand the call to :mod:`fastlstm.functional`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import autocasting, checks, exporting, functional
from .conversion import Convertible
from .engines import check_backend
from .masks import DirectionMasks, LSTMMasks
from .options import DEFAULT_ACTIVATIONS, LSTMOptions, make_options
from .streaming import Streaming
from .weights import TORCH_FIELDS, DirectionWeights, direction_shapes, names_by_field, parameter_name, shapes_by_field

_LAYER_NORM_ONES = ("layer_norm_ih_weight", "layer_norm_hh_weight", "layer_norm_cell_weight")
_LAYER_NORM_ZEROS = ("layer_norm_cell_bias",)


def _init_parameters(module: nn.Module, hidden_size: int, options: LSTMOptions) -> None:
    """torch's initialisation, U(-1/sqrt(H), 1/sqrt(H)), drawn in registration order.

    Layer-norm gains start at one and shifts at zero (they draw nothing), so with default options
    the random stream, and hence the weights for a given seed, are the same as torch's.
    """
    stdv = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for name, param in module.named_parameters():
            field = name if name in _FIELDS else name.rsplit("_l", 1)[0]
            if field in _LAYER_NORM_ONES:
                param.fill_(1.0)
            elif field in _LAYER_NORM_ZEROS:
                param.zero_()
            else:
                param.uniform_(-stdv, stdv)
        if options.forget_bias is not None:
            for name, param in module.named_parameters():
                field = name if name in _FIELDS else name.rsplit("_l", 1)[0]
                if field == "bias_ih":
                    param[hidden_size : 2 * hidden_size] = options.forget_bias
                elif field == "bias_hh":
                    param[hidden_size : 2 * hidden_size] = 0.0


_FIELDS = frozenset(DirectionWeights._fields)


_MISSING = object()


def _direction_weights(module: nn.Module, names: tuple[str | None, ...], shapes: tuple, dtype: torch.dtype,
                       like: Tensor) -> DirectionWeights:
    """A direction's parameters as the module holds them now (after .to(), functional_call, etc.),
    each checked against its shape and the dtype and device of ``like`` (the module's first
    ``weight_ih``, which the input was checked against): a weight replaced or assigned through
    ``.data`` can differ, and the engines would read it as the expected one. ``names`` and ``shapes``
    give each DirectionWeights field's parameter name and shape, or None where the module has none."""
    values, dtype_like, device_like = [], like.dtype, like.device
    for name, shape in zip(names, shapes):
        if name is None:
            values.append(None)
            continue
        value = _parameter(module, name)
        if value is None and name in ("bias_ih", "bias_hh"):  # (an LSTMCell's, set to None: torch's cell goes
            value = like.new_zeros(shape)                      # without it, which is a bias of zeros)
        if value is None or value.shape != shape or value.dtype != dtype_like or value.device != device_like:
            checks.refuse_parameter(type(module).__name__, name, value, shape, like)
        values.append(value)
    w = DirectionWeights(*values)
    if like.dtype != dtype:  # under autocast, or an LSTMCell promoting to a wider c0 (the dtype check ran before)
        w = DirectionWeights(*(None if p is None else p.to(dtype) for p in w))
    return w


def _parameter(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter, without nn.Module's attribute fallback where it can."""
    value = module._parameters.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def _options_repr(options: LSTMOptions, backend: str) -> str:
    extra = "".join(f", {name}={value!r}" for name, value in options.non_defaults().items())
    return extra + (f", backend={backend!r}" if backend != "auto" else "")


class _Deployment:
    """What the modules say to tools they do not support (README, "TorchScript and quantization").

    * ``torch.jit.script`` cannot compile them (their engines run behind a custom op and Python
      records): it calls ``__prepare_scriptable__``, which raises and names what does work.
    * ``torch.ao.quantization`` (``quantize_dynamic``, ``prepare``) has no int8 path for them: it
      walks every module and sets ``qconfig``. A qconfig asked for them raises; walking past them
      (a spec of other types) warns that they stay in float.
    """

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fastlstm.{type(self).__name__} cannot be compiled by torch.jit.script (TorchScript cannot call "
            "its engines); use torch.export.export (or torch.onnx.export(..., dynamo=True)) or torch.compile; "
            "torch.jit.trace traces LSTMCell only"
        )

    @property
    def qconfig(self):
        raise AttributeError("qconfig")  # (never set: to torch.ao.quantization the attribute is missing)

    @qconfig.setter
    def qconfig(self, value):
        if value is not None:
            raise RuntimeError(
                f"fastlstm.{type(self).__name__} cannot be quantized by torch.ao.quantization (it has no int8 path); "
                "leave it out of qconfig_spec (e.g. quantize_dynamic(model, {torch.nn.Linear})) to keep it in float"
            )
        warnings.warn(
            f"torch.ao.quantization leaves fastlstm.{type(self).__name__} in float (it has no int8 path)",
            UserWarning, stacklevel=2,
        )


@dataclass
class _ParsedInput:
    """An ``LSTM`` input in functional's form, and what is needed to give outputs the user's form."""

    x: Tensor | None  # [T, B, I]; None for packed input
    lengths: Tensor | None  # [B]
    h0: Tensor  # [L * D, B, H_out]
    c0: Tensor  # [L * D, B, H]
    packed: PackedSequence | None  # the input itself, its data cast under autocast
    batched: bool
    h_dtype: torch.dtype | None = None  # the output's and h_n's dtype where torch's differs from c_n's (autocast)

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.data.dtype if self.packed is not None else self.x.dtype


class LSTM(_Deployment, Streaming, Convertible, nn.Module):
    r"""A drop-in ``torch.nn.LSTM`` with optional variants.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None, *, <options>, backend="auto")``

    The positional arguments, parameters (names, shapes, initialisation), inputs, outputs and
    errors are torch's. The keyword-only options (see :func:`fastlstm.options.make_options` and
    ``docs/equations.md``) default to torch's behaviour. ``backend`` names the engine
    (``"auto"`` or ``"reference"``).

    Inputs: ``input`` of shape ``[T, B, I]`` (``[B, T, I]`` with ``batch_first``), ``[T, I]``
    unbatched, or a ``PackedSequence``; optional ``hx = (h_0 [L * D, B, H_out], c_0 [L * D, B, H])``.
    Outputs: ``output [T, B, D * H_out]`` (same form as the input), ``(h_n, c_n)`` like ``hx``.
    ``forward(..., masks=...)`` replays the training masks returned by :meth:`sample_masks`.
    """

    TORCH_CLASS = nn.LSTM
    TORCH_ARGUMENTS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                       "proj_size")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        activations=DEFAULT_ACTIVATIONS,
        peephole: bool = False,
        clip: float | None = None,
        coupled_input_forget: bool = False,
        layer_norm: bool = False,
        zoneout=0.0,
        recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0,
        cell_clip: float | None = None,
        proj_clip: float | None = None,
        forget_bias: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        num_layers, proj_size = checks.check_lstm_arguments(input_size, hidden_size, num_layers, bias, batch_first,
                                                            dropout, proj_size)

        self.options = make_options(
            activations=activations,
            peephole=peephole,
            clip=clip,
            coupled_input_forget=coupled_input_forget,
            layer_norm=layer_norm,
            zoneout=zoneout,
            recurrent_dropout=recurrent_dropout,
            weight_drop=weight_drop,
            cell_clip=cell_clip,
            proj_clip=proj_clip,
            forget_bias=forget_bias,
            has_bias=bias,
            has_projection=proj_size > 0,
        )
        self.backend = check_backend(backend)
        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        num_directions = 2 if bidirectional else 1
        h_out = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        self._direction_names: list[tuple[str | None, ...]] = []  # per (layer, direction), by field
        self._direction_shapes: list[tuple] = []  # the parameters' shapes, likewise
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else h_out * num_directions
            shapes = direction_shapes(
                layer_input_size,
                hidden_size,
                proj_size,
                bias=bias,
                peephole=self.options.peephole,
                layer_norm=self.options.layer_norm,
            )
            for direction in range(num_directions):
                names = []
                for field, shape in shapes.items():
                    name = parameter_name(field, layer, direction == 1)
                    setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
                    names.append(name)
                    if field in TORCH_FIELDS:
                        self._flat_weights_names.append(name)
                self._all_weights.append(names)
                self._direction_names.append(names_by_field(shapes, layer, direction == 1))
                self._direction_shapes.append(shapes_by_field(shapes))
        self.reset_parameters()

    # -- torch.nn.LSTM's public surface ---------------------------------------------------------

    def reset_parameters(self) -> None:
        _init_parameters(self, self.hidden_size, self.options)

    def flatten_parameters(self) -> None:
        """Kept for compatibility with ``torch.nn.LSTM``; parameters need no flattening here."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__) + _options_repr(self.options, self.backend)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, input, hx=None, *, lengths: Tensor | None = None, masks: LSTMMasks | None = None):
        """``lengths``: int64 ``[B]`` (a 0-d tensor for unbatched input), each sequence's number of
        steps in padded ``input``, any batch order: the result is that of a ``PackedSequence`` of
        those lengths, padded (outputs zero past each end, ``h_n``/``c_n`` at each last step, the
        reverse direction starting at each end). A length of 0 keeps the sequence's initial state."""
        parsed = self._parse(input, hx, lengths)
        weights = self._weights(parsed.dtype)
        y, h_n, c_n = functional.lstm(
            parsed.packed if parsed.packed is not None else parsed.x,
            parsed.lengths,
            parsed.h0,
            parsed.c0,
            weights,
            self.options,
            dropout=self.dropout,
            training=self.training,
            masks=masks,
            backend=self.backend,
        )
        if parsed.h_dtype is not None:
            y, h_n = y.to(parsed.h_dtype), h_n.to(parsed.h_dtype)
        if parsed.packed is not None:
            packed = parsed.packed
            return PackedSequence(y, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), (h_n, c_n)
        if not parsed.batched:
            return y.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            y = y.transpose(0, 1)
        return y, (h_n, c_n)

    def sample_masks(self, input, hx=None, *, lengths: Tensor | None = None) -> LSTMMasks | None:
        """Draw the masks a training-mode ``forward(input, hx, lengths=lengths)`` would draw, from
        torch's RNG. ``forward(input, hx, lengths=lengths, masks=m)`` then replays them. Masks are
        time-major, in the user's batch order (see :mod:`fastlstm.masks`); None if the module draws none.
        """
        parsed = self._parse(input, hx, lengths)
        packed = parsed.packed is not None
        layout = functional.layout_of(parsed.packed if packed else parsed.x, parsed.lengths)
        return functional.draw_masks(layout, parsed.packed.data if packed else parsed.x, parsed.h0,
                                     self._weights(parsed.dtype), self.options, dropout=self.dropout, training=True)

    def _weights(self, dtype: torch.dtype) -> list[list[DirectionWeights]]:
        num_directions, like = 2 if self.bidirectional else 1, _parameter(self, "weight_ih_l0")
        return [
            [_direction_weights(self, self._direction_names[k], self._direction_shapes[k], dtype, like)
             for k in range(layer * num_directions, (layer + 1) * num_directions)]
            for layer in range(self.num_layers)
        ]

    def _parse(self, input, hx, lengths=None) -> _ParsedInput:
        weight_dtype = self.weight_ih_l0.dtype
        num_directions = 2 if self.bidirectional else 1
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size

        packed = None
        if isinstance(input, PackedSequence):
            # (refused before batch_sizes is read: under export a data-dependent size ends the trace first)
            if exporting.onnx_exporting():
                exporting.check_exportable(self.options, training=False, packed=True)
            packed = input
            x = input.data  # [N, I]: only its batch size, dtype and device are read below
            self._check_input(x, weight_dtype, expected_dim=2)
            if lengths is not None:
                raise ValueError("lengths: a PackedSequence input carries its own lengths; pass lengths with padded input")
            batched = True
            if hx is not None:
                hx = checks.check_state_pair(hx, "LSTM", "sorted" if input.sorted_indices is None else "unsorted")
                if hx[0].dim() != 3 or hx[1].dim() != 3:  # (torch's kernel: an IndexError)
                    raise IndexError(f"For a PackedSequence input, hx and cx should be 3-D but got "
                                     f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        else:
            checks.check_input_tensor(input)
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            if hx is not None:
                hx = checks.check_state_pair(hx, "LSTM")
                if batched and (hx[0].dim() != 3 or hx[1].dim() != 3):
                    raise RuntimeError(
                        "For batched 3-D input, hx and cx should also be 3-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
                if not batched and (hx[0].dim() != 2 or hx[1].dim() != 2):
                    raise RuntimeError(
                        "For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
            if not batched:
                x = input.unsqueeze(1)
                hx = None if hx is None else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            self._check_input(x, weight_dtype, expected_dim=3)
            if x.shape[0] == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")  # (torch's words)
            if lengths is not None:
                lengths = checks.check_lengths(lengths, x.shape[0], x.shape[1], batched)

        batch = int(packed.batch_sizes[0]) if packed is not None else x.shape[1]
        expected_h = (self.num_layers * num_directions, batch, h_out)
        expected_c = (self.num_layers * num_directions, batch, self.hidden_size)
        if hx is None:
            h0 = x.new_zeros(expected_h)
            c0 = x.new_zeros(expected_c)
        else:
            h0, c0 = hx
            if tuple(h0.shape) != expected_h:
                raise RuntimeError(f"Expected hidden[0] size {expected_h}, got {list(h0.shape)}")
            if tuple(c0.shape) != expected_c:
                raise RuntimeError(f"Expected hidden[1] size {expected_c}, got {list(c0.shape)}")

        # under autocast torch's dtypes (autocasting.py); the input and the states may differ in dtype there
        cast, h_dtype = autocasting.lstm_dtypes(x, c0, None if packed is None else packed.batch_sizes, self.proj_size)
        if cast is not None:
            x, h0, c0 = x.to(cast), h0.to(cast), c0.to(cast)
            if packed is not None:
                packed = PackedSequence(x, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        if hx is not None:
            if cast is None:  # (a narrower c0: torch promotes it with the gates)
                x, h0, c0 = autocasting.promoted_states(x, h0, c0, cell=False)
            float32_cell = cast is None and autocasting.carries_float32_cell(x, c0)
            checks.check_state_dtype_device((h0, c0), x, "LSTM", c_dtype=torch.float32 if float32_cell else None)
        if packed is not None:
            return _ParsedInput(None, None, h0, c0, packed, batched, h_dtype)
        return _ParsedInput(x, lengths, h0, c0, None, batched, h_dtype)

    def _check_input(self, x: Tensor, weight_dtype: torch.dtype, expected_dim: int) -> None:
        if x.dtype != weight_dtype and autocasting.autocast_dtype(x.device) is None:
            raise (RuntimeError if expected_dim == 2 else ValueError)(  # (torch's types: packed, padded)
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({x.dtype})"
            )
        if x.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {x.dim()}")
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.size(-1)}"
            )


class LSTMCell(_Deployment, Convertible, nn.Module):
    r"""A drop-in ``torch.nn.LSTMCell`` with optional variants.

    ``LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None, *, <options>, backend="auto")``

    Inputs: ``input [B, I]`` or ``[I]``; optional ``hx = (h_0 [B, H], c_0 [B, H])`` (1-D when
    unbatched). Returns ``(h_1, c_1)`` of the same shape as ``h_0``. Options are those of
    :class:`LSTM` except ``proj_clip`` (a cell has no projection). In training, every call draws
    fresh masks unless ``masks=`` gives some: reuse one ``recurrent`` mask across a sequence's calls
    for per-sequence recurrent dropout.
    """

    TORCH_CLASS = nn.LSTMCell
    TORCH_ARGUMENTS = ("input_size", "hidden_size", "bias")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        activations=DEFAULT_ACTIVATIONS,
        peephole: bool = False,
        clip: float | None = None,
        coupled_input_forget: bool = False,
        layer_norm: bool = False,
        zoneout=0.0,
        recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0,
        cell_clip: float | None = None,
        forget_bias: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        input_size, hidden_size = checks.check_cell_sizes(input_size, hidden_size)
        self.options = make_options(
            activations=activations,
            peephole=peephole,
            clip=clip,
            coupled_input_forget=coupled_input_forget,
            layer_norm=layer_norm,
            zoneout=zoneout,
            recurrent_dropout=recurrent_dropout,
            weight_drop=weight_drop,
            cell_clip=cell_clip,
            forget_bias=forget_bias,
            has_bias=bool(bias),
            has_projection=False,
        )
        self.backend = check_backend(backend)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        shapes = direction_shapes(
            input_size,
            hidden_size,
            0,
            bias=bool(bias),
            peephole=self.options.peephole,
            layer_norm=self.options.layer_norm,
        )
        for field, shape in shapes.items():
            setattr(self, field, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self._direction_names = names_by_field(shapes, None, False)
        self._direction_shapes = shapes_by_field(shapes)
        if not bias:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_parameters(self, self.hidden_size, self.options)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        return s.format(**self.__dict__) + _options_repr(self.options, self.backend)

    def forward(self, input, hx=None, *, masks: DirectionMasks | None = None):
        x, h0, c0, batched = self._parse(input, hx)
        h1, c1 = functional.lstm_cell(
            x, h0, c0, self._weights(x.dtype), self.options, training=self.training, masks=masks, backend=self.backend
        )
        if not batched:
            return h1.squeeze(0), c1.squeeze(0)
        return h1, c1

    def sample_masks(self, input, hx=None) -> DirectionMasks | None:
        """Draw the masks a training-mode ``forward(input, hx)`` would draw (time-major, ``T = 1``)."""
        x, _, _, _ = self._parse(input, hx)
        return functional.draw_cell_masks(x, self._weights(x.dtype), self.options, training=True)

    def _weights(self, dtype: torch.dtype) -> DirectionWeights:
        return _direction_weights(self, self._direction_names, self._direction_shapes, dtype,
                                  _parameter(self, "weight_ih"))

    def _parse(self, input, hx) -> tuple[Tensor, Tensor, Tensor, bool]:
        checks.check_input_tensor(input)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            hx = checks.check_state_pair(hx, "LSTMCell" if input.dim() == 2 else "LSTMCell (unbatched)")
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = (hx[0], hx[1]) if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))

        # torch's checks, in torch's order and words (its tests match them)
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        for idx, state in enumerate((h0, c0)):
            if state.shape[0] != x.shape[0]:
                raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden{idx} batch size {state.shape[0]}")
            if state.shape[1] != self.hidden_size:
                raise RuntimeError(
                    f"hidden{idx} has inconsistent hidden_size: got {state.shape[1]}, expected {self.hidden_size}")
            if state.dim() != 2:  # (an unbatched input with [1, B, H] states: torch fails later, in its kernel)
                raise RuntimeError(f"LSTMCell: for unbatched 1-D input, hx[{idx}] should be 1-D, got {state.dim() - 1}-D")
        cast = autocasting.cell_dtype(x, c0)  # (torch's dtypes under autocast: autocasting.py)
        if cast is not None and x.is_floating_point():
            x, h0, c0 = x.to(cast), h0.to(cast), c0.to(cast)
        elif x.dtype != self.weight_ih.dtype:
            raise RuntimeError(
                f"LSTMCell: input dtype ({x.dtype}) does not match weight dtype ({self.weight_ih.dtype}); "
                f"convert input: input.to({self.weight_ih.dtype}), or convert model: model.to({x.dtype})"
            )
        else:  # (a c0 of another dtype: torch promotes it with the gates)
            x, h0, c0 = autocasting.promoted_states(x, h0, c0, cell=True)
        checks.check_state_dtype_device((h0, c0), x, "LSTMCell")
        return x, h0, c0, batched
