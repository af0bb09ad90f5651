"""Kernel parameters, declared once.

A kernel's parameter list is a table of :class:`Argument` (name, kind, shape); :func:`kernel` writes
it into the kernel's signature (the decorated function is written with one placeholder parameter,
``ARGUMENTS``), the launcher passes every argument by name, and the ahead-of-time build check
(:mod:`.build`) derives Triton's signature from the same table. So no list of the kernels'
arguments is written twice.

Kinds: pointers to the layer's ``storage`` dtype, to the ``acc``umulation dtype (float32, or float64
for float64 layers), to the ``gates`` dtype (the input gates: ``acc`` under layer norm, else
``storage``) or to a fixed dtype (``i64``, ``i32``, ``i8``); runtime scalars ``int`` (never
specialised, so that new lengths do not recompile) and ``float``; and ``constexpr`` flags and sizes.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import linecache
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

import triton

_POINTERS = {"storage", "acc", "gates", "i64", "i32", "i8"}


class Argument(NamedTuple):
    name: str
    kind: str  # see the module docstring
    shape: str = ""  # and what it holds, for the reader

    def triton_type(self, storage: str, acc: str, gates: str) -> str:
        """The type in Triton's signature (for the ahead-of-time build)."""
        if self.kind in _POINTERS:
            return "*" + {"storage": storage, "acc": acc, "gates": gates}.get(self.kind, self.kind)
        return {"int": "i32", "float": "fp32", "constexpr": "constexpr"}[self.kind]


def constexpr(*names: str) -> list[Argument]:
    return [Argument(name, "constexpr") for name in names]


def names(arguments: Sequence[Argument], kind: str | None = None) -> list[str]:
    return [a.name for a in arguments if kind is None or a.kind == kind]


_GENERATED = itertools.count()


def kernel(arguments: Sequence[Argument]):
    """Decorator: the function's placeholder parameter list becomes ``arguments`` (constexprs
    annotated ``tl.constexpr``), then ``triton.jit`` with the ``int`` scalars not specialised.

    The function is re-created from its source with the real signature (Triton reads a kernel's
    source and signature); the source is registered under a name of its own so that Triton, the
    interpreter and tracebacks can read it, with the body on the same line numbers as in its file."""

    def build(fn):
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
        definition = tree.body[0]
        (placeholder,) = [a.arg for a in definition.args.args]
        parameters = ", ".join(f"{a.name}: tl.constexpr" if a.kind == "constexpr" else a.name for a in arguments)
        lines = source.splitlines()
        start = definition.lineno - 1  # the `def` line (after the decorators)
        lines[start] = lines[start].replace(f"({placeholder})", f"({parameters})", 1)
        first_line = fn.__code__.co_firstlineno  # of the decorators, in the file
        generated = "\n" * (first_line - 1 + start) + "\n".join(lines[start:]) + "\n"
        filename = f"<fastlstm {fn.__module__}.{fn.__name__} #{next(_GENERATED)}>"
        linecache.cache[filename] = (len(generated), None, generated.splitlines(True), filename)
        # defined in the module's own namespace, so that it sees the module's globals as they are
        # when it runs (the decorator's result then takes the name)
        exec(compile(generated, filename, "exec"), fn.__globals__)
        return triton.jit(fn.__globals__[fn.__name__], do_not_specialize=names(arguments, "int"))

    return build


# The constants both kernels take: sizes, dtypes, options, and the grid's split (Grid).
SHARED_CONSTANTS = constexpr(
    "H", "D", "H_PAD", "HB", "BB", "ACC", "PRECISION", "DOT_IN_FP32", "ACT_GATE", "ACT_IN", "ACT_OUT", "PEEPHOLE",
    "HAS_CLIP", "COUPLED", "HAS_CELL_CLIP", "ZONEOUT_H", "ZONEOUT_C", "HAS_REC_MASK", "VARLEN", "W_AS_A", "K_CHUNK",
    "LAYER_NORM", "NP_PAD", "LN_SLOTS", "PROJ", "P", "P_PAD", "PB", "PROJ_K", "HAS_PROJ_CLIP", "USE_BARRIER",
)
