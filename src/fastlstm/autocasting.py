"""The dtypes torch's LSTM and LSTMCell compute in and return under ``torch.autocast``, and with a
cell state of another dtype than the input's, which the modules follow (``docs/equations.md``,
section 9).

torch.nn.LSTM under autocast casts every input and output to the autocast dtype where it runs a
fused kernel (cuDNN; on the CPU, oneDNN: :func:`torch_runs_onednn`). Elsewhere on the CPU (a
packed input of unequal lengths, a projection, an input dtype oneDNN refuses on that CPU), and
always for an LSTMCell on the CPU (the cell is on none of the CPU's autocast lists), only the
products are cast: the pointwise math promotes them with the cell state, so ``c`` (and ``h``,
unless a projection's product makes it) comes back in ``promote(autocast dtype, c_0's dtype)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weights import accumulation_dtype


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype enabled for ``device``'s type, or None."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except RuntimeError:  # a device type without autocast (meta): torch asks nothing of it either
        pass
    return None


def torch_runs_onednn(x: Tensor, batch_sizes: Tensor | None, proj_size: int) -> bool:
    """Whether torch.nn.LSTM runs a CPU call on oneDNN (ATen's ``use_mkldnn`` in RNN.cpp: without a
    projection, oneDNN on, an input dtype that oneDNN takes on this CPU; unpacked, or packed with every
    sequence of one length, ``batch_sizes`` all equal, which torch runs as a padded batch)."""
    if proj_size or x.numel() == 0 or not (torch.backends.mkldnn.is_available()
                                           and torch.backends.mkldnn.enabled):
        return False
    if batch_sizes is not None and not bool((batch_sizes == batch_sizes[0]).all()):
        return False
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if x.dtype == torch.float16:
        return not torch.is_grad_enabled() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return x.dtype == torch.float32


def lstm_dtypes(x: Tensor, c0: Tensor, batch_sizes: Tensor | None,
                proj_size: int) -> tuple[torch.dtype | None, torch.dtype | None]:
    """Under autocast, ``(the dtype an LSTM call computes in, the dtype of its output and h_n where it
    differs from c_n's)``; ``(None, None)`` without autocast (or for a non-floating input). ``x`` the
    input (a packed one's data), ``batch_sizes`` a packed input's (else None), ``c0`` the initial cell
    state (zeros of the input's dtype if not given). A padded input with ``lengths=`` takes the padded
    input's dtypes: torch has no such call, and its dtypes then do not depend on the lengths' values."""
    cast = autocast_dtype(x.device)
    if cast is None or not x.is_floating_point():
        return None, None
    if x.device.type != "cpu" or torch_runs_onednn(x, batch_sizes, proj_size):
        return cast, None
    return torch.promote_types(cast, c0.dtype), (cast if proj_size else None)


def cell_dtype(x: Tensor, c0: Tensor) -> torch.dtype | None:
    """Under autocast, the dtype an LSTMCell call computes in (its outputs' too); None without it."""
    cast = autocast_dtype(x.device)
    if cast is None or x.device.type != "cpu":
        return cast
    return torch.promote_types(cast, c0.dtype)


def promoted_states(x: Tensor, h0: Tensor, c0: Tensor, cell: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Outside autocast, ``(x, h0, c0)`` in the dtype torch computes in when ``c0``'s dtype (floating,
    integer or bool) is not the input's (``h0`` must be the input's: torch multiplies it by the
    weights). torch's pointwise math promotes the cell state with the gates: an LSTMCell returns ``h'``
    and ``c'`` in ``promote(x, c0)``, and an LSTM takes a ``c0`` that promotes into the input's dtype
    (float32 or a half precision under float64, a half precision under float32) in every path. A wider
    ``c0`` under an LSTM is returned as it is: a float32 one under a half-precision input is kept
    (:func:`carries_float32_cell`), others the dtype check refuses (torch's result depends on its path:
    oneDNN refuses them, its loop fails at the second step's product). Anything else is returned as it
    is, for the checks to refuse."""
    if c0.dtype == x.dtype or h0.dtype != x.dtype or c0.device != x.device \
            or not x.is_floating_point() or c0.is_complex():
        return x, h0, c0
    dtype = torch.promote_types(x.dtype, c0.dtype)
    if dtype != x.dtype and not cell:
        return x, h0, c0  # (a float32 c0 under a half-precision input is taken as it is: carries_float32_cell)
    return x.to(dtype), h0.to(dtype), c0.to(dtype)


def carries_float32_cell(x: Tensor, c0: Tensor) -> bool:
    """Whether an LSTM call keeps a float32 cell state under a half-precision input: the layers compute
    in float32 anyway, so ``c0`` is read as it is and ``c_n`` comes back in float32 (``y`` and ``h_n`` in
    the input's dtype), as torch's oneDNN LSTM returns them for a bfloat16 input with a float32 ``c_0``
    (its other paths fail at the second step); a stream's state then loses nothing between chunks."""
    return c0.dtype != x.dtype and c0.dtype == accumulation_dtype(x.dtype)
