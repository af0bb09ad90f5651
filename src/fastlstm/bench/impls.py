"""What a benchmark row runs: the implementations (torch's module, fastlstm's engines, the eager
loop) and their inputs. Shape legend as in :mod:`fastlstm.bench`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .. import engines
from ..modules import LSTM, LSTMCell
from ..options import make_options
from ..weights import parameter_name
from .eager import EagerCell, EagerLSTM
from .presets import Config

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
FWD, FWD_BWD = "fwd", "fwd+bwd"
TORCH, ENGINE, EAGER = "torch", "engine", "eager"


@dataclass
class Inputs:
    """One row's inputs, in one dtype.

    ``x [T, B, I]`` (cell: ``[B, I]``) and, for packed rows, ``packed`` (the same values packed,
    its ``data [N, I]`` a separate leaf) both require grad; ``h0 [L*D, B, H_out]``,
    ``c0 [L*D, B, H]`` (cell: ``[B, H]``) do not. ``lengths [B]`` is on the device.
    """

    x: Tensor
    h0: Tensor
    c0: Tensor
    lengths: Tensor | None = None
    packed: PackedSequence | None = None

    def to(self, dtype: torch.dtype) -> Inputs:
        """The same values in another dtype, as fresh leaves."""
        x = self.x.detach().to(dtype).requires_grad_()
        packed = None
        if self.packed is not None:
            p = self.packed
            data = p.data.detach().to(dtype).requires_grad_()
            packed = PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        return Inputs(x, self.h0.to(dtype), self.c0.to(dtype), self.lengths, packed)


@dataclass
class Impl:
    """One implementation of a row: torch's module, a fastlstm module on one engine, or the eager loop."""

    name: str
    role: str  # TORCH, ENGINE or EAGER
    module: nn.Module
    config: Config
    auto: bool = False  # whether backend="auto" picks this engine for the row

    @property
    def takes_packed(self) -> bool:
        return self.config.packed and self.role != EAGER

    def call(self, inputs: Inputs) -> tuple[Tensor | PackedSequence, Tensor, Tensor]:
        """Run the module: ``(output, h_n, c_n)``; ``output`` is packed when the input is. An
        autocast row's forward runs under ``torch.autocast`` (the backward after it, outside)."""
        if self.config.autocast:
            with torch.autocast(inputs.x.device.type, dtype=DTYPES[self.config.dtype]):
                return self._call(inputs)
        return self._call(inputs)

    def _call(self, inputs: Inputs) -> tuple[Tensor | PackedSequence, Tensor, Tensor]:
        hx = (inputs.h0, inputs.c0)
        if self.config.kind == "cell":
            h, c = self.module(inputs.x, hx)
            return h, h, c
        if self.role == EAGER:
            y, (h, c) = self.module(inputs.x, hx, inputs.lengths)
        else:
            y, (h, c) = self.module(inputs.packed if self.takes_packed else inputs.x, hx)
        return y, h, c

    def input_leaf(self, inputs: Inputs) -> Tensor:
        return inputs.packed.data if self.takes_packed else inputs.x

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters under torch's / fastlstm's names, so grads compare across implementations."""
        if self.role != EAGER:
            return dict(self.module.named_parameters())
        return _eager_parameters(self.module, self.config)

    def clear_grads(self, inputs: Inputs) -> None:
        self.module.zero_grad(set_to_none=True)
        self.input_leaf(inputs).grad = None


def _eager_parameters(module: nn.Module, config: Config) -> dict[str, nn.Parameter]:
    if config.kind == "cell":
        return module.torch_named_parameters()
    named = {}
    for k, cell in enumerate(module.cells):
        layer, direction = divmod(k, config.directions)
        for fieldname, p in cell.torch_named_parameters().items():
            named[parameter_name(fieldname, layer, direction == 1)] = p
    return named


def _module_kwargs(config: Config) -> dict[str, object]:
    if config.kind == "cell":
        return {}
    return {"num_layers": config.layers, "bidirectional": config.bidirectional, "proj_size": config.proj_size}


def torch_module(config: Config, device=None, dtype=None) -> nn.Module:
    """torch.nn.LSTM (or LSTMCell) at the row's shape, without options; ``dtype`` the row's storage
    dtype unless given."""
    dtype = DTYPES[config.storage_dtype] if dtype is None else dtype
    if config.kind == "cell":
        return torch.nn.LSTMCell(config.input_size, config.hidden, device=device, dtype=dtype)
    return torch.nn.LSTM(config.input_size, config.hidden, device=device, dtype=dtype, **_module_kwargs(config))


def fastlstm_module(config: Config, device=None, dtype=None, backend: str = "auto", package=None) -> nn.Module:
    """fastlstm's LSTM (or LSTMCell) at the row's shape with its options, from ``package`` (fastlstm
    unless given: ``benchmarks/before_after.py`` passes an earlier copy); dtype as :func:`torch_module`."""
    dtype = DTYPES[config.storage_dtype] if dtype is None else dtype
    cls = (LSTMCell if config.kind == "cell" else LSTM) if package is None else \
        (package.LSTMCell if config.kind == "cell" else package.LSTM)
    return cls(config.input_size, config.hidden, device=device, dtype=dtype, backend=backend,
               **_module_kwargs(config), **config.options_dict)


def _eager_module(config: Config, device, dtype) -> nn.Module:
    if config.kind == "cell":
        module = EagerCell(config.input_size, config.hidden, **config.options_dict)
    else:
        module = EagerLSTM(config.input_size, config.hidden, **_module_kwargs(config), **config.options_dict)
    return module.to(device=device, dtype=dtype)


def _load_named(target: dict[str, nn.Parameter], source: dict[str, nn.Parameter]) -> None:
    if target.keys() != source.keys():
        raise AssertionError(f"parameter names differ: {sorted(target.keys() ^ source.keys())}")
    with torch.no_grad():
        for name, p in target.items():
            p.copy_(source[name])


def engines_for(config: Config, device: torch.device, requested: list[str] | None = None) -> list[str]:
    """The fastlstm engines a row times, in ``fastlstm.engines.BACKENDS`` priority order.

    By default: every engine other than the reference that supports the row, or the reference
    when none does (it is then what ``backend="auto"`` runs). ``requested`` names them instead,
    still keeping only those that support the row. Option rows always add the reference: it is
    their "before" baseline and its float64 twin is their correctness oracle.
    """
    opts = layer_options(config)
    dtype = DTYPES[config.dtype]
    supported = [name for name in engines.BACKENDS[1:] if engines.supports(name, device, dtype, opts)]
    if requested is not None:
        chosen = [name for name in supported if name in requested]
    else:
        chosen = [name for name in supported if name != "reference"]
        if not chosen:
            chosen = ["reference"]
    if config.options and "reference" not in chosen:
        chosen.append("reference")
    return chosen


def layer_options(config: Config):
    return make_options(has_bias=True, has_projection=config.proj_size > 0, **config.options_dict)


def build_impls(config: Config, device: torch.device, requested: list[str] | None = None) -> list[Impl]:
    """torch first (the baseline of the ratios), then the engines, then (option rows) the eager loop.

    Plain rows give torch's weights to every module. Option rows have no torch weights that fit, so
    the first engine's initialisation goes to the other engines and the eager loop, and torch keeps
    its own (it only gives the plain model's time at the same shape).
    """
    auto = engines.select_engine("auto", device, DTYPES[config.dtype], layer_options(config))
    dtype = DTYPES[config.storage_dtype]
    torch_name = "torch.nn.LSTMCell" if config.kind == "cell" else "torch.nn.LSTM"
    impls = [Impl(torch_name, TORCH, torch_module(config, device, dtype), config)]
    impls += [
        Impl(f"fastlstm:{name}", ENGINE, fastlstm_module(config, device, dtype, name), config, auto=name == auto)
        for name in engines_for(config, device, requested)
    ]
    if config.options:
        impls.append(Impl("eager loop", EAGER, _eager_module(config, device, dtype), config))
    sharing = [impl for impl in impls if impl.role != TORCH or not config.options]
    for impl in sharing[1:]:
        _load_named(impl.named_parameters(), sharing[0].named_parameters())
    return impls


def make_inputs(config: Config, device: torch.device, generator: torch.Generator) -> Inputs:
    """Random inputs and initial states; lengths (packed rows) uniform in ``[T/4, T]``, seeded."""
    dtype = DTYPES[config.storage_dtype]
    h_out = config.proj_size or config.hidden

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if config.kind == "cell":
        return Inputs(randn(config.batch, config.input_size).requires_grad_(), randn(config.batch, h_out),
                      randn(config.batch, config.hidden))
    states = config.layers * config.directions
    # A non-zero initial state makes weight_hh matter from the first step (T = 1 rows included).
    inputs = Inputs(
        randn(config.steps, config.batch, config.input_size).requires_grad_(),
        randn(states, config.batch, h_out),
        randn(states, config.batch, config.hidden),
    )
    if config.packed:
        low = max(1, config.steps // 4)
        lengths = torch.randint(low, config.steps + 1, (config.batch,), generator=generator)
        # The longest sequence spans all T steps, so padded (eager) and packed runs step alike.
        lengths[0] = config.steps
        packed = pack_padded_sequence(inputs.x.detach(), lengths, enforce_sorted=False)
        inputs.packed = PackedSequence(packed.data.requires_grad_(), packed.batch_sizes, packed.sorted_indices,
                                       packed.unsorted_indices)
        inputs.lengths = lengths.to(device)
    return inputs


def trains(impl: Impl, train: bool) -> bool:
    """Whether a forward+backward run is in train mode. torch's baseline is a plain LSTM without
    dropout, the same function in either mode; its backward runs in train mode, since cuDNN refuses
    a backward in eval mode. (Forward-only runs are in eval mode, torch's too.)"""
    return train or impl.role == TORCH
