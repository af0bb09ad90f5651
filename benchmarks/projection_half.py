"""The input projection's GEMM on the CPU in bfloat16 and float16, ``x [M, K] @ W^T [K, N]``:
torch's GEMM in the half precision (``F.linear``, gates widened to float32 afterwards, as the engine
reads them) against the product of float32 copies (what ``engines/cpu/gemm.py`` computes where the
CPU has no native product in that precision). Each shape alternates the two, 15 rounds, medians;
the half-precision rule in ``gemm.py`` cites this table.

    python benchmarks/projection_half.py > benchmarks/results/projection-half-<machine>.txt
"""
import platform
import statistics
import time

import torch

from fastlstm.engines.cpu import gemm

torch.set_num_threads(2)
flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx512", "amx"))})
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
      f"flags {' '.join(flags) or '(no avx512/amx)'}; ms")
for dtype in (torch.bfloat16, torch.float16):
    for m, k, n in [(512, 128, 512), (1024, 256, 1024), (2048, 256, 1024), (4096, 512, 2048), (64, 1024, 4096)]:
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        runs = {"native": lambda: torch.nn.functional.linear(x, w).float(),
                "widened": lambda: gemm._product(x.float(), w.float())}
        times = {name: [] for name in runs}
        for run in runs.values():
            run()
        reps = max(2, int(3e8 / (m * k * n)))
        for _ in range(15):
            for name, run in runs.items():
                start = time.perf_counter()
                for _ in range(reps):
                    run()
                times[name].append((time.perf_counter() - start) / reps * 1e3)
        native, widened = (statistics.median(times[name]) for name in runs)
        print(f"{str(dtype)[6:]:9s} M{m:5d} K{k:5d} N{n:5d}  native {native:8.3f}  widened {widened:8.3f}"
              f"  native/widened {native / widened:.2f}", flush=True)
