"""SiLU(gate) * up on a fused gate/up output (one Triton kernel on GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_utils import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
        a = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (a * u.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    if use_triton(x) and x.dim() == 2 and x.stride(-1) == 1:
        y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        block = 1024
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, y, x.stride(0), y.stride(0), n, BLOCK=block)
        return y
    return F.silu(x[..., :n]) * x[..., n:]
