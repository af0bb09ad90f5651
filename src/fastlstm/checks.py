"""The modules' checks of their inputs (and of their parameters): torch's exception types, and
torch's words where torch has a check of its own (its tests match them); elsewhere a message that
names the argument and what it should be."""

from __future__ import annotations

import numbers
import operator
import warnings

import torch
from torch import Tensor


def check_lstm_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         proj_size) -> tuple[int, int]:
    """torch.nn.RNNBase's checks of an LSTM's arguments, in its order and with its exception types
    (it converts ``dropout`` first, and compares ``num_layers`` and ``proj_size`` before their types are
    known); ``(num_layers, proj_size)`` as Python ints (a zero-like ``proj_size``, 0.0 or False, is 0)."""
    float(dropout)  # (float()'s TypeError for None or a list, as torch's)
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
            f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
            stacklevel=3,  # (the line that built the module)
        )
    if not isinstance(bias, bool):
        raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero")
    if num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")
    return _integer(num_layers, "num_layers", bools=True), 0 if proj_size == 0 else _integer(proj_size, "proj_size")


def check_cell_sizes(input_size, hidden_size) -> tuple[int, int]:
    """An LSTMCell's sizes as Python ints. torch checks none: a negative size fails its weights'
    allocation (RuntimeError, kept), a zero one builds a cell that computes nothing (refused here)."""
    sizes = _integer(input_size, "input_size"), _integer(hidden_size, "hidden_size")
    for name, value in zip(("input_size", "hidden_size"), sizes):
        if value < 0:
            raise RuntimeError(f"{name} must be greater than zero, got {value}")
        if value == 0:
            raise ValueError(f"{name} must be greater than zero")
    return sizes


def _integer(value, name: str, bools: bool = False) -> int:
    """An integer argument as a Python int: torch takes NumPy's and 0-d integer tensors too (anything
    with ``__index__``; bools where ``bools``)."""
    if isinstance(value, bool) and not bools:
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}") from None


