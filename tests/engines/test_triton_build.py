"""The Triton kernels build for Hopper (sm_90) with Triton's own compiler, without a GPU.

The interpreter tests run the kernels as Python, which accepts code the compiler refuses; this
builds the forward and backward kernels, with and without option flags, at grids the launcher picks
for an H100, and checks what each asks for: within an SM's shared memory, and no register spills at
the plain configurations (with sequences of different lengths or options, some backward builds at the
largest tiles spill a few dozen bytes; benchmarks/results/triton-sm90-resources.txt). The builds run in a subprocess: this test session imported the kernels
for the interpreter (conftest), and a build needs them compiled.
"""

import json
import os
import subprocess
import sys

import pytest

CASES = {
    # name: (kind, dtype, batch, hidden, directions, options ("", "everything", "layer_norm", "proj",
    # "layer_norm+proj"), lengths ("": every sequence has T steps, "varlen": different lengths))
    "fwd-bf16-B16-H1024": ("forward", "bfloat16", 16, 1024, 1, "", ""),
    "bwd-bf16-B16-H1024": ("backward", "bfloat16", 16, 1024, 1, "", ""),
    "fwd-bf16-B256-H256-bi": ("forward", "bfloat16", 256, 256, 2, "", ""),
    "bwd-fp16-B64-H768": ("backward", "float16", 64, 768, 1, "", ""),
    "fwd-fp32-B8-H256-everything": ("forward", "float32", 8, 256, 2, "everything", "varlen"),
    "bwd-bf16-B8-H256-everything": ("backward", "bfloat16", 8, 256, 2, "everything", "varlen"),
    "fwd-bf16-B64-H512-varlen": ("forward", "bfloat16", 64, 512, 2, "", "varlen"),
    "bwd-bf16-B64-H512-varlen": ("backward", "bfloat16", 64, 512, 2, "", "varlen"),
    "fwd-bf16-B64-H1024-layer_norm": ("forward", "bfloat16", 64, 1024, 1, "layer_norm", "varlen"),
    "bwd-bf16-B64-H1024-layer_norm": ("backward", "bfloat16", 64, 1024, 1, "layer_norm", "varlen"),
    "bwd-fp32-B16-H256-layer_norm-bi": ("backward", "float32", 16, 256, 2, "layer_norm", "varlen"),
    "fwd-bf16-B64-H512-proj": ("forward", "bfloat16", 64, 512, 1, "proj", "varlen"),
    "bwd-bf16-B64-H512-proj": ("backward", "bfloat16", 64, 512, 1, "proj", "varlen"),
    "fwd-fp16-B16-H1024-layer_norm+proj-bi": ("forward", "float16", 16, 1024, 2, "layer_norm+proj", "varlen"),
    "bwd-fp16-B16-H1024-layer_norm+proj-bi": ("backward", "float16", 16, 1024, 2, "layer_norm+proj", "varlen"),
}

_BUILD = """
import json, sys, torch
from fastlstm.engines.triton import build, grid
from fastlstm.options import make_options
OPTIONS = {
    "": None,
    "everything": make_options(activations=("hard_sigmoid", "softsign", "relu"), peephole=True, clip=1.5,
                               zoneout=(0.2, 0.3), cell_clip=0.8),
    "layer_norm": make_options(layer_norm=True),
    "proj": make_options(has_projection=True, proj_clip=0.5),
    "layer_norm+proj": make_options(layer_norm=True, has_projection=True),
}
out = {}
for name, (kind, dtype, batch, hidden, directions, options, lengths) in json.loads(sys.argv[1]).items():
    dtype = getattr(torch, dtype)
    split = grid.plan_grid(kind, batch, hidden, directions, dtype, build.H100_SMS)
    built = build.build(kind, dtype, hidden, split, OPTIONS[options], directions=directions,
                        varlen=lengths == "varlen", proj=hidden // 4 if "proj" in options else 0)
    out[name] = dict(persistent=split.persistent, shared=built.shared_bytes, stack=built.stack_bytes,
                     registers=built.registers, fits=built.fits)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _BUILD, json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CASES)
def test_kernel_builds_for_sm90(builds, name):
    built = builds[name]
    assert built["persistent"]
    assert built["fits"], f"{built['shared']} bytes of shared memory"
    if CASES[name][5:] == ("", ""):  # the plain configurations; the others are recorded as they are
        assert built["stack"] == 0, f"register spills: {built}"
