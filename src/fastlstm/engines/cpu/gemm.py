"""The GEMM of the input projection on the CPU: torch's default or oneDNN's linear, by a fixed rule.

torch's ``F.linear`` runs MKL's sgemm on x86; oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``)
computes the same product faster at most of the CPU grid's shapes. Measured on the development
machine (2-core AMD EPYC, Zen 3, AVX2, torch 2.13, 2 threads, float32; ``benchmarks/projection_gemm.py``,
``benchmarks/results/projection-gemm-2core-epyc.txt``), oneDNN's time over MKL's for ``x [M, K] @ W^T``
with ``N = 4K`` output columns: 0.76-1.01 for ``K >= 256`` up to ``M = 4096`` rows (0.76 at M 64
K 1024), 0.94-1.04 at M = 16384, 0.98-1.22 at K = 128 (three runs moved by up to 15% at a shape;
the two earlier ones had oneDNN at 0.56-0.96 where ``K >= 256, M <= 4096``, MKL ahead by up to 13%
at M = 16384 in one and behind by 17% in the other).
On a Zen 4 (AVX-512; ``benchmarks/results/projection-gemm-2core-epyc-zen4.txt``) oneDNN's time
was 0.69-0.98x MKL's at every shape of that grid but the smallest (M = 64, K = 128: 1.03x, 60 us):
there MKL runs its AVX2 code (``mkl_blas_def_sgemm_kernel_0_zen`` in a profile), oneDNN AVX-512.
Inside a layer's forward (B1 T64 H128, M = 64, K = 128) MKL was again 5-8% ahead.
The rule: oneDNN for float32 when ``K >= 256`` and ``M <= 4096``, and on CPUs with AVX-512
(measured on AMD only) also at every other shape but ``K < 256`` with ``M < 256``; else torch's
default. It is a rule of shapes and instruction sets, fixed here, never a timing taken in the
user's process. The backward's products (``dx = dy W``, ``dW = dy^T x``) stay torch's: there MKL
was as fast or faster (on the Zen 3).

bfloat16 and float16 (the engine computes their time loop in float32): torch's half-precision GEMM
is native only where the CPU multiplies in that precision (AVX512-BF16 or AMX for bfloat16, AMX-FP16
for float16); elsewhere oneDNN converts and is slower than float32 (development machine, Zen 3,
bfloat16 layer B8 T64 H128: 12.6 ms forward with torch's bfloat16 projection, see
``benchmarks/results/``). So without those instructions the projection runs on float32 copies of
``x`` and ``W_ih`` (the gates stay float32, as the engine would widen them anyway); with them it
stays torch's, its gates rounded to the half precision (within the 2x rule: tests/test_half_precision.py
runs both ways on any machine). Measured on a Zen 4 (AVX512-BF16, no AMX; 2 threads,
``benchmarks/projection_half.py``, ``benchmarks/results/projection-half-2core-epyc-zen4.txt``):
bfloat16's native product took 0.51-0.64x the float32 copies' time at the CPU grid's shapes, and
float16's (no AMX-FP16) 3.8-7.6x, which is the rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MIN_REDUCTION = 256
MAX_ROWS = 4096
MIN_ROWS_AVX512 = 256
_AVX512 = torch.cpu._is_avx512_supported()


def uses_onednn(rows: int, reduction: int, dtype: torch.dtype) -> bool:
    if not _ONEDNN or dtype != torch.float32:
        return False
    if _AVX512:
        return reduction >= MIN_REDUCTION or rows >= MIN_ROWS_AVX512
    return reduction >= MIN_REDUCTION and rows <= MAX_ROWS


def _onednn(x: Tensor, w: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), None, "none", [], "")


def _native_half(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return dtype == torch.float16 and torch.cpu._is_amx_fp16_supported()


NATIVE_HALF = {dtype: _native_half(dtype) for dtype in (torch.bfloat16, torch.float16)}
"""Whether the CPU multiplies in each half precision natively (fixed for the process)."""


def widens(dtype: torch.dtype) -> bool:
    """Whether the projection of ``dtype`` rows runs in float32 (the rule above)."""
    return dtype in NATIVE_HALF and not NATIVE_HALF[dtype]


class _Float32Linear(torch.autograd.Function):
    """``x @ w^T`` computed in float32 outside autograd (oneDNN's product by the rule; half-precision
    operands on float32 copies where :func:`widens`), its backward through torch's GEMMs (which
    autograd can differentiate again). It keeps ``x`` and ``w`` as they are and widens them again in
    the backward: autograd would keep float32 copies of half-precision ones, at twice their size,
    from the forward to the backward. The gradients come back in ``x``'s and ``w``'s dtypes.
    (``.float()`` of a float32 tensor is the tensor itself: float32 calls copy nothing.)"""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _product(x.float(), w.float())

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.float()  # (bfloat16 where autocast ran the forward's product: autocast is off here)
        dx = (dy @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (dy.t() @ x.float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def _product(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w^T`` by the oneDNN rule, outside autograd."""
    return _onednn(x, w) if uses_onednn(x.shape[0], x.shape[1], x.dtype) else F.linear(x, w)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """``x [M, K] @ w [N, K]^T`` by the rules above (eager calls only: traced ones take ``F.linear``);
    float32 for half-precision ``x`` where :func:`widens`."""
    if not widens(x.dtype) and not uses_onednn(x.shape[0], x.shape[1], x.dtype):
        return F.linear(x, w)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _Float32Linear.apply(x, w)
    return _product(x.float(), w.float())


def gradient_product(a: Tensor, b: Tensor, half: torch.dtype | None) -> Tensor:
    """``a^T @ b`` for float32 ``a [K, M]`` and ``b [K, N]`` (a weight's gradient, summed over ``K``
    rows), in float32; for a ``half``-precision call (``half`` not None) where the CPU multiplies
    that precision natively (the rule above), from operands rounded to it, as torch's half-precision
    LSTM computes its weight gradients (the gradient is returned in ``half`` anyway)."""
    if half is not None and not widens(half):
        return (a.t().to(half) @ b.to(half)).float()
    return a.t() @ b
