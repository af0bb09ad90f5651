"""The compiled kernels (``kernels.cpp`` / ``kernels.h``) and the ``Plan`` they read.

The C++ module is imported on first use. ``Plan`` is declared once, in ``kernels.cpp``
(``FASTLSTM_PLAN_FIELDS``); its ctypes mirror here is built from the module's own description of
the fields (name, kind, offset), so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor

_MODULE = "fastlstm.engines.cpu._kernels"
_KINDS = {"i": ctypes.c_int64, "d": ctypes.c_double, "p": ctypes.c_void_p}


def available() -> bool:
    """Whether the kernels were built (``pip install`` skips them without a compiler), without
    importing them."""
    return _spec_found()


@functools.cache
def _spec_found() -> bool:
    return importlib.util.find_spec(_MODULE) is not None


ISA_VARIABLE = "FASTLSTM_CPU_ISA"
"""The environment variable that lowers the kernels' instruction set: ``generic``, ``avx2``,
``avx512`` or ``avx512_bf16`` (one this machine runs; read when the kernels are first imported)."""


@functools.cache
def module() -> ModuleType:
    """The C++ module, imported on first use, its instruction set lowered by ``FASTLSTM_CPU_ISA``."""
    kernels = importlib.import_module(_MODULE)
    wanted = os.environ.get(ISA_VARIABLE)
    if wanted:
        try:
            kernels.set_instruction_set(wanted)
        except ValueError as error:
            raise ValueError(f"{ISA_VARIABLE}={wanted!r}: {error}; one of {', '.join(kernels.instruction_sets())}") \
                from None
    return kernels


@contextlib.contextmanager
def instruction_set(name: str):
    """Run the kernels with instruction set ``name`` (one of ``module().instruction_sets()``) inside
    the block: every path can be tested on a machine that runs it. Process-wide; not for threads."""
    previous = module().set_instruction_set(name)
    try:
        yield
    finally:
        module().set_instruction_set(previous)


@functools.cache
def plan_type() -> type[ctypes.Structure]:
    """``struct Plan`` as a ctypes Structure, from the module's field table."""
    fields = module().plan_fields()
    plan = type("Plan", (ctypes.Structure,), {"_fields_": [(name, _KINDS[kind]) for name, kind, _ in fields]})
    for name, _, offset in fields:
        if getattr(plan, name).offset != offset:  # pragma: no cover - a compiler that pads differently
            raise ImportError(f"fastlstm: Plan.{name} is at byte {offset} in C++ but {getattr(plan, name).offset} here")
    if ctypes.sizeof(plan) != module().plan_size():  # pragma: no cover
        raise ImportError("fastlstm: the C++ Plan and its ctypes mirror differ in size")
    return plan


def new_plan() -> ctypes.Structure:
    return plan_type()()


def copy_plan(plan: ctypes.Structure) -> ctypes.Structure:
    return plan_type().from_buffer_copy(plan)


def address(plan: ctypes.Structure) -> int:
    return ctypes.addressof(plan)


def pointer(t: Tensor | None) -> int | None:
    """A tensor's data pointer for a Plan field (None: a null pointer)."""
    return None if t is None else t.data_ptr()


def dense(t: Tensor | None) -> Tensor | None:
    """``t`` contiguous (a copy only if it is strided), for a pointer the kernels read."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def dtype_code(dtype: torch.dtype) -> int:
    """The Plan's ``dtype``: 0 float32, 1 float64."""
    return 0 if dtype == torch.float32 else 1


HALF_CODES = {torch.bfloat16: 1, torch.float16: 2}
"""The Plan's ``half`` (and ``convert``'s): the half precision a call's output, output gradient and
saved gates are stored in."""
