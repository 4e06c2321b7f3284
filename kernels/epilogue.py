"""The gated activation ``silu(gate) * up`` of a fused gate/up output, as an epilogue of the W4A16 ops.

``awq_linear(..., act="silu_mul")`` returns ``silu(y[:, :N/2]) * y[:, N/2:]`` for ``y = x @ W``. When the chosen
kernel sums its split-K partials in a launch of its own (``TAIL = 0``, the decode configs), the activation is
computed there (:func:`kernels.awq_triton.reduce_partials`): one launch and one write of the intermediate fewer
per MLP. Otherwise it runs after the linear as the Triton kernel below (or torch on CPU). Both round the
way the unfused layers do: gate and up to the activation dtype, ``silu(gate)`` to the dtype, then the product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pdl import PDL_LAUNCH, pdl_enter

ACTS = (None, "silu_mul")  # public; run_config also takes "partials" (see kernels.awq_linear_partials)


def check_act(act: str | None, N: int) -> None:
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if act == "silu_mul" and N % 2:
        raise ValueError(f"act={act!r} halves the output features, which must be even (got {N})")


@triton.jit
def silu_mul_math(g, u, dtype: tl.constexpr):
    """fp32 ``g``, ``u`` (already rounded to ``dtype``) -> ``silu(g) * u`` rounded like the unfused ops."""
    a = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (a * u).to(dtype)


@triton.jit
def _silu_mul_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr):
    pdl_enter()  # launched early; the W4A16 kernel after it loads its weights meanwhile (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, silu_mul_math(g, u, Y.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """``silu(x[..., :n]) * x[..., n:]`` with ``n = x.shape[-1] // 2``; Triton on CUDA (2-D, unit stride)."""
    n = x.shape[-1] // 2
    if use_triton is None:
        use_triton = x.is_cuda
    if use_triton and x.dim() == 2 and x.stride(-1) == 1:
        y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        block = 1024
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, y, x.stride(0), y.stride(0), n, BLOCK=block,
                                                                **PDL_LAUNCH)
        return y
    return F.silu(x[..., :n]) * x[..., n:]
