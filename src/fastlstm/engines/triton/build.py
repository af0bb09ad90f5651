"""Ahead-of-time builds of the Triton kernels for an NVIDIA target, without a GPU.

Triton compiles a kernel to a cubin with its own ptxas; ``cuobjdump`` (shipped with Triton) reads
the registers and the local-memory stack each thread uses. That shows, on any machine, whether a
configuration compiles at all for Hopper (the interpreter, which the CPU tests use, runs Python and
accepts code the compiler refuses), whether it spills registers, and how much shared memory it
asks for (an H100 SM has 227 KB). ``benchmarks/triton_resources.py`` prints it for the grid of
shapes ``fastlstm bench --preset h100`` times; a CI test builds a few configurations. The kernels'
signatures come from their argument tables (:mod:`.arguments`), as their launches do.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from ...options import LSTMOptions
from .backward_kernel import BACKWARD, backward_kernel
from .forward_kernel import FORWARD, forward_kernel
from .grid import Grid
from .layer import ZONEOUT_CONSTANT, ZONEOUT_OFF, Call

H100_SMS = 132
SHARED_MEMORY_LIMIT = 227 * 1024  # per block, sm_90

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class Build:
    kind: str
    shared_bytes: int
    registers: int
    stack_bytes: int  # local memory per thread: nonzero means register spills

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_MEMORY_LIMIT


def described_call(dtype: torch.dtype, hidden: int, options: LSTMOptions, *, directions: int, varlen: bool,
                   proj: int) -> Call:
    """A :class:`~.layer.Call` that describes a CUDA launch without its tensors (placeholders where
    the kernels test for a tensor's presence)."""
    there = torch.empty(0)
    ln = there if options.layer_norm else None
    return Call(
        steps=1, batch=1, hidden=hidden, directions=directions, dtype=dtype,
        acc=torch.float64 if dtype == torch.float64 else torch.float32, h_size=proj or hidden, options=options,
        varlen=varlen, lengths=there if varlen else None, offsets=there if varlen else None,
        batch_sizes=torch.ones(1, dtype=torch.int64) if varlen else None, w_hh=None, bias=None,
        peephole=there if options.peephole else None, rec_mask=None, zh_mask=None, zc_mask=None,
        zoneout_h=ZONEOUT_CONSTANT if options.zoneout_h else ZONEOUT_OFF,
        zoneout_c=ZONEOUT_CONSTANT if options.zoneout_c else ZONEOUT_OFF,
        ln_hh=ln, ln_cell_w=ln, ln_cell_b=ln, w_hr=there if proj else None,
    )


def build(kind: str, dtype: torch.dtype, hidden: int, grid: Grid, options: LSTMOptions | None = None, *,
          directions: int = 1, bias: bool = True, varlen: bool = False, proj: int = 0, arch: int = 90) -> Build:
    """Compile the ``kind`` kernel ("forward" or "backward") for ``sm_<arch>`` and read its resources.
    ``varlen``: for sequences of different lengths; ``proj``: the projection's size."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = options or LSTMOptions()
    call = described_call(dtype, hidden, options, directions=directions, varlen=varlen, proj=proj)
    grid = call.fitted(kind, grid)
    constants = call.constants(grid) | {"USE_BARRIER": grid.barrier, "DOT_IN_FP32": False}
    if kind == "forward":
        kernel, arguments = forward_kernel, FORWARD
        constants |= {"HAS_BIAS": bias, "NEEDS_H_PREV": call.zoneout_h != ZONEOUT_OFF or varlen, "SAVE": True}
    else:
        kernel, arguments = backward_kernel, BACKWARD
    storage, acc = _TRITON_TYPES[dtype], _TRITON_TYPES[call.acc]
    gates = acc if options.layer_norm else storage
    signature = {a.name: a.triton_type(storage, acc, gates) for a in arguments}
    source = ASTSource(kernel, signature, constants)
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
