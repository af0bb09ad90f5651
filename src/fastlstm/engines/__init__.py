"""The engines, and how ``backend=`` picks one.

Every engine computes one layer (all directions) in the rows layout of :mod:`fastlstm.packing`:

* ``reference`` (:mod:`fastlstm.engines.reference`): the specification's time loop in plain torch;
  any device and dtype, the fallback of ``"auto"``;
* ``cpu`` (:mod:`fastlstm.engines.cpu`): compiled C++ for float32 and float64 CPU tensors, and
  bfloat16 / float16 ones computed in float32;
* ``triton`` (:mod:`fastlstm.engines.triton`): persistent Triton kernels for CUDA tensors.

The compiled engines implement the contract of :mod:`fastlstm.engines.contract` and run behind its
one custom op. An engine's package is imported the first time a call selects it, so ``import
fastlstm`` imports neither Triton nor the C++ module.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
from types import ModuleType

import torch

from ..options import LSTMOptions

# Priority order for "auto": the first engine that supports the call computes it.
BACKENDS = ("auto", "cpu", "triton", "reference")


_LOADED: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The engine's module, imported on first use (import statements, which torch.compile traces:
    there the cache is not read, so that a restarted analysis, after the first pass imported the
    engine, takes the same path as that pass)."""
    if not torch.compiler.is_compiling():
        engine = _LOADED.get(name)
        if engine is not None:
            return engine
    if name == "cpu":
        from . import cpu as engine
    elif name == "triton":
        from . import triton as engine
    else:
        from . import reference as engine
    _LOADED[name] = engine
    return engine


def _cpu_supports(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return False
    return _installed("fastlstm.engines.cpu._kernels")


def _triton_supports(device: torch.device, dtype: torch.dtype, *, explicit: bool) -> bool:
    """CUDA tensors in float16, bfloat16 and float32; asked for by name, also CPU tensors under
    Triton's interpreter (``TRITON_INTERPRET=1``, the tests)."""
    on_device = device.type == "cuda" or (explicit and device.type == "cpu" and _interpreting())
    if not on_device or dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False
    if dtype == torch.float64 and device.type == "cuda":
        return False
    return _installed("triton")


def constant_result(fn):
    """``torch.compiler.assume_constant_result`` (dynamo calls ``fn`` eagerly and keeps its result as
    a constant of the graph), without importing ``torch._dynamo`` when fastlstm is imported (it
    imports Triton): the decorator sets this one mark (tests check that torch's still does)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_result
def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (the C++ kernels are built at install if a compiler is
    there; Triton is an optional dependency), without importing it."""
    return _found(module)


@functools.cache
def _found(module: str) -> bool:
    package, _, name = module.rpartition(".")
    if package.startswith("fastlstm."):  # (find_spec would import the engine's package)
        directory = os.path.join(os.path.dirname(__file__), *package.split(".")[2:])
        return any(os.path.exists(os.path.join(directory, name + suffix))
                   for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    return importlib.util.find_spec(module) is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(name: str, device: torch.device, dtype: torch.dtype, options: LSTMOptions | None = None, *,
             explicit: bool = False) -> bool:
    """Whether engine ``name`` computes calls on ``device`` in ``dtype`` (without importing it)."""
    if name == "cpu":
        return _cpu_supports(device, dtype)
    if name == "triton":
        return _triton_supports(device, dtype, explicit=explicit)
    return True


def check_backend(backend) -> str:
    """Validate a user's ``backend=`` argument."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend should be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


_SELECTED: dict[tuple, str] = {}


def select_engine(backend: str, device: torch.device, dtype: torch.dtype, options: LSTMOptions | None) -> str:
    """The name of the engine that computes a call: the named one, or for ``"auto"`` the first that
    supports it. (No engine's support depends on the options yet; they are in the signature for
    the day one does.)"""
    key = (backend, device, dtype)
    name = _SELECTED.get(key)
    if name is None:
        name = _SELECTED[key] = _select(backend, device, dtype, options)
    return name


def _select(backend: str, device: torch.device, dtype: torch.dtype, options: LSTMOptions | None) -> str:
    if backend == "auto":
        return next(name for name in BACKENDS[1:] if supports(name, device, dtype, options))
    if not supports(check_backend(backend), device, dtype, options, explicit=True):
        raise ValueError(
            f"backend={backend!r} does not support device {device} with dtype {dtype} and these options; "
            "use backend='auto' or 'reference'"
        )
    return backend
