"""The AutoAWQ "GEMM" packed layout, stated once.

A quantized linear of PyTorch shape ``[out, in]`` is stored as

* ``qweight`` int32 ``[in, out // 8]``: eight 4-bit codes per int32,
* ``qzeros``  int32 ``[in // g, out // 8]``: zero points (0..15), packed the same way,
* ``scales``  fp16/bf16 ``[in // g, out]``.

Inside each int32, nibble ``i`` (bits ``4i .. 4i+3``) holds output column ``8j + AWQ_ORDER[i]``.
vLLM, LMDeploy, TGI and transformers read this layout, so the quantizer writes it and the kernels read it
directly; nothing else in the project should know the nibble order.
"""

from __future__ import annotations

import torch

PACK_FACTOR = 8
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
# AWQ_REVERSE_ORDER[c] = nibble that holds column 8j + c.
AWQ_REVERSE_ORDER: tuple[int, ...] = tuple(AWQ_ORDER.index(c) for c in range(PACK_FACTOR))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``[rows, cols]`` integer codes in 0..15 into int32 ``[rows, cols // 8]`` (AWQ order)."""
    if codes.dim() != 2 or codes.shape[1] % PACK_FACTOR:
        raise ValueError(f"pack_int4 needs a 2-D tensor whose last dim is a multiple of 8, got {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("pack_int4: codes must lie in 0..15")
    c = c.view(c.shape[0], -1, PACK_FACTOR)
    packed = torch.zeros(c.shape[:2], dtype=torch.int64, device=codes.device)
    for nibble, col in enumerate(AWQ_ORDER):
        packed |= c[:, :, col] << (4 * nibble)
    # Values above 2**31 wrap to negative int32, the same bits.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[rows, n]`` to uint8 codes ``[rows, 8n]``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 needs a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.tensor([4 * n for n in AWQ_REVERSE_ORDER], dtype=torch.int32, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 0xF
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unpack and dequantize to a dense ``[in, out]`` matrix in ``scales.dtype`` (math in fp32)."""
    w = unpack_int4(qweight).to(torch.float32)
    z = unpack_int4(qzeros).to(torch.float32)
    s = scales.to(torch.float32)
    z = z.repeat_interleave(group_size, dim=0)
    s = s.repeat_interleave(group_size, dim=0)
    return ((w - z) * s).to(scales.dtype)
