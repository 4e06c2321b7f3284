"""Split-K W4A16 for small batches with the operands swapped: ``y^T = W^T @ x^T``.

With the dequantized weight as the ``tl.dot`` B operand (``awq_triton``'s ``splitk``), Triton picks mma v2
at BLOCK_M = 16 and stages B through shared memory with barriers every group, which serialises the kernel
(flat at ~37 us for 8192x8192, M = 1..16, on the H100). With the weight tile as the **A** operand
(``[BLOCK_N, GROUP]``, BLOCK_N >= 64) and x^T as B (``[GROUP, BLOCK_M]``), the batch becomes the MMA's N
dimension and Triton emits Hopper's asynchronous wgmma with A in registers (see docs/kernels_notes.md).

Arithmetic as in ``splitk``: the MMA sees the exact small integers ``OFF + q`` (one ``lop3`` per pair of
weights), and per group ``acc += s * (W'^T x - (OFF + z) * sum(x))`` in fp32. Split-K partials are reduced
in the same launch by ``awq_triton``'s counter scheme. Not yet measured on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .awq_triton import (_INTERPRET, _PDL_LAUNCH, _codes_minus_zeros, _codes_plus_offset, _finish, _load_group, _out_and_ws,
                         _split_args, _zero_pairs, _tail, finish_split, pdl_enter, tile_counters)


@triton.jit
def _awq_dot_swap_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, N8, K, stride_xm, stride_ym, SPLIT_K, groups_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, USE_ASM: tl.constexpr, TAIL: tl.constexpr, ZSUB: tl.constexpr = False,
):
    pdl_enter()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    BN8: tl.constexpr = BLOCK_N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_n * BN8 + tl.arange(0, BN8)
    offs_k = tl.arange(0, GROUP)
    mmask = offs_m < M
    nmask = offs_n < N
    OFF: tl.constexpr = 128.0 if x_ptr.dtype.element_ty == tl.bfloat16 else 1024.0
    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)

    # the next group's tiles are loaded while this group is unpacked and multiplied (Triton pipelines only
    # loads that feed tl.dot directly; the weight words do not)
    x_n, w_n, z_n, s_n = _load_group(x_ptr, qw_ptr, qz_ptr, s_ptr, g0, g0 < g1, offs_m, offs_j, offs_n, offs_k,
                                     M, N, N8, stride_xm, GROUP, True)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(g0, g1):
        x, w, z, s = x_n, w_n, z_n, s_n
        x_n, w_n, z_n, s_n = _load_group(x_ptr, qw_ptr, qz_ptr, s_ptr, g + 1, g + 1 < g1, offs_m, offs_j, offs_n,
                                         offs_k, M, N, N8, stride_xm, GROUP, True)
        xt = tl.trans(x)                                                                               # [GROUP, BM]
        if ZSUB:  # q - z made per pair of weights before the MMA
            a = tl.trans(_codes_minus_zeros(w, _zero_pairs(z, offs_n, xt.dtype)[None, :], xt.dtype, USE_ASM))
        else:
            a = tl.trans(_codes_plus_offset(w, offs_n[None, :], xt.dtype, USE_ASM))                 # [BN, GROUP]
        if DOT_F32:  # interpreter only: its bf16 tl.dot is broken; same (exact) operands in fp32
            part = tl.dot(a.to(tl.float32), xt.to(tl.float32))
        else:
            part = tl.dot(a, xt)                                                                       # [BN, BM]
        if ZSUB:
            acc += part * s.to(tl.float32)[:, None]
        else:
            xs = tl.sum(xt.to(tl.float32), axis=0)                                                     # [BM]
            zo = ((z >> ((((offs_n >> 1) & 3) << 2) + ((offs_n & 1) << 4))) & 0xF).to(tl.float32) + OFF
            acc += (part - zo[:, None] * xs[None, :]) * s.to(tl.float32)[:, None]

    n2 = offs_n[:, None]
    m2 = offs_m[None, :]
    tile_id = pid_m * tl.num_programs(0) + pid_n
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, m2 * stride_ym + n2, m2 * N + n2, n2, nmask[:, None] & mmask[None, :],
            tile_id, pid_k, M, N, SPLIT_K, HAS_BIAS, TAIL)


def dot_swap(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None, BLOCK_M: int = 16,
             BLOCK_N: int = 128, split_k: int = 1, num_warps: int = 4, num_stages: int = 1,
             TAIL: int = 4, ZSUB: bool = False, act: str | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` computed as ``(W^T x2^T)^T``; ``BLOCK_M`` >= 16, ``BLOCK_N`` >= 64 (wgmma's M).
    ``ZSUB``: zero points subtracted from the codes before the MMA (see ``awq_triton._codes_minus_zeros``).
    ``TAIL``: how split-K partials are summed (``awq_triton._finish``; 0 = a second launch)."""
    M, K = x2.shape
    N = scales.shape[1]
    block_m = max(16, min(BLOCK_M, triton.next_power_of_2(M)))
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (triton.cdiv(N, BLOCK_N), split_k, triton.cdiv(M, block_m))
    cnt = tile_counters(x2.device, grid[0] * grid[2]) if split_k > 1 and TAIL else y
    _awq_dot_swap_kernel[grid](
        x2, qweight, qzeros, scales, bias if bias is not None else y, y, ws, cnt,
        M, N, N // 8, K, x2.stride(0), y.stride(0), split_k, gps,
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=BLOCK_N, HAS_BIAS=bias is not None,
        DOT_F32=_INTERPRET and x2.dtype == torch.bfloat16, USE_ASM=not _INTERPRET, TAIL=_tail(TAIL), ZSUB=ZSUB,
        num_warps=num_warps, num_stages=num_stages, **_PDL_LAUNCH,
    )
    return finish_split(ws, y, bias, split_k > 1 and TAIL == 0, act)
