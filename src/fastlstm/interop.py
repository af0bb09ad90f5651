"""fastlstm and other libraries' models: :func:`convert_lstms` converts every LSTM of a model.

(Weight import and export for Keras, TF1, ONNX, haste and MATLAB layouts belong here too: issue 15.)
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import LSTM, LSTMCell

_TO_FASTLSTM = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}


def convert_lstms(model: nn.Module, *, to: str = "fastlstm", **options) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` of ``model`` (recursively, in place) by
    the fastlstm module with the same weights, device, dtype, ``requires_grad`` and training mode,
    ``options`` (keywords of ``fastlstm.LSTM``) applied to each; with ``to="torch"``, the fastlstm
    modules by torch's (a ValueError naming the option and the module's path where one is not
    torch's behaviour). A module shared by several parents stays shared. Returns ``model`` (or, if
    ``model`` is itself an LSTM, its conversion), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if to not in ("fastlstm", "torch"):
        raise ValueError(f"to should be 'fastlstm' or 'torch', got {to!r}")
    if options and to == "torch":
        raise ValueError(f"options apply when converting to fastlstm, got {sorted(options)} with to='torch'")
    converted: dict[int, nn.Module] = {}
    replacements: list[tuple[nn.Module, str, nn.Module]] = []

    def convert(module: nn.Module, path: str) -> nn.Module:
        if id(module) not in converted:
            new = converted[id(module)] = _convert_one(module, path or "model", to, options)
            if new is module:
                for name, child in module.named_children():
                    replacement = convert(child, f"{path}.{name}" if path else name)
                    if replacement is not child:
                        replacements.append((module, name, replacement))
        return converted[id(module)]

    result = convert(model, "")
    for parent, name, replacement in replacements:  # (only once every module converted: all or nothing)
        setattr(parent, name, replacement)
    return result


def _convert_one(module: nn.Module, path: str, to: str, options: dict) -> nn.Module:
    """``module`` converted, or ``module`` itself where it is not an LSTM (its children then are)."""
    if isinstance(module, torch.jit.ScriptModule):
        if any(getattr(m, "original_name", "") in ("LSTM", "LSTMCell") for m in module.modules()):
            raise TypeError(f"{path}: a TorchScript module holding an LSTM cannot be converted (its Python classes are "
                            "gone); convert the eager model before scripting it")
        return module
    try:
        if to == "fastlstm":
            target = next((ours for theirs, ours in _TO_FASTLSTM.items() if isinstance(module, theirs)), None)
            return module if target is None else target.from_torch(module, **options)
        return module.to_torch() if isinstance(module, (LSTM, LSTMCell)) else module
    except (TypeError, ValueError) as error:
        raise type(error)(f"{path}: {error}") from error
