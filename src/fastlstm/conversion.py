"""One module converted between torch and fastlstm: ``LSTM.from_torch(module, **options)`` and
``module.to_torch()`` (the same for ``LSTMCell``), a mixin of both modules.

A conversion keeps the constructor arguments, the weights (the state_dict), the device, the dtype,
each parameter's ``requires_grad`` and the training mode. Options whose parameters torch does not
have (layer norm, peephole) start from their initial values. Back to torch only where every option
is torch's behaviour (``forget_bias`` only sets initial values, so it converts).
"""

from __future__ import annotations

import torch
from torch import nn

_INITIAL_VALUES_ONLY = ("forget_bias",)


def _check_torch_module(module, torch_class: type) -> None:
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(f"module: a TorchScript module ({module.original_name}) cannot be converted: its Python "
                        "class is gone; convert the eager model before scripting it")
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise TypeError(f"module: this torch.nn.{torch_class.__name__} has parametrizations (weight_norm, ...), "
                        "whose parametrized weights a conversion would freeze: convert it before registering them "
                        "(fastlstm's modules take parametrizations), or remove them first "
                        "(torch.nn.utils.parametrize.remove_parametrizations)")
    if type(module) is not torch_class:
        kind = f"a subclass of torch.nn.{torch_class.__name__} (it may change forward)" \
            if isinstance(module, torch_class) else f"not a torch.nn.{torch_class.__name__}"
        raise TypeError(f"module: {type(module).__name__} is {kind}; only torch.nn.{torch_class.__name__} itself converts")


def copy_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` with ``source``'s weights, ``requires_grad`` and training mode (``target``'s own extra
    parameters, of options torch does not have, keep their initial values)."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    extra = {name for name, _ in source.named_parameters()} ^ {name for name, _ in target.named_parameters()}
    if unexpected or not set(missing) <= extra:
        raise ValueError(f"module: its parameters do not match: missing {missing}, unexpected {unexpected}")
    sources = dict(source.named_parameters())
    for name, param in target.named_parameters():
        if name in sources:
            param.requires_grad_(sources[name].requires_grad)
    return target.train(source.training)


class Convertible:
    """``from_torch`` and ``to_torch`` for a module whose torch twin is ``TORCH_CLASS``, built from the
    attributes ``TORCH_ARGUMENTS`` (in the order of its constructor's positional arguments)."""

    TORCH_CLASS: type
    TORCH_ARGUMENTS: tuple[str, ...]

    @classmethod
    def from_torch(cls, module: nn.Module, **options):
        """The fastlstm module computing what ``module`` computes (with ``options`` added)."""
        _check_torch_module(module, cls.TORCH_CLASS)
        like = next(module.parameters())
        ours = cls(*(getattr(module, name) for name in cls.TORCH_ARGUMENTS), device=like.device, dtype=like.dtype,
                   **options)
        return copy_state(module, ours)

    def to_torch(self) -> nn.Module:
        """The ``torch.nn`` module computing what this one computes; a ValueError naming the option
        where one is not torch's behaviour."""
        options = {k: v for k, v in self.options.non_defaults().items() if k not in _INITIAL_VALUES_ONLY}
        if options:
            name, value = next(iter(options.items()))
            raise ValueError(f"{name}={value!r}: torch.nn.{self.TORCH_CLASS.__name__} has no such option, so this "
                             f"{type(self).__name__} cannot be converted to it")
        like = next(self.parameters())
        theirs = self.TORCH_CLASS(*(getattr(self, name) for name in self.TORCH_ARGUMENTS), device=like.device,
                                  dtype=like.dtype)
        return copy_state(self, theirs)
