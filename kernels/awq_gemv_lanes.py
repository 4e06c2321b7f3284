"""A decode GEMV that never reorders the packed weights: the eight nibbles of a word stay a tensor axis.

The other kernels turn a ``[K, N/8]`` tile of int32 words into a ``[K, N]`` tile (``tl.interleave``), which the
compiler does through shared memory with barriers. Here a word's eight columns are the last axis of a
``[BLOCK_K, BLOCK_J, 8]`` tensor made by broadcasting the word against eight shift amounts, so unpacking is
two integer ops per weight in registers. Scales and zeros are ``[BLOCK_J, 8]`` tiles read contiguously
(``scales[g, 8j + c]``), and the output ``y[m, 8j + c]`` is a contiguous ``[BLOCK_J, 8]`` tile too: no layout
conversion anywhere. Per group the codes are reduced against x once (``sum x*q``) and the scale and zero point
are applied to that sum: ``s * (sum x*q - z * sum x)``.

Each program takes ``BLOCK_J`` words (``8 * BLOCK_J`` columns), a slice of K groups (split-K, reduced in one
launch by ``awq_triton``'s counter scheme) and all ``BLOCK_M <= 8`` rows of x, so a weight is read once for
every row. Measured on the H100 (runs fd50715, a0b5208) it lost to the decode and swap kernels on every
shape, so it is no longer in the tuning candidates; it stays runnable through an explicit config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .awq_layout import AWQ_REVERSE_ORDER
from .awq_triton import _finish, _out_and_ws, _split_args, tile_counters

# shift of column c inside its word: 4 * (nibble that holds column c)
SHIFTS: tuple[int, ...] = tuple(4 * n for n in AWQ_REVERSE_ORDER)


@triton.jit
def _shifts():
    """``[8]`` int32: bit offset of column ``c`` of a word (AutoAWQ order 0,2,4,6,1,3,5,7)."""
    c = tl.arange(0, 8)
    nib = (c >> 1) + (c & 1) * 4  # column c lives in nibble c/2 (even c) or 4 + c/2 (odd c)
    return nib * 4


@triton.jit
def _awq_lanes_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, N8, K, stride_xm, stride_ym, SPLIT_K, groups_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = tl.arange(0, 8)
    offs_kk = tl.arange(0, BLOCK_K)
    sh = _shifts()
    jmask = offs_j < N8
    mmask = offs_m < M
    n2 = offs_j[:, None] * 8 + offs_c[None, :]          # [BJ, 8] output columns
    nmask2 = jmask[:, None] & (offs_c[None, :] < 8)

    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)
    acc = tl.zeros((BLOCK_M, BLOCK_J, 8), dtype=tl.float32)
    for g in range(g0, g1):
        part = tl.zeros((BLOCK_M, BLOCK_J, 8), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for kk in tl.static_range(GROUP // BLOCK_K):
            k = g * GROUP + kk * BLOCK_K + offs_kk
            w = tl.load(qw_ptr + k[:, None] * N8 + offs_j[None, :], mask=jmask[None, :], other=0)  # [BK, BJ]
            q = ((w[:, :, None] >> sh[None, None, :]) & 0xF).to(tl.float32)                        # [BK, BJ, 8]
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mmask[:, None],
                         other=0.0).to(tl.float32)                                                 # [BM, BK]
            part += tl.sum(xk[:, :, None, None] * q[None, :, :, :], axis=1)
            xsum += tl.sum(xk, axis=1)
        z = tl.load(qz_ptr + g * N8 + offs_j, mask=jmask, other=0)
        zf = ((z[:, None] >> sh[None, :]) & 0xF).to(tl.float32)                                    # [BJ, 8]
        s = tl.load(s_ptr + g * N + n2, mask=nmask2, other=0.0).to(tl.float32)                     # [BJ, 8]
        acc += s[None, :, :] * (part - xsum[:, None, None] * zf[None, :, :])

    m3 = offs_m[:, None, None]
    n3 = n2[None, :, :]
    mask = mmask[:, None, None] & nmask2[None, :, :]
    tile_id = pid_j
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, m3 * stride_ym + n3, m3 * N + n3, n3, mask, tile_id, pid_k,
            M, N, SPLIT_K, HAS_BIAS, 4)


def lanes(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
          bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None, BLOCK_J: int = 32,
          BLOCK_K: int = 32, split_k: int = 1, num_warps: int = 4, num_stages: int = 1) -> torch.Tensor:
    """``x2 [M, K] @ W`` for ``M <= 8``; ``x2`` has unit column stride."""
    M, K = x2.shape
    if M > 8:
        raise ValueError(f"lanes GEMV takes at most 8 rows, got M={M}")
    N = scales.shape[1]
    block_m = max(1, triton.next_power_of_2(M))
    block_k = min(BLOCK_K, group_size)
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (triton.cdiv(N // 8, BLOCK_J), split_k)
    cnt = tile_counters(x2.device, grid[0]) if split_k > 1 else y
    _awq_lanes_kernel[grid](
        x2, qweight, qzeros, scales, bias if bias is not None else y, y, ws, cnt,
        M, N, N // 8, K, x2.stride(0), y.stride(0), split_k, gps,
        GROUP=group_size, BLOCK_M=block_m, BLOCK_J=BLOCK_J, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y
