"""How a layer's loop shares the cores: fixed rules, measured on the development machine (2-core
AMD EPYC, Zen 3, fp32; a Zen 4 where a rule says so) and written down here, never timed in the
user's process.

* Rows: batch rows are independent recurrences, so disjoint row ranges run on separate threads (one
  per core torch may use), each streaming all of W_hh.
* Columns: with large recurrent weights a step is bound by streaming them from memory; the threads
  then split each step's GEMM columns (each streams its share) and meet at a barrier a few times
  per step.
* Packing: the loop's GEMM reads W_hh in column panels packed once per call; a single step, or
  fewer than 4 rows per thread, reads the natural layout instead.
"""

from __future__ import annotations

import torch

from ...packing import Layout
from . import kernels

# A thread keeps at least this many rows: its GEMM needs 4-row blocks to stay efficient, and every
# thread streams all of W_hh. Measured (fp32, H 128..1024): 2 threads lose below 4 rows each, gain
# 5-10% at 4-8 rows and 10-50% from 8 rows each.
MIN_ROWS_PER_THREAD = 8
# With AVX-512 kernels (GEMM blocks of 8 and 4 rows, bfloat16's too) 4 rows each beat a column team
# at B 8 and 12: measured on a Zen 4 (2 threads, T = 64, against the columns, interleaved), time
# 0.82-0.93x float32 and 0.82-0.95x bfloat16 at H 64-256, forward and forward+backward (0.99-1.03x
# at B12 H256 float32), equal at H 512 (where the weights are large enough for columns anyway).
# The column team meets twice per step; rows never meet. Not measured on an AVX2 machine (its L2
# is half a Zen 4's, so the doubled weight streaming may cost more there): the rule above stays.
MIN_ROWS_PER_THREAD_AVX512 = 4

# From 4 MB of W_hh (H = 512) columns beat rows at every batch size, by up to 3x at B = 1, H = 1024.
# Below it, where the batch splits into rows (8 or more per thread), rows win forward+backward.
# Where it does not (B < 16 on 2 threads), columns win from 64 KB of W_hh (H = 64): B = 1, T = 256,
# forward 4.21 -> 2.66 ms at H = 128 and 11.8 -> 7.4 ms at H = 256, forward+backward 10.5 -> 8.3
# and 26.8 -> 19.8 ms; at H = 32 the barriers cost more than they save.
# Checked on a Zen 4 (AVX-512, 2026-12-07, T = 64, float32): rows still beat columns at B = 16 and 32,
# H = 128 and 256, by 2-11% forward+backward (forward within 6% either way).
MIN_COLUMN_WEIGHT_BYTES = 4 << 20
MIN_COLUMN_WEIGHT_BYTES_UNSPLIT = 64 << 10
# A team has at most one member per 16 columns of its narrowest product (the backward's, H_out
# wide): more would only wait at the barriers.
MIN_COLUMNS_PER_MEMBER = 16

# Packing the weights costs about one step's memory traffic, and the packed GEMM needs 4-row blocks.
MIN_STEPS_TO_PACK = 2
MIN_ROWS_TO_PACK = 4


def row_threads(batch: int) -> int:
    """Threads that split the batch rows."""
    avx512 = kernels.module().instruction_set().startswith("avx512")
    least = MIN_ROWS_PER_THREAD_AVX512 if avx512 else MIN_ROWS_PER_THREAD
    return max(1, min(torch.get_num_threads(), batch // least))


def column_threads(hidden: int, h_out: int, dtype: torch.dtype, rows_split: bool) -> int:
    """Threads that split each step's columns (1: none); ``rows_split``: the batch splits into rows."""
    weight_bytes = 4 * hidden * h_out * (4 if dtype == torch.float32 else 8)
    least = MIN_COLUMN_WEIGHT_BYTES if rows_split else MIN_COLUMN_WEIGHT_BYTES_UNSPLIT
    if weight_bytes < least:
        return 1
    return max(1, min(torch.get_num_threads(), h_out // MIN_COLUMNS_PER_MEMBER))


def packs(steps: int, batch: int, threads: int) -> bool:
    """Whether the loop's GEMM reads packed weight panels."""
    return steps >= MIN_STEPS_TO_PACK and batch // threads >= MIN_ROWS_TO_PACK


def row_ranges(layout: Layout, parts: int) -> list[tuple[int, int]]:
    """Up to ``parts`` disjoint ranges of a :class:`~fastlstm.packing.Layout`'s sorted batch rows
    (longest first), each holding about the same number of tokens: for a full layout (every row
    ``T`` steps) the first ``ceil(B k / parts)`` rows end range ``k``, counted without tensors."""
    if layout.full:
        bounds = [-(-layout.batch * k // parts) for k in range(parts + 1)]
    else:
        cumulative = torch.cumsum(layout.lengths(), 0)
        bounds = [0]
        for k in range(1, parts):
            bounds.append(max(bounds[-1], int(torch.searchsorted(cumulative, layout.total * k / parts)) + 1))
        bounds.append(layout.batch)
    return [(begin, end) for begin, end in zip(bounds, bounds[1:]) if end > begin]
