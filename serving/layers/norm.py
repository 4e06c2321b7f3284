"""RMSNorm, with the residual add fused in (one Triton kernel on GPU; with a row-parallel linear's split-K and
tensor-parallel sums too: :mod:`.reduce_norm`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .reduce_norm import RowOutput, reduce_add_rms_norm
from .triton_utils import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.pdl import PDL_LAUNCH, pdl_enter

    @triton.jit
    def _rmsnorm_kernel(X, R, W, Y, stride_x, stride_r, stride_y, N, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        pdl_enter()  # launched early; the W4A16 kernel after it loads its weights meanwhile (kernels/pdl.py)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(Y.dtype.element_ty)
            tl.store(R + row * stride_r + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        y = (xf * tl.rsqrt(var + eps)).to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (w * y).to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``norm(x + residual)``; with a residual, returns ``(normed, x + residual)``."""
    if use_triton(x) and x.dim() == 2 and x.stride(-1) == 1:
        y = torch.empty_like(x)
        res = residual if residual is not None else x
        _rmsnorm_kernel[(x.shape[0],)](
            x, res, weight, y, x.stride(0), res.stride(0), y.stride(0), x.shape[1], eps,
            HAS_RES=residual is not None, BLOCK=next_pow2(x.shape[1]), num_warps=4 if x.shape[1] <= 4096 else 8,
            **PDL_LAUNCH)
        return y if residual is None else (y, res)
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(dtype)
    return y if residual is None else (y, residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, finish_slot: int = 0):
        """``finish_slot``: the symmetric buffer's data slot of a row layer's output finished here (0 after
        attention, 1 after the MLP, so that consecutive finishes alternate; :mod:`.reduce_norm`)."""
        super().__init__()
        self.eps, self.finish_slot = eps, finish_slot
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor | RowOutput, residual: torch.Tensor | None = None):
        """``norm(x + residual)`` (with a residual: and ``x + residual``); ``x`` may be a row-parallel linear's
        :class:`RowOutput`, finished here in the same kernel (a residual is needed then)."""
        if isinstance(x, RowOutput):
            return reduce_add_rms_norm(x.parts, residual, self.weight, self.eps, x.peers, self.finish_slot)
        return rms_norm(x, self.weight, self.eps, residual)
