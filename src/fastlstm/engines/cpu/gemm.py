"""The GEMM of the input projection on the CPU: torch's default or oneDNN's linear, by a fixed rule.

torch's ``F.linear`` runs MKL's sgemm on x86; oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``)
computes the same product faster at most of the CPU grid's shapes. Measured on the development
machine (2-core AMD EPYC, Zen 3, AVX2, torch 2.13, 2 threads, float32; ``benchmarks/projection_gemm.py``,
``benchmarks/results/projection-gemm-2core-epyc.txt``), oneDNN's time over MKL's for ``x [M, K] @ W^T``
with ``N = 4K`` output columns: 0.76-1.01 for ``K >= 256`` up to ``M = 4096`` rows (0.76 at M 64
K 1024), 0.94-1.04 at M = 16384, 0.98-1.22 at K = 128 (three runs moved by up to 15% at a shape;
the two earlier ones had oneDNN at 0.56-0.96 where ``K >= 256, M <= 4096``, MKL ahead by up to 13%
at M = 16384 in one and behind by 17% in the other).
The rule: oneDNN for float32 when ``K >= 256`` and ``M <= 4096``, else torch's default. It is a
rule of shapes, fixed here, never a timing taken in the user's process. The backward's products
(``dx = dy W``, ``dW = dy^T x``) stay torch's: there MKL was as fast or faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MIN_REDUCTION = 256
MAX_ROWS = 4096


def uses_onednn(rows: int, reduction: int, dtype: torch.dtype) -> bool:
    return _ONEDNN and dtype == torch.float32 and reduction >= MIN_REDUCTION and rows <= MAX_ROWS


def _onednn(x: Tensor, w: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``x @ w^T`` through oneDNN, its backward through torch's GEMMs (which autograd can
    differentiate again)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _onednn(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dy @ w if ctx.needs_input_grad[0] else None
        dw = dy.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dw


def linear(x: Tensor, w: Tensor) -> Tensor:
    """``x [M, K] @ w [N, K]^T`` by the rule above (eager calls only: traced ones take ``F.linear``)."""
    if not uses_onednn(x.shape[0], x.shape[1], x.dtype):
        return F.linear(x, w)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _OneDNNLinear.apply(x, w)
    return _onednn(x, w)
