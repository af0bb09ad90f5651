"""The input projection's GEMM on the CPU, ``x [M, K] @ W^T [K, N]`` in float32: torch's default
(``F.linear``, MKL) against oneDNN's linear, at the M = T*B, K = I = H, N = 4H of the CPU grid.
Each shape alternates the two, 15 rounds, medians; the rule in ``engines/cpu/gemm.py`` comes from
this table.

    python benchmarks/projection_gemm.py > benchmarks/results/projection-gemm-<machine>.txt
"""
import platform
import time, torch, statistics
torch.set_num_threads(2)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; ms")
on = lambda a,b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
shapes = set()
for B in (1, 16, 64):
    for H in (128, 256, 512, 1024):
        for T in (64, 256):
            shapes.add((B*T, H, 4*H))
shapes |= {(64*64, 256, 2048), (16*64, 512, 2048)}
res = []
for (M, K, N) in sorted(shapes):
    a = torch.randn(M, K); b = torch.randn(N, K)
    fm = lambda: torch.nn.functional.linear(a, b); fo = lambda: on(a, b)
    for _ in range(3): fm(); fo()
    tm, to = [], []
    reps = max(3, int(2e8 / (M*K*N) ))
    for _ in range(15):
        s = time.perf_counter()
        for _ in range(reps): fm()
        tm.append((time.perf_counter()-s)/reps)
        s = time.perf_counter()
        for _ in range(reps): fo()
        to.append((time.perf_counter()-s)/reps)
    m, o = statistics.median(tm)*1e3, statistics.median(to)*1e3
    res.append((M, K, N, m, o))
    print(f"M{M:6d} K{K:5d} N{N:5d}  linear {m:8.3f}  onednn {o:8.3f}  onednn/linear {o/m:.2f}", flush=True)
