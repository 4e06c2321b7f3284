"""Group-wise asymmetric integer quantization: the arithmetic, and packing into the AutoAWQ layout.

``scale = (max - min) / (2**bits - 1)``, ``zero = clamp(-round(min / scale), 0, 2**bits - 1)``,
``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``, ``w_hat = (q - zero) * scale``.
All arithmetic runs in fp32 whatever the weight dtype.
"""

from __future__ import annotations

import torch

from kernels.awq_layout import pack_int4

from .errors import QuantError

# The smallest span a group may have, so scales are never 0 or NaN.
MIN_SCALE = 1e-6


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = w.shape
    if in_f % group_size:
        raise QuantError(f"in_features {in_f} is not a multiple of group size {group_size}")
    return w.reshape(out_f, in_f // group_size, group_size).float()


def quant_params(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)`` of shape ``[out, in // group_size]`` (fp32; zero holds integers)."""
    g = _grouped(w, group_size)
    qmax = 2**bits - 1
    wmax, wmin = g.amax(dim=-1), g.amin(dim=-1)
    span = wmax - wmin
    # A constant group has no span: step by its magnitude instead, so the zero point can reach the constant.
    absmax = torch.maximum(wmax.abs(), wmin.abs())
    scale = torch.where(span > MIN_SCALE, span, absmax).clamp(min=MIN_SCALE) / qmax
    zero = (-torch.round(wmin / scale)).clamp(0, qmax)
    return scale, zero


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``[out, in]`` (int32) with their per-group ``scale`` and ``zero``."""
    scale, zero = quant_params(w, bits, group_size)
    g = _grouped(w, group_size)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 2**bits - 1)
    return q.reshape(w.shape).to(torch.int32), scale, zero


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantize then dequantize, in ``w``'s dtype: what the model computes with after quantization."""
    q, scale, zero = quantize(w, bits, group_size)
    g = q.reshape(*scale.shape, group_size).float()
    return ((g - zero[..., None]) * scale[..., None]).reshape(w.shape).to(w.dtype)


def pack_awq(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{qweight, qzeros, scales}`` of a PyTorch ``[out, in]`` weight in the AutoAWQ GEMM layout."""
    if bits != 4:
        raise QuantError(f"--w-bits {bits} is not supported: the AutoAWQ GEMM layout holds 4-bit weights; use --w-bits 4")
    if w.shape[0] % 8:
        raise QuantError(f"out_features {w.shape[0]} is not a multiple of 8, which the packed layout needs")
    q, scale, zero = quantize(w, bits, group_size)
    return {
        "qweight": pack_int4(q.t().contiguous()),
        "qzeros": pack_int4(zero.to(torch.int32).t().contiguous()),
        "scales": scale.t().contiguous().to(scale_dtype),
    }
