"""Build the Triton kernels for sm_90 (no GPU needed) at the grids fastlstm would launch on an H100,
and print each build's shared memory, registers and register spills (local-memory stack).

    python benchmarks/triton_resources.py [--dtypes bfloat16,float16,float32] [--options plain,layer_norm,proj]
                                          [--json PATH]

The shapes are those of ``fastlstm bench --preset h100`` (B, H pairs of ANCHORS.md) plus the
bidirectional and large-batch points. A build that spills, or asks for more than an SM's 227 KB of
shared memory, is what the grid rule in engines/triton/grid.py must avoid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # build for the GPU, not the interpreter

import torch  # noqa: E402

from fastlstm.engines.triton import build, grid as grids  # noqa: E402
from fastlstm.options import make_options  # noqa: E402

# name: (options, projection size as a fraction of H)
OPTIONS = {"plain": (make_options(), 0), "layer_norm": (make_options(layer_norm=True), 0),
           "proj": (make_options(has_projection=True, proj_clip=0.5), 4)}

SHAPES = [(b, h, 1) for b, h in ((1, 256), (8, 256), (16, 256), (64, 256), (128, 256), (256, 256), (8, 768),
                                 (16, 768), (64, 768), (128, 768), (1, 1024), (8, 1024), (16, 1024), (64, 1024),
                                 (128, 1024), (256, 1024))] + [(64, 512, 2)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--options", default="plain", help=f"comma-separated, of {', '.join(OPTIONS)}")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    configs = [(o, getattr(torch, d)) for o in args.options.split(",") for d in args.dtypes.split(",")]
    for option, dtype in configs:
        for kind in ("forward", "backward"):
            for batch, hidden, directions in SHAPES:
                grid = grids.plan_grid(kind, batch, hidden, directions, dtype, build.H100_SMS)
                start = time.perf_counter()
                options, proj_divisor = OPTIONS[option]
                built = build.build(kind, dtype, hidden, grid, options, directions=directions,
                                    proj=hidden // proj_divisor if proj_divisor else 0)
                row = dict(kind=kind, options=option, dtype=str(dtype).removeprefix("torch."), batch=batch,
                           hidden=hidden,
                           directions=directions, grid=vars(grid) if hasattr(grid, "__dict__") else grid.__repr__(),
                           shared_kb=built.shared_bytes // 1024, registers=built.registers,
                           stack_bytes=built.stack_bytes, build_s=round(time.perf_counter() - start, 1))
                rows.append(row)
                print(f"{kind:8s} {option:10s} {row['dtype']:8s} B{batch:4d} H{hidden:5d} D{directions} hb{grid.hb:3d} "
                      f"bb{grid.bb:3d} k{grid.k_chunk:5d} warps{grid.num_warps} persistent={int(grid.persistent)} | "
                      f"shared {row['shared_kb']:4d} KB, {built.registers:3d} registers, stack {built.stack_bytes} B",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    bad = [r for r in rows if r["shared_kb"] * 1024 > build.SHARED_MEMORY_LIMIT]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
