"""W4A16 kernels for AutoAWQ-layout weights: Triton on GPU, a torch reference path on CPU."""

from __future__ import annotations

import torch

from .awq_layout import AWQ_ORDER, PACK_FACTOR, dequantize, pack_int4, unpack_int4
from .dispatch import check_inputs, m_bucket, select_config, warmup
from .reference import awq_linear_reference


def awq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W + bias`` with ``W`` in the AutoAWQ GEMM layout; ``x`` of any leading shape.

    CUDA tensors run a Triton kernel chosen by the number of rows ``M`` of ``x`` (flattened) from the measured
    table (:mod:`kernels.dispatch`); CPU tensors run the torch reference. Inputs are checked before any launch.
    CUDA-graph safe: no host sync; the only allocations are the output and a split-K workspace from the
    caching allocator (call :func:`warmup` before capturing).
    """
    if not x.is_cuda:
        check_inputs(x, qweight, qzeros, scales, group_size, bias)
        return awq_linear_reference(x, qweight, qzeros, scales, group_size, bias)
    K, N = check_inputs(x, qweight, qzeros, scales, group_size, bias, for_triton=True)
    from .dispatch import run_config

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty((*lead, N))
    cfg = select_config(M, N, K, group_size, x.dtype, x.device)
    return run_config(cfg, x2, qweight, qzeros, scales, group_size, bias).reshape(*lead, N)


__all__ = [
    "AWQ_ORDER", "PACK_FACTOR", "awq_linear", "awq_linear_reference", "check_inputs", "dequantize", "m_bucket",
    "pack_int4", "select_config", "unpack_int4", "warmup",
]