def check_input_tensor(input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input should be a Tensor or a PackedSequence, got {type(input).__name__}")


def check_state_pair(hx, module_name: str, packed: str | None = None) -> tuple[Tensor, Tensor]:
    """``hx`` must be ``(h_0, c_0)``; the exception types follow what torch raises for each misuse.
    ``module_name`` "LSTM", "LSTMCell", or "LSTMCell (unbatched)": a batched cell's ``lstm_cell``
    raises a TypeError for a tensor and a RuntimeError for another count; the unbatched cell indexes
    ``hx`` first (an IndexError for one element). An LSTM's padded input indexes ``hx[1]`` (an
    IndexError for one element or a tensor of one row) and then its kernel counts (a RuntimeError for
    more). ``packed``: an LSTM's PackedSequence input, "sorted" (no ``sorted_indices``: torch's kernel
    sees ``hx`` as given, a TypeError for a tensor, a RuntimeError for a count) or "unsorted" (torch
    permutes ``hx[0]`` and ``hx[1]`` first: IndexErrors). Where torch takes the first two of more
    (unbatched input, an unsorted PackedSequence) they are refused here too."""
    batched_cell = module_name == "LSTMCell"
    count = len(hx) if isinstance(hx, (tuple, list)) else None
    if isinstance(hx, Tensor):
        if module_name == "LSTM":
            padded = IndexError if len(hx) < 2 else RuntimeError
            error = {"sorted": TypeError, "unsorted": IndexError}.get(packed, padded)
        else:
            error = TypeError if batched_cell else ValueError
        raise error(f"{module_name}: hx should be a tuple (h_0, c_0) of two tensors, got a single Tensor")
    if count is None:
        raise TypeError(f"{module_name}: hx should be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
    if count != 2:
        if module_name == "LSTM":
            error = IndexError if count < 2 and packed != "sorted" else RuntimeError
        else:
            error = RuntimeError if batched_cell else IndexError if count < 2 else ValueError
        raise error(f"{module_name}: hx should be a tuple (h_0, c_0) of two tensors, got {count} element(s)")
    for idx, value in enumerate(hx):
        if not isinstance(value, Tensor):
            raise TypeError(f"{module_name}: hx[{idx}] should be a Tensor, got {type(value).__name__}")
    return hx[0], hx[1]


def check_state_dtype_device(states: tuple[Tensor, Tensor], x: Tensor, module_name: str,
                             c_dtype: torch.dtype | None = None) -> None:
    """``(h_0, c_0)`` in the input's dtype (``c_0`` in ``c_dtype`` where given) and on its device."""
    for idx, state in enumerate(states):
        if state.dtype != (c_dtype if idx == 1 and c_dtype is not None else x.dtype):
            raise RuntimeError(
                f"{module_name}: hx[{idx}] has dtype {state.dtype} but input has dtype {x.dtype}; they must match"
            )
        if state.device != x.device:
            raise RuntimeError(
                f"{module_name}: hx[{idx}] is on {state.device} but input is on {x.device}; they must match"
            )


def check_lengths(lengths, steps: int, batch: int, batched: bool) -> Tensor:
    """``lengths`` as int64 ``[B]`` on the CPU, or a TypeError/ValueError that names it."""
    if not isinstance(lengths, Tensor):
        raise TypeError(f"lengths should be an int64 Tensor of shape [batch], got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"lengths should be an int64 Tensor, got dtype {lengths.dtype}")
    expected = (batch,) if batched else ()
    if tuple(lengths.shape) != expected and not (not batched and tuple(lengths.shape) == (1,)):
        raise ValueError(f"lengths should have shape {list(expected)} (one length per sequence of the input), "
                         f"got {list(lengths.shape)}")
    lengths = lengths.reshape(batch).to(device="cpu", dtype=torch.int64)
    if torch.compiler.is_compiling():  # (traced, the lengths are data: the graph checks them when it runs)
        return torch.ops.fastlstm.checked_lengths(lengths, steps)
    _check_length_bounds(lengths, steps)
    return lengths


def _check_length_bounds(lengths: Tensor, steps: int) -> None:
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
        raise ValueError(f"lengths should be between 0 and the input's {steps} steps, got {lengths.tolist()}")


@torch.library.custom_op("fastlstm::checked_lengths", mutates_args=())
def checked_lengths(lengths: Tensor, steps: int) -> Tensor:
    """``lengths [B]`` int64, checked as :func:`check_lengths` checks them in eager mode (a ValueError
    that names them): the check inside a compiled or exported graph, where they are data."""
    _check_length_bounds(lengths, steps)
    return lengths.clone()


@checked_lengths.register_fake
def _(lengths, steps):
    return torch.empty_like(lengths)


def refuse_parameter(module_name: str, name: str, value, shape: tuple, like: Tensor) -> None:
    """Raise for parameter ``name`` (``value``), which should have ``shape`` and the dtype and device of
    ``like`` (the module's first ``weight_ih``): a weight replaced or assigned through ``.data``."""
    where = f"{module_name}: parameter {name}"
    if not isinstance(value, Tensor):  # (torch's type: its kernel's argument parser refuses None)
        raise TypeError(f"{where} is {type(value).__name__}, expected a tensor of shape {list(shape)}")
    if value.shape != shape:
        raise RuntimeError(f"{where} has shape {list(value.shape)}, expected {list(shape)}")
    if value.dtype != like.dtype:
        raise RuntimeError(f"{where} has dtype {value.dtype}, expected {like.dtype} (every parameter has the dtype "
                           "of the first weight_ih: convert it, or the module with .to(dtype))")
    raise RuntimeError(f"{where} is on {value.device}, expected {like.device} (every parameter is on the device "
                       "of the first weight_ih: move it, or the module with .to(device))")
