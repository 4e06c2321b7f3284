"""Load-time repack of AutoAWQ GEMM weights into the tensor cores' register fragment order (``mma.m16n8k16``).

Why: with the weight as the MMA's A operand (``W^T``, rows = output columns ``n``, columns = ``k``), each thread of
a warp holds 8 elements of every 16x16 tile: rows ``g, g+8`` and columns ``2t, 2t+1, 2t+8, 2t+9`` (``g = lane // 4``,
``t = lane % 4``). In the AutoAWQ layout those 8 weights sit in 8 different words; here they are one 32-bit word,
so a thread dequantizes its fragment from one word (shifts, ``lop3``) without a shared-memory round trip
(:mod:`kernels.awq_gluon_mma`).

Layout: ``packed[N/16, K/64, 32, 4]`` int32 (K padded into whole 64-row chunks is not needed: K must be a multiple
of 64): ``packed[nt, kc, lane, j]`` holds the fragment of lane ``lane`` in the tile of rows ``16 nt ..`` and
columns ``64 kc + 16 j ..``, so one 16-byte load per thread covers four k-tiles and a warp reads 512 contiguous
bytes. Inside a word, fragment element ``r = b0 + 2 b1 + 4 b2`` (``k + b0``, ``n + 8 b1``, ``k + 8 b2``) sits in
nibble ``r // 2`` (even ``r``) or ``4 + r // 2`` (odd ``r``): shifting the word right by ``4p`` puts elements
``2p`` and ``2p + 1`` at bits 0-3 and 16-19, one ``lop3`` away from a bf16x2 pair. Zeros and scales keep the
AutoAWQ layout.
"""

from __future__ import annotations

import torch

from .awq_layout import unpack_int4

# fragment element r -> (dn, dk) inside the 16x16 tile for lane (g, t): n = g + dn, k = 2t + dk
_FRAG = [(8 * ((r >> 1) & 1), (r & 1) + 8 * (r >> 2)) for r in range(8)]
_NIBBLE = [(r >> 1) if r % 2 == 0 else 4 + (r >> 1) for r in range(8)]


def check_repackable(K: int, N: int) -> None:
    if N % 16 or K % 64:
        raise ValueError(f"fragment repack needs N a multiple of 16 and K a multiple of 64, got K={K}, N={N}")


def codes_to_fragments(codes: torch.Tensor) -> torch.Tensor:
    """int codes ``[K, N]`` (0..15) -> packed fragments ``[N/16, K/64, 32, 4]`` int32 (see module doc)."""
    K, N = codes.shape
    check_repackable(K, N)
    c = codes.to(torch.int64).t().contiguous()  # [N, K]: rows n, columns k
    # c[nt, g8 (dn/8), g, kc, j, k8 (dk/8), t, k1]
    c = c.reshape(N // 16, 2, 8, K // 64, 4, 2, 4, 2)
    word = torch.zeros((N // 16, 8, K // 64, 4, 4), dtype=torch.int64, device=codes.device)  # [nt, g, kc, j, t]
    for r, (dn, dk) in enumerate(_FRAG):
        part = c[:, dn // 8, :, :, :, dk // 8, :, dk % 2]  # [nt, g, kc, j, t]
        word |= part << (4 * _NIBBLE[r])
    # -> [nt, kc, lane = 4 g + t, j]
    word = word.permute(0, 2, 1, 4, 3).reshape(N // 16, K // 64, 32, 4)
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's complement into int32


def fragments_to_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`codes_to_fragments`: ``[N/16, K/64, 32, 4]`` -> codes ``[K, N]`` int32."""
    NT, KC, _, _ = packed.shape
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(NT, KC, 8, 4, 4).permute(0, 2, 1, 4, 3)  # [nt, kc, g, t, j] -> [nt, g, kc, j, t]
    c = torch.zeros((NT, 2, 8, KC, 4, 2, 4, 2), dtype=torch.int64, device=packed.device)
    for r, (dn, dk) in enumerate(_FRAG):
        c[:, dn // 8, :, :, :, dk // 8, :, dk % 2] = (w >> (4 * _NIBBLE[r])) & 0xF
    return c.reshape(NT * 16, KC * 64).t().contiguous().to(torch.int32)


def repack_awq(qweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ ``qweight [K, N/8]`` -> fragment order ``[N/16, K/64, 32, 4]`` (one copy; run once at load)."""
    return codes_to_fragments(unpack_int4(qweight))
