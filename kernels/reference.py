"""Torch reference path for the W4A16 linear: unpack, dequantize, matmul.

Serves CPU inference and is the yardstick the Triton kernels are tested against.
"""

from __future__ import annotations

import torch

from .awq_layout import dequantize


def awq_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(W) (+ bias)`` for AutoAWQ-layout weights; ``x`` of any leading shape."""
    w = dequantize(qweight, qzeros, scales, group_size)
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    y = x.to(compute) @ w.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)
