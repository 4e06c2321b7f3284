"""W4A16 kernels for AutoAWQ-layout weights: Triton on GPU, a torch reference path on CPU."""

from __future__ import annotations

import torch

from . import repacked_dispatch
from .awq_layout import AWQ_ORDER, PACK_FACTOR, dequantize, pack_int4, unpack_int4
from .dispatch import check_inputs, m_bucket, select_config, warmup
from .epilogue import check_act, silu_mul
from .reference import awq_linear_reference


def awq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    act: str | None = None,
) -> torch.Tensor:
    """``x @ W + bias`` with ``W`` in the AutoAWQ GEMM layout (or repacked at load time by
    ``repacked_dispatch.repack``: a 4-D ``qweight``); ``x`` of any leading shape.

    ``act="silu_mul"``: return ``silu(y[..., :N/2]) * y[..., N/2:]`` instead (a fused gate/up layer's output
    through the MLP's activation), fused into the split-K sum where the chosen kernel has one
    (:mod:`kernels.epilogue`).

    CUDA tensors run a Triton kernel chosen by the number of rows ``M`` of ``x`` (flattened) from the measured
    table (:mod:`kernels.dispatch`); CPU tensors run the torch reference. Inputs are checked before any launch.
    CUDA-graph safe: no host sync; the only allocations are the output and a split-K workspace from the
    caching allocator (call :func:`warmup` before capturing).
    """
    repacked = qweight.dim() == 4  # repacked at load time (kernels.awq_repack): its own kernels, repacked_dispatch
    if not x.is_cuda:
        _, N = check_inputs(x, qweight, qzeros, scales, group_size, bias)
        check_act(act, N)
        ref = repacked_dispatch.reference if repacked else awq_linear_reference
        y = ref(x, qweight, qzeros, scales, group_size, bias)
        return y if act is None else silu_mul(y)
    K, N = check_inputs(x, qweight, qzeros, scales, group_size, bias, for_triton=True)
    check_act(act, N)
    from .dispatch import run_config

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    width = N // 2 if act else N
    if M == 0:
        return x.new_empty((*lead, width))
    if repacked:
        return repacked_dispatch.linear(x2, qweight, qzeros, scales, group_size, bias, act).reshape(*lead, width)
    cfg = select_config(M, N, K, group_size, x.dtype, x.device)
    return run_config(cfg, x2, qweight, qzeros, scales, group_size, bias, act=act).reshape(*lead, width)


def awq_linear_partials(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
) -> torch.Tensor | None:
    """The fp32 split-K partials ``[split, M, N]`` of ``x @ W`` (no bias) when the kernel chosen for these ``M``
    rows sums them in a launch of its own, so that the consumer of the output can do that sum instead (the
    engine's RoPE + KV-cache store does, one launch fewer per layer); ``None``, with nothing launched, otherwise
    (then call :func:`awq_linear`). CUDA only (``None`` on CPU)."""
    if not x.is_cuda:
        return None
    K, N = check_inputs(x, qweight, qzeros, scales, group_size, None, for_triton=True)
    from .dispatch import run_config, split_partials

    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return None
    if qweight.dim() == 4:  # repacked at load time
        cfg = repacked_dispatch.select(x2.shape[0], N, K, group_size, x.dtype)
        if not repacked_dispatch.leaves_partials(cfg, K, group_size):
            return None
        return repacked_dispatch.run(cfg, x2, qweight, qzeros, scales, group_size, None, act="partials")
    cfg = select_config(x2.shape[0], N, K, group_size, x.dtype, x.device)
    if not split_partials(cfg, K, group_size):
        return None
    return run_config(cfg, x2, qweight, qzeros, scales, group_size, None, act="partials")


__all__ = [
    "AWQ_ORDER", "PACK_FACTOR", "awq_linear", "awq_linear_partials", "awq_linear_reference", "check_inputs",
    "dequantize", "m_bucket", "pack_int4", "repacked_dispatch", "select_config", "silu_mul", "unpack_int4",
    "warmup",
]
