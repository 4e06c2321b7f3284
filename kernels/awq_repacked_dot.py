"""Tensor-core GEMM and dequantize kernels that read the fragment-repacked weights (experimental).

Why: the Gluon kernel (:mod:`kernels.awq_gluon_mma`) is 1.2-1.7x faster than the AutoAWQ-layout kernels at
M = 2-16 on an H100, but it needs the weights in the ``mma.m16n8k16`` fragment order of
:mod:`kernels.awq_repack`, and only one copy of the weights may be kept. These are the kernels for the other
batch sizes on that same copy: a split-K ``tl.dot`` kernel (M = 32-128, the ``splitk`` kernel's place) and a
dequantize kernel for dequantize + cuBLAS (prefill).

A 64-feature chunk of 16 columns is 128 words, ``[lane = 4 g + t, j]``; nibble ``p = 4 b0 + 2 b2 + b1`` of word
``(g, t, j)`` is column ``8 b1 + g``, feature ``16 j + 8 b2 + 2 t + b0``. :func:`_repacked_codes` unpacks a
``[64, 16 NT]`` tile with one reshape and one permute of the unpacked words (a relabelling of registers for the
compiler, before the shared-memory trip that ``tl.dot`` makes anyway). Zero points and scales stay in the AutoAWQ
``qzeros`` / ``scales`` layout; the MMA takes ``q - z`` (exact) and each group's sum is scaled in fp32, as in
``splitk`` (groups of 64, 128), or the weight is dequantized per element (``(q - z) * s``, as ``gemm`` does). Runs under ``TRITON_INTERPRET=1`` (CPU tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .awq_repack import check_repackable
from .awq_triton import _INTERPRET, _code_at, _out_and_ws, _split_args, finish_split


@triton.jit
def _repacked_words(pw_ptr, nt0, kc, KC, NT_TOTAL, NT: tl.constexpr):
    """Words ``[NT, 8 (g), 4 (t), 4 (j)]`` of column tiles ``nt0 .. nt0 + NT - 1``, feature chunk ``kc`` (tiles
    past ``NT_TOTAL`` read as 0): 512 contiguous bytes per tile."""
    i_nt = nt0 + tl.arange(0, NT)
    g = tl.arange(0, 8)
    t = tl.arange(0, 4)
    j = tl.arange(0, 4)
    off = (((i_nt[:, None, None, None] * KC + kc) * 32 + g[None, :, None, None] * 4 + t[None, None, :, None]) * 4
           + j[None, None, None, :])
    return tl.load(pw_ptr + off, mask=(i_nt < NT_TOTAL)[:, None, None, None], other=0)


@triton.jit
def _unpack_words(w, NT: tl.constexpr):
    """4-bit codes ``[64, 16 NT]`` (int32, feature-major like the weight in ``x @ W``) of words from
    :func:`_repacked_words`."""
    p = tl.arange(0, 8)
    q = (w[:, :, :, :, None] >> (4 * p)[None, None, None, None, :]) & 0xF  # [NT, g, t, j, p]
    q = tl.reshape(q, [NT, 8, 4, 4, 2, 2, 2])  # p -> (b0, b2, b1)
    q = tl.permute(q, [3, 5, 2, 4, 0, 6, 1])  # [j, b2, t, b0, nt, b1, g]: feature 16 j + 8 b2 + 2 t + b0, column
    return tl.reshape(q, [64, 16 * NT])  # 16 nt + 8 b1 + g


@triton.jit
def _repacked_codes(pw_ptr, nt0, kc, KC, NT_TOTAL, NT: tl.constexpr):
    """Codes ``[64, 16 NT]`` of one chunk (load + unpack)."""
    return _unpack_words(_repacked_words(pw_ptr, nt0, kc, KC, NT_TOTAL, NT), NT)


@triton.jit
def _group_zeros_scales(qz_ptr, s_ptr, g, n, N):
    """Zero points (int32) and scales (fp32) of group ``g`` for columns ``n`` (AutoAWQ ``qzeros``/``scales``)."""
    nmask = n < N
    zw = tl.load(qz_ptr + g * (N // 8) + n // 8, mask=nmask, other=0)
    return _code_at(zw, n), tl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)


@triton.jit
def _scale_chunk(q, qz_ptr, s_ptr, nt0, kc, N, GROUP: tl.constexpr, NT: tl.constexpr):
    """Codes ``q [64, 16 NT]`` of chunk ``kc`` dequantized (fp32): ``(q - z) * s`` with each feature's group."""
    GPC: tl.constexpr = 64 // GROUP if GROUP < 64 else 1  # groups in a chunk
    n = nt0 * 16 + tl.arange(0, 16 * NT)
    grp = (kc * 64) // GROUP + tl.arange(0, GPC)
    nmask = (n < N)[None, :]
    zw = tl.load(qz_ptr + grp[:, None] * (N // 8) + (n // 8)[None, :], mask=nmask, other=0)  # [GPC, BN]
    z = _code_at(zw, n[None, :])
    s = tl.load(s_ptr + grp[:, None] * N + n[None, :], mask=nmask, other=0.0).to(tl.float32)
    q3 = tl.reshape(q, [GPC, 64 // GPC, 16 * NT]).to(tl.float32)
    w = (q3 - z.to(tl.float32)[:, None, :]) * s[:, None, :]
    return tl.reshape(w, [64, 16 * NT])


@triton.jit
def _awq_repacked_dot_kernel(x_ptr, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_xm, stride_ym,
                             SPLIT_K, units_per_split, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, SCALE_AFTER: tl.constexpr,
                             PREFETCH: tl.constexpr):
    """``y [BM, BN]`` tile (or its split-K partial) of ``x @ W`` on repacked weights, one ``tl.dot`` per 64-feature
    chunk. ``SCALE_AFTER`` (groups of 64 or 128): the MMA takes ``q - z`` (exact in bf16/fp16) and each group's
    sum is scaled in fp32, the split unit is a group; else the weight is ``(q - z) * s`` and the unit a chunk.
    ``PREFETCH``: the next chunk's words are loaded before this chunk's MMA."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    NT: tl.constexpr = BN // 16
    CPU: tl.constexpr = GROUP // 64 if SCALE_AFTER else 1  # chunks per split unit
    KC = K // 64
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, 64)
    xmask = (rm < M)[:, None]
    nt0 = pid_n * NT
    u0 = pid_k * units_per_split
    u1 = tl.minimum(u0 + units_per_split, KC // CPU)
    acc = tl.zeros([BM, BN], tl.float32)
    if PREFETCH:
        words = _repacked_words(pw_ptr, nt0, u0 * CPU, KC, N // 16, NT)
    for u in range(u0, u1):
        if SCALE_AFTER:
            z, sc = _group_zeros_scales(qz_ptr, s_ptr, u, rn, N)
            acc_g = tl.zeros([BM, BN], tl.float32)
            for c in tl.static_range(CPU):
                kc = u * CPU + c
                if PREFETCH:
                    nxt = _repacked_words(pw_ptr, nt0, tl.minimum(kc + 1, KC - 1), KC, N // 16, NT)
                else:
                    words = _repacked_words(pw_ptr, nt0, kc, KC, N // 16, NT)
                wz = _unpack_words(words, NT) - z[None, :]
                x = tl.load(x_ptr + rm[:, None] * stride_xm + kc * 64 + rk[None, :], mask=xmask, other=0.0)
                if DOT_F32:  # the interpreter's bf16 dot is wrong (kernels/awq_triton.py): fp32 there, same math
                    acc_g = tl.dot(x.to(tl.float32), wz.to(tl.float32), acc_g)
                else:
                    acc_g = tl.dot(x, wz.to(x.dtype), acc_g)
                if PREFETCH:
                    words = nxt
            acc += acc_g * sc[None, :]
        else:
            if PREFETCH:
                nxt = _repacked_words(pw_ptr, nt0, tl.minimum(u + 1, KC - 1), KC, N // 16, NT)
            else:
                words = _repacked_words(pw_ptr, nt0, u, KC, N // 16, NT)
            w = _scale_chunk(_unpack_words(words, NT), qz_ptr, s_ptr, nt0, u, N, GROUP, NT)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + u * 64 + rk[None, :], mask=xmask, other=0.0)
            if DOT_F32:
                acc = tl.dot(x.to(tl.float32), w, acc)
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
            if PREFETCH:
                words = nxt
    mask = xmask & (rn < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)


@triton.jit
def _awq_repacked_dequant_kernel(pw_ptr, qz_ptr, s_ptr, w_ptr, N, K, GROUP: tl.constexpr, NT: tl.constexpr,
                                 NK: tl.constexpr):
    """Dense weight tile of ``16 NT`` columns by one 64-feature chunk, stored as ``W [K, N]`` or (``NK``) as the
    ``nn.Linear`` weight ``[N, K]``."""
    pid_n = tl.program_id(0)
    kc = tl.program_id(1)
    w = _scale_chunk(_repacked_codes(pw_ptr, pid_n * NT, kc, K // 64, N // 16, NT), qz_ptr, s_ptr, pid_n * NT, kc,
                     N, GROUP, NT)
    n = pid_n * 16 * NT + tl.arange(0, 16 * NT)
    k = kc * 64 + tl.arange(0, 64)
    if NK:
        tl.store(w_ptr + n[None, :] * K + k[:, None], w.to(w_ptr.dtype.element_ty), mask=(n < N)[None, :])
    else:
        tl.store(w_ptr + k[:, None] * N + n[None, :], w.to(w_ptr.dtype.element_ty), mask=(n < N)[None, :])


def _check(x2: torch.Tensor | None, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int]:
    K = packed.shape[1] * 64
    N = scales.shape[1]
    check_repackable(K, N)
    if packed.shape != (N // 16, K // 64, 32, 4):
        raise ValueError(f"repacked weights must be [{N // 16}, {K // 64}, 32, 4], got {tuple(packed.shape)}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"the repacked kernels take group sizes 32, 64 or 128, got {group_size}")
    if x2 is not None and (x2.shape[1] != K or x2.stride(1) != 1):
        raise ValueError(f"x must be [M, {K}] with unit column stride, got {tuple(x2.shape)}")
    return K, N


def dot_repacked(x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                 BM: int = 64, BN: int = 64, split_k: int = 1, num_warps: int = 4, num_stages: int = 2,
                 SCALE_AFTER: bool = True, PREFETCH: bool = False, act: str | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` on repacked weights (:func:`kernels.awq_repack.repack_awq`), tensor cores, split-K
    partials summed by ``reduce_partials``; ``SCALE_AFTER`` applies to groups of 64 or 128 only; ``act``: see
    :func:`kernels.awq_triton.finish_split`."""
    K, N = _check(x2, packed, scales, group_size)
    M = x2.shape[0]
    scale_after = bool(SCALE_AFTER) and group_size >= 64
    split_k, ups = _split_args(K // group_size if scale_after else K // 64, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (triton.cdiv(N, BN), split_k, triton.cdiv(M, BM))
    _awq_repacked_dot_kernel[grid](x2, packed, qzeros, scales, bias if bias is not None else y, y, ws, M, N, K,
                                   x2.stride(0), y.stride(0), split_k, ups, GROUP=group_size, BM=BM, BN=BN,
                                   HAS_BIAS=bias is not None, DOT_F32=_INTERPRET and x2.dtype == torch.bfloat16,
                                   SCALE_AFTER=scale_after, PREFETCH=bool(PREFETCH), num_warps=num_warps,
                                   num_stages=num_stages)
    return finish_split(ws, y, bias, split_k > 1, act)


def dequantize_repacked(packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                        dtype: torch.dtype | None = None, *, BN: int = 64, num_warps: int = 4,
                        nk: bool = False) -> torch.Tensor:
    """Dense weight from repacked words (math in fp32): ``[K, N]``, or with ``nk`` the ``nn.Linear`` ``[N, K]``."""
    K, N = _check(None, packed, scales, group_size)
    w = torch.empty((N, K) if nk else (K, N), dtype=dtype or scales.dtype, device=packed.device)
    _awq_repacked_dequant_kernel[(triton.cdiv(N, BN), K // 64)](packed, qzeros, scales, w, N, K, GROUP=group_size,
                                                                 NT=BN // 16, NK=bool(nk), num_warps=num_warps)
    return w


def dequant_matmul_repacked(x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                            group_size: int, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                            BN: int = 64, num_warps: int = 4, NK: bool = False) -> torch.Tensor:
    """Dequantize the repacked words (Triton), then ``torch.matmul`` (cuBLAS): the prefill path. ``NK``: the
    weight is written ``[N, K]`` and multiplied as ``x @ W^T``, the operand order of ``nn.Linear`` (cuBLAS "TN")."""
    w = dequantize_repacked(packed, qzeros, scales, group_size, x2.dtype, BN=BN, num_warps=num_warps, nk=NK)
    w = w.t() if NK else w
    if bias is not None:
        return torch.addmm(bias.to(x2.dtype), x2, w, out=out) if out is not None else torch.addmm(
            bias.to(x2.dtype), x2, w)
    return torch.matmul(x2, w, out=out) if out is not None else torch.matmul(x2, w)
