"""How a kernel's work is split into programs (:class:`Grid`), and the rules that choose the split."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

# Triton's interpreter runs kernels on CPU tensors (the tests), one program after another.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Grid:
    """How a kernel's work is split: ``HB`` hidden units x ``BB`` batch rows per program.

    ``persistent``: one launch runs every step; the ``D x ceil(B / BB)`` groups of
    ``ceil(H / HB)`` programs each meet at a barrier per step (``barrier`` is False when a group
    is a single program). Otherwise one launch per step. ``k_chunk``: the recurrent product's
    reduction is split into chunks of this size (its full length, ``H`` or ``4H`` padded, keeps the
    weight slice loaded once for the whole sequence; shorter chunks stream it from L2 each step).
    """

    hb: int
    bb: int
    persistent: bool
    barrier: bool
    k_chunk: int
    # the weight slice as tl.dot's A operand rather than its B operand
    w_as_a: bool = True
    num_warps: int = 4

    def shape(self, batch: int, hidden: int, directions: int) -> tuple[int, int, int]:
        return (triton.cdiv(hidden, self.hb), triton.cdiv(batch, self.bb), directions)


# Operand bytes one program stages per step for the recurrent product (its weight slice and a block
# of h or dgates): (whole reduction kept loaded, one streamed chunk), per kernel. From Triton's sm_90
# builds (build.py, benchmarks/triton_resources.py): within these the kernels build
# without register spills and well inside an H100 SM's 227 KB of shared memory; the backward, with
# more live state, spills above 32 KB.
STAGED_BYTES = {"forward": (96 * 1024, 48 * 1024), "backward": (32 * 1024, 32 * 1024)}


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def hidden_pad(hidden: int) -> int:
    """``H`` rounded up to a power of two, at least 16 (``tl.dot``'s smallest K)."""
    return max(16, pow2(hidden))


def min_hb(kind: str) -> int:
    """``tl.dot`` needs every side >= 16: the forward's product is ``[BB, H] x [H, 4 HB]``, so
    ``HB >= 4``; the backward's is ``[BB, 4H] x [4H, HB]``, so ``HB >= 16``."""
    return 4 if kind == "forward" else 16


def k_chunk(kind: str, hidden: int, hb: int, bb: int, dtype: torch.dtype) -> int:
    """The reduction's chunk: all of it if the operands fit the kernel's resident budget
    (:data:`STAGED_BYTES`), else halved until they fit its chunk budget (at least 16)."""
    total, rows = (hidden_pad(hidden), 4 * hb) if kind == "forward" else (4 * hidden_pad(hidden), hb)
    per_k = (rows + bb) * torch.empty((), dtype=dtype).element_size()
    resident, streamed = STAGED_BYTES[kind]
    if per_k * total <= resident:
        return total
    chunk = total
    while chunk > 16 and per_k * chunk > streamed:
        chunk //= 2
    return chunk


def per_step_grid(kind: str, grid: Grid, hidden: int, dtype: torch.dtype) -> Grid:
    """The one-launch-per-step split that replaces a persistent ``grid`` that does not fit the GPU.
    It keeps ``BB``, so the buffers sized by the number of batch blocks stay valid."""
    hb = min_hb(kind)
    return Grid(hb=hb, bb=grid.bb, persistent=False, barrier=False, k_chunk=k_chunk(kind, hidden, hb, grid.bb, dtype),
                w_as_a=grid.w_as_a)


def plan_grid(kind: str, batch: int, hidden: int, directions: int, dtype: torch.dtype, sms: int) -> Grid:
    """The split of ``kind`` ("forward" or "backward") for one layer on a GPU with ``sms`` SMs: ``HB``
    grows from its minimum until the programs fit one per SM (else one launch per step); the
    product's reduction is chunked so that its operands fit on chip."""
    h_pad = hidden_pad(hidden)
    bb = max(16, pow2(batch)) if batch <= 64 else 64
    groups = directions * triton.cdiv(batch, bb)
    hb = min_hb(kind)
    while groups * triton.cdiv(hidden, hb) > sms and hb < h_pad:
        hb *= 2
    chunk = k_chunk(kind, hidden, hb, bb, dtype)
    staged = (4 * hb if kind == "forward" else hb) + bb
    # more warps for big staged operands or a big elementwise tile (register pressure, from the builds)
    big = staged * chunk * torch.empty((), dtype=dtype).element_size() > 32 * 1024 or hb * bb >= 1024
    grid = Grid(hb=hb, bb=bb, persistent=True, barrier=triton.cdiv(hidden, hb) > 1, k_chunk=chunk,
                num_warps=8 if big else 4)
    if groups * triton.cdiv(hidden, hb) > sms:
        return per_step_grid(kind, grid, hidden, dtype)
    return grid


def choose_grid(kind: str, batch: int, hidden: int, directions: int, dtype: torch.dtype, device: torch.device) -> Grid:
    """:func:`plan_grid` for ``device``; interpreted (CPU) runs get one program per group."""
    if INTERPRET or device.type != "cuda":
        # interpreted programs run one after another: one program per group
        h_pad, bb = hidden_pad(hidden), max(16, pow2(batch))
        return Grid(hb=h_pad, bb=bb, persistent=True, barrier=False, k_chunk=k_chunk(kind, hidden, h_pad, bb, dtype))
    return plan_grid(kind, batch, hidden, directions, dtype, torch.cuda.get_device_properties(device).multi_processor_count)
