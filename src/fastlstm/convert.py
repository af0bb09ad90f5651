"""Conversion of fastlstm parameters to the inputs of ONNX's ``LSTM`` operator.

This is the only module that knows a gate layout other than torch's. fastlstm (like torch) stacks
gates as ``i, f, g, o`` and peepholes as ``i, f, o``; ONNX stacks gates as ``i, o, f, c`` (``c`` is
torch's ``g``) and peepholes as ``i, o, f``.

Shape legend: ``D`` directions, ``H`` hidden size, ``I`` layer input size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import LSTMOptions
from .weights import parameter_name

ONNX_ACTIVATIONS = {
    "sigmoid": "Sigmoid",
    "hard_sigmoid": "HardSigmoid",  # alpha 0.2, beta 0.5: ONNX's defaults
    "tanh": "Tanh",
    "softsign": "Softsign",
    "relu": "Relu",
}

_GATES_TO_ONNX = (0, 3, 1, 2)  # torch chunks (i, f, g, o) -> ONNX order (i, o, f, c)
_PEEPHOLES_TO_ONNX = (0, 2, 1)  # fastlstm chunks (i, f, o) -> ONNX order (i, o, f)


def _reorder(t: Tensor, order: tuple[int, ...]) -> Tensor:
    """Permute the equal chunks of ``t``'s first dimension into ``order``."""
    chunks = t.chunk(len(order), dim=0)
    return torch.cat([chunks[k] for k in order], dim=0)


def check_onnx_expressible(module) -> None:
    """Raise ``ValueError`` naming the first setting of ``module`` that ONNX's LSTM cannot express."""
    options: LSTMOptions = module.options
    refused = {
        "proj_size": module.proj_size > 0,
        "layer_norm": options.layer_norm,
        "zoneout": options.has_zoneout,
        "recurrent_dropout": options.recurrent_dropout > 0,
        "weight_drop": options.weight_drop > 0,
        "cell_clip": options.cell_clip is not None,
    }
    for name, present in refused.items():
        if present:
            raise ValueError(f"ONNX's LSTM operator cannot express {name}; export a module without it")


def onnx_lstm_inputs(module, layer: int = 0) -> dict[str, Tensor]:
    """The weight inputs of an ONNX ``LSTM`` node equivalent to one layer of ``module``.

    Args:
        module: a :class:`fastlstm.LSTM`.
        layer: which layer, ``0 <= layer < module.num_layers``.

    Returns:
        ``{"W": [D, 4H, I], "R": [D, 4H, H], "B": [D, 8H]}`` plus ``"P": [D, 3H]`` if the module
        has peepholes; detached tensors in the module's dtype, gates in ONNX's order ``i, o, f, c``
        (peepholes ``i, o, f``). ``B`` is ``[Wb, Rb]`` per direction, zeros when ``bias=False``.
        The node's ``activations``, ``clip``, ``input_forget`` and ``direction`` attributes come
        from the module's options (see :func:`onnx_activation_names`).

    Raises:
        ValueError: if the module uses an option ONNX cannot express, or ``layer`` is out of range.
    """
    check_onnx_expressible(module)
    if not 0 <= layer < module.num_layers:
        raise ValueError(f"layer should be in [0, {module.num_layers}), got {layer}")
    directions = (False, True) if module.bidirectional else (False,)

    def stack(field: str, order: tuple[int, ...]) -> Tensor:
        return torch.stack(
            [_reorder(getattr(module, parameter_name(field, layer, rev)).detach(), order) for rev in directions]
        )

    inputs = {"W": stack("weight_ih", _GATES_TO_ONNX), "R": stack("weight_hh", _GATES_TO_ONNX)}
    if module.bias:
        inputs["B"] = torch.cat([stack("bias_ih", _GATES_TO_ONNX), stack("bias_hh", _GATES_TO_ONNX)], dim=1)
    else:
        w = inputs["W"]
        inputs["B"] = w.new_zeros(len(directions), 2 * w.shape[1])
    if module.options.peephole:
        inputs["P"] = stack("weight_peephole", _PEEPHOLES_TO_ONNX)
    return inputs


def onnx_activation_names(options: LSTMOptions, num_directions: int) -> list[str]:
    """ONNX's ``activations`` attribute: the (gate, cell input, cell output) names, once per direction.

    ``HardSigmoid`` means ONNX's default ``alpha=0.2, beta=0.5``, fastlstm's ``hard_sigmoid``.
    """
    return [ONNX_ACTIVATIONS[name] for name in options.activations] * num_directions
