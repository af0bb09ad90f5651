"""Ahead-of-time builds of the Triton kernels for an NVIDIA target, without a GPU.

Triton compiles a kernel to a cubin with its own ptxas; ``cuobjdump`` (shipped with Triton) reads
the registers and the local-memory stack each thread uses. That shows, on any machine, whether a
configuration compiles at all for Hopper (the interpreter, which the CPU tests use, runs Python and
accepts code the compiler refuses), whether it spills registers, and how much shared memory it
asks for (an H100 SM has 227 KB). ``benchmarks/triton_resources.py`` prints it for the grid of
shapes ``fastlstm bench --preset h100`` times; a CI test builds a few configurations.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from ..options import LSTMOptions
from . import triton_lstm
from .triton_lstm import Grid

H100_SMS = 132
SHARED_MEMORY_LIMIT = 227 * 1024  # per block, sm_90

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# pointer arguments by role: the input's dtype, the accumulation dtype, or a fixed one
_STORAGE = {"xg", "w_hh", "h_buf", "y", "gates_out", "dy", "gates", "dgates", "w_hr", "m_buf", "m_out", "dhp_out"}
_FIXED = {"lengths": "*i64", "offsets": "*i64", "counters": "*i32", "error": "*i32", "clip_out": "*i8",
          "cell_clip_out": "*i8", "clip_in": "*i8", "cell_clip_in": "*i8", "proj_clip_out": "*i8",
          "proj_clip_in": "*i8"}
_SCALARS_FP = {"clip", "cell_clip", "z_h", "z_c", "ln_eps", "proj_clip"}
_SCALARS_INT = {"T", "B", "step_begin", "step_end", "finish", "phase"}


@dataclass(frozen=True)
class Build:
    kind: str
    shared_bytes: int
    registers: int
    stack_bytes: int  # local memory per thread: nonzero means register spills

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_MEMORY_LIMIT


def _signature(kernel, dtype: torch.dtype, constants: dict) -> dict[str, str]:
    storage = _TRITON_TYPES[dtype]
    acc = _TRITON_TYPES[torch.float64 if dtype == torch.float64 else torch.float32]
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in _FIXED:
            signature[name] = _FIXED[name]
        elif name in _SCALARS_FP:
            signature[name] = "fp32"
        elif name in _SCALARS_INT:
            signature[name] = "i32"
        else:
            signature[name] = f"*{storage}" if name in _STORAGE else f"*{acc}"
    return signature


def build(kind: str, dtype: torch.dtype, hidden: int, grid: Grid, options: LSTMOptions | None = None, *,
          directions: int = 1, bias: bool = True, lengths: bool = False, packed: bool = False, proj: int = 0,
          arch: int = 90) -> Build:
    """Compile the ``kind`` kernel ("forward" or "backward") for ``sm_<arch>`` and read its resources.
    ``packed``: for a PackedSequence's rows (implies ``lengths``); ``proj``: the projection's size."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = options or LSTMOptions()
    lengths = lengths or packed
    ln = torch.empty(0) if options.layer_norm else None
    call = triton_lstm._Call(
        steps=1, batch=1, hidden=hidden, directions=directions, dtype=dtype,
        acc=torch.float64 if dtype == torch.float64 else torch.float32, lengths=torch.empty(0) if lengths else None,
        w_ih=None, w_hh=None, weight_masks=[], bias=None, peephole=torch.empty(0) if options.peephole else None,
        rec_mask=None, zh_mask=None, zc_mask=None, zoneout_h=2 if options.zoneout_h else 0,
        zoneout_c=2 if options.zoneout_c else 0, options=options, ln_ih=ln, ln_hh=ln, ln_cell_w=ln, ln_cell_b=ln,
        h_size=proj or hidden, w_hr=torch.empty(0) if proj else None,
        batch_sizes=torch.ones(1, dtype=torch.int64) if packed else None, offsets=torch.empty(0) if packed else None,
    )
    grid = call.fitted(kind, grid)
    constants = call.constants(grid) | call.layer_norm_constants(grid) | {"USE_BARRIER": grid.barrier}
    constants["DOT_IN_FP32"] = False
    if kind == "forward":
        kernel = triton_lstm._forward_kernel
        constants |= {"HAS_BIAS": bias, "NEEDS_H_PREV": call.zoneout_h != 0 or lengths, "SAVE": True}
    else:
        kernel = triton_lstm._backward_kernel
    # the launcher passes these; the jit decorator's wrapper is what ASTSource wants
    fn = getattr(kernel, "fn", kernel) if not hasattr(kernel, "arg_names") else kernel
    source = ASTSource(fn, _signature(fn, dtype, constants), constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": grid.num_warps})
    return Build(kind, compiled.metadata.shared, *_resources(compiled.asm["cubin"]))


def _resources(cubin: bytes) -> tuple[int, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", report).groups()
    return int(registers), int(stack)
