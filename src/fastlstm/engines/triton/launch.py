"""Launching a kernel for every step of a layer: one persistent launch, or one launch per step (and
per phase of a step), with the fallback from the first to the second."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from .arguments import names
from .grid import Grid, per_step_grid
from .helpers import ALL_PHASES

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older layouts of triton
    OutOfResources = None

VERIFIED: set[tuple] = set()
DOES_NOT_FIT: set[tuple] = set()
# The barrier's error flag costs a host sync to read: by default only the first persistent launch
# of each configuration reads it; FASTLSTM_TRITON_CHECK_BARRIERS=always reads it after every launch
# (for GPUs shared with other kernels that may hold SMs).
CHECK_EVERY_LAUNCH = os.environ.get("FASTLSTM_TRITON_CHECK_BARRIERS") == "always"


def launch(kernel, arguments, call, grid: Grid, values: dict, error: Tensor, *, backward: bool) -> None:
    """Run every step of ``kernel`` (declared by ``arguments``): one persistent launch, or one launch
    per step (plus, for the backward, a last launch for ``dh_0``). ``values`` holds every argument
    by name but the steps' (``step_begin``, ``step_end``, ``finish``, ``phase``) and the grid's.

    A persistent grid whose program does not fit an SM (Triton's OutOfResources) falls back to the
    per-step grid. The first persistent launch of each configuration is checked for a barrier that
    timed out, which would mean its programs were not all resident at once."""
    kind = "backward" if backward else "forward"
    values = values | call.constants(grid)
    # every flag is in the key: a layer-norm or projection kernel (more barriers, more registers) is
    # checked and falls back on its own, apart from the plain kernel of the same shape
    key = (kind, error.device, call.batch, call.hidden, call.directions, call.dtype, grid,
           tuple(sorted((k, str(values[k])) for k in names(arguments, "constexpr") if k in values)))
    shape = grid.shape(call.batch, call.hidden, call.directions)
    # the barrier counters are int32: a launch whose arrivals could pass 2^31 runs one launch per step
    too_long = call.steps * call.phases * shape[0] >= 2**31 - 1
    if grid.persistent and (key in DOES_NOT_FIT or too_long):
        return launch(kernel, arguments, call, call.fitted(kind, per_step_grid(kind, grid, call.hidden, call.dtype)),
                      values, error, backward=backward)
    missing = set(names(arguments)) - set(values) - {"step_begin", "step_end", "finish", "phase", "USE_BARRIER"}
    if missing:  # pragma: no cover - a declared argument the host code does not pass
        raise TypeError(f"fastlstm: the {kind} kernel's arguments {sorted(missing)} are not given")

    def run(begin: int, end: int, finish: int, phase: int, use_barrier: bool) -> None:
        # the backward's `finish` says whether to end with dh_0; `phase` which phases of a step to run
        steps = dict(step_begin=begin, step_end=end, phase=phase) | (dict(finish=finish) if backward else {})
        kernel[shape](**values, **steps, USE_BARRIER=use_barrier, num_warps=grid.num_warps)

    # Triton launches on the current CUDA device: make it the tensors' one
    device = torch.cuda.device(error.device) if error.device.type == "cuda" else contextlib.nullcontext()
    try:
        with device:
            if grid.persistent:
                run(0, call.steps, 1, ALL_PHASES, grid.barrier)
            else:
                # with layer norm or the projection each phase of a step is a launch (the launch
                # boundary is the barrier)
                phases = range(call.phases) if call.phases > 1 else [ALL_PHASES]
                for s in range(call.steps):
                    for phase in phases:
                        run(s, s + 1, 0, phase, False)
                if backward:
                    run(call.steps, call.steps, 1, ALL_PHASES, False)
    except Exception as exc:
        if grid.persistent and OutOfResources is not None and isinstance(exc, OutOfResources):
            DOES_NOT_FIT.add(key)
            return launch(kernel, arguments, call,
                          call.fitted(kind, per_step_grid(kind, grid, call.hidden, call.dtype)), values, error,
                          backward=backward)
        raise RuntimeError(
            f"fastlstm: the Triton {kind} kernel failed for grid {shape} ({grid}): {exc}"
        ) from exc
    if grid.barrier and (CHECK_EVERY_LAUNCH or key not in VERIFIED):
        if int(error.item()) != 0:
            raise RuntimeError(
                f"fastlstm: the persistent Triton {kind} kernel's barrier timed out (grid {shape}): its "
                "programs were not all resident at once, e.g. because another kernel held SMs"
            )
        VERIFIED.add(key)

