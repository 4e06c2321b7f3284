"""Triton W4A16 kernels that read the AutoAWQ GEMM layout directly (no repack).

Four variants, one launcher each (the dispatcher in :mod:`kernels.dispatch` picks one by M):

* ``gemv``    split-K GEMV on CUDA cores, for decode (M = 1 .. ~8). Each program owns ``BLOCK_N`` columns,
              a slice of K, and ``BLOCK_M`` rows; one K step is exactly one quantization group.
* ``splitk``  split-K ``tl.dot`` kernel (tensor cores) for small batches: the int4 tile is dequantized to
              the activation dtype in registers and fed to ``tl.dot``; the group scale is applied to the
              per-group dot result (fp32) instead of to every weight.
* ``gemm``    the same ``tl.dot`` kernel with ``split_k = 1``, large tiles, grouped tile order and the
              scale applied per weight (large M).
* ``dequant`` a dequantize kernel writing a dense ``[K, N]`` weight, then ``torch.matmul`` (cuBLAS) — prefill.

Unpacking without integer-to-float conversions. Nibble ``i`` of an int32 holds column ``8j + AWQ_ORDER[i]``,
so column offset ``c`` (0..7) sits in nibble ``(0,4,1,5,2,6,3,7)[c]``: in the low 16-bit half for even ``c``
and in the high half for odd ``c``, at bit ``4 * (c // 2)`` of that half. We keep the nibble *in place*:
``((w >> 16 * (c % 2)) & (0xF << 4 * (c // 2))) | 0x4B000000`` reinterpreted as fp32 is exactly
``2**23 + q * 16**(c // 2)``. The zero point is prepared the same way, so one fp32 subtraction gives
``(q - z) * 16**p`` exactly (|value| <= 15 * 4096, exact in fp32, bf16 and fp16), and the factor ``16**-p``
is folded into the group's scale. Per weight that is one shift per int32 (shared by 4 weights), one
and/or, one subtraction — no I2F (quarter rate on Hopper).

Split-K reduction, in one launch: each program writes its fp32 partial tile to a workspace, then
increments a per-tile counter (acq_rel, GPU scope); the last program of a tile sums the partials in fixed
split order (deterministic), adds the bias, writes the output and resets the counter to 0. The counters live
in a persistent, zero-initialised int32 buffer per device (see :func:`tile_counters`), so the op allocates
only a ``torch.empty`` workspace from the caching allocator: CUDA-graph safe. Ops that share a device must
not run concurrently on different streams (they would share counters).

Accumulation is fp32 everywhere. Zeros and scales are loaded once per group (one K step == one group).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAGIC = 0x4B000000  # fp32 bits of 2**23
MAGIC_F = 8388608.0
MAX_TILES = 1 << 16  # counters per device


# ---------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, y_offs, ws_offs, n_offs, mask, tile_id, pid_k, M, N,
            SPLIT_K, HAS_BIAS: tl.constexpr):
    """Store ``acc`` (+bias) to ``y``; with split-K, reduce the partials first (last program of the tile)."""
    if SPLIT_K == 1:
        out = acc
        if HAS_BIAS:
            out += tl.load(b_ptr + n_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * M * N + ws_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        prev = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if prev == SPLIT_K - 1:
            tot = tl.zeros_like(acc)
            for s in range(0, SPLIT_K):  # fixed order: the sum does not depend on arrival order
                tot += tl.load(ws_ptr + s * M * N + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(b_ptr + n_offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + y_offs, tot.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)  # ready for the next launch (and the next graph replay)


# ---------------------------------------------------------------------------------------------------------
# split-K GEMV (CUDA cores)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _awq_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, SPLIT_K, groups_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    BN8: tl.constexpr = BLOCK_N // 8
    N8 = N // 8

    offs_j = pid_n * BN8 + tl.arange(0, BN8)  # int32 columns of the packed tensors
    c = tl.arange(0, 8)
    sh = ((c % 2) * 16)[None, :]  # [1, 8]
    mk = (0xF << ((c // 2) * 4))[None, :]
    fac = 1.0 / (1 << ((c // 2) * 4)).to(tl.float32)[None, :]  # 16**-p
    n2 = offs_j[:, None] * 8 + c[None, :]  # [BN8, 8] output columns
    jmask = offs_j < N8
    nmask2 = n2 < N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, GROUP)

    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)

    acc = tl.zeros((BLOCK_M, BN8, 8), dtype=tl.float32)
    for g in range(g0, g1):
        z = tl.load(qz_ptr + g * N8 + offs_j, mask=jmask, other=0)
        zf = (((z[:, None] >> sh) & mk) | MAGIC).to(tl.float32, bitcast=True)  # 2**23 + z*16**p
        s = tl.load(s_ptr + g * N + n2, mask=nmask2, other=0.0).to(tl.float32) * fac
        k = g * GROUP + offs_k
        w = tl.load(qw_ptr + k[:, None] * N8 + offs_j[None, :], mask=jmask[None, :], other=0)
        wf = (((w[:, :, None] >> sh[None]) & mk[None]) | MAGIC).to(tl.float32, bitcast=True)
        wd = wf - zf[None]  # (q - z) * 16**p, exact
        for mm in tl.static_range(BLOCK_M):
            m = pid_m * BLOCK_M + mm
            xm = tl.load(x_ptr + m * stride_xm + k, mask=(k < K) & (m < M), other=0.0).to(tl.float32)
            part = tl.sum(xm[:, None, None] * wd, axis=0) * s  # [BN8, 8]
            if BLOCK_M == 1:
                acc += part[None]
            else:
                acc += tl.where((tl.arange(0, BLOCK_M) == mm)[:, None, None], part[None], 0.0)

    r3 = rows[:, None, None]
    n3 = n2[None]
    mask = (r3 < M) & (n3 < N)
    tile_id = pid_m * tl.num_programs(0) + pid_n
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, r3 * stride_ym + n3, r3 * N + n3, n3, mask, tile_id, pid_k,
            M, N, SPLIT_K, HAS_BIAS)


# ---------------------------------------------------------------------------------------------------------
# tl.dot kernel: split-K for small M, tiled GEMM (split_k=1) for large M
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _awq_dot_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, SPLIT_K, groups_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_AFTER: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles share each weight tile while it is in L2
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    gm = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % width) % gm)
    pid_n = (pid % width) // gm

    BN8: tl.constexpr = BLOCK_N // 8
    N8 = N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_n * BN8 + tl.arange(0, BN8)
    offs_k = tl.arange(0, GROUP)
    c = tl.arange(0, 8)
    sh3 = ((c % 2) * 16)[None, None, :]
    mk3 = (0xF << ((c // 2) * 4))[None, None, :]
    cn = offs_n % 8
    shn = (cn % 2) * 16
    mkn = 0xF << ((cn // 2) * 4)
    fac = 1.0 / (1 << ((cn // 2) * 4)).to(tl.float32)
    nmask = offs_n < N
    jmask = offs_j < N8
    mmask = offs_m < M

    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g0, g1):
        k = g * GROUP + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mmask[:, None], other=0.0)
        w = tl.load(qw_ptr + k[:, None] * N8 + offs_j[None, :], mask=jmask[None, :], other=0)
        z = tl.load(qz_ptr + g * N8 + offs_n // 8, mask=nmask, other=0)
        s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32) * fac
        zf = (((z >> shn) & mkn) | MAGIC).to(tl.float32, bitcast=True)
        wf = (((w[:, :, None] >> sh3) & mk3) | MAGIC).to(tl.float32, bitcast=True)
        wf = tl.reshape(wf, (GROUP, BLOCK_N)) - zf[None, :]  # (q - z) * 16**p, exact
        if SCALE_AFTER:
            part = tl.dot(a, wf.to(a.dtype))
            acc += part * s[None, :]
        else:
            acc = tl.dot(a, (wf * s[None, :]).to(a.dtype), acc)

    tile_id = pid_m * num_pid_n + pid_n
    mask = mmask[:, None] & nmask[None, :]
    n2 = offs_n[None, :]
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, offs_m[:, None] * stride_ym + n2, offs_m[:, None] * N + n2,
            n2, mask, tile_id, pid_k, M, N, SPLIT_K, HAS_BIAS)


# ---------------------------------------------------------------------------------------------------------
# dequantize to a dense [K, N] weight (for the cuBLAS path)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _awq_dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    BN8: tl.constexpr = BLOCK_N // 8
    N8 = N // 8
    offs_j = pid_n * BN8 + tl.arange(0, BN8)
    c = tl.arange(0, 8)
    sh = ((c % 2) * 16)[None, :]
    mk = (0xF << ((c // 2) * 4))[None, :]
    fac = 1.0 / (1 << ((c // 2) * 4)).to(tl.float32)[None, :]
    n2 = offs_j[:, None] * 8 + c[None, :]
    jmask = offs_j < N8
    nmask2 = n2 < N
    z = tl.load(qz_ptr + g * N8 + offs_j, mask=jmask, other=0)
    zf = (((z[:, None] >> sh) & mk) | MAGIC).to(tl.float32, bitcast=True)
    s = tl.load(s_ptr + g * N + n2, mask=nmask2, other=0.0).to(tl.float32) * fac
    k = g * GROUP + tl.arange(0, GROUP)
    w = tl.load(qw_ptr + k[:, None] * N8 + offs_j[None, :], mask=jmask[None, :], other=0)
    wf = (((w[:, :, None] >> sh[None]) & mk[None]) | MAGIC).to(tl.float32, bitcast=True)
    wd = (wf - zf[None]) * s[None]
    tl.store(w_ptr + k[:, None, None] * N + n2[None], wd.to(w_ptr.dtype.element_ty), mask=nmask2[None])


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------
_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The persistent zeroed int32 counters of ``device`` (made on first use, outside graph capture).

    Kernels leave every counter at 0 when they finish. If the buffer does not exist yet while a CUDA graph
    is being captured, a per-call zeroed buffer is used instead (correct, one memset more per call).
    """
    if tiles > MAX_TILES:
        raise ValueError(f"awq split-K launch with {tiles} tiles exceeds MAX_TILES={MAX_TILES}")
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            return torch.zeros(tiles, dtype=torch.int32, device=device)
        buf = _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return buf


def _split_args(num_groups: int, split_k: int) -> tuple[int, int]:
    """Clamp split_k so every split owns >= 1 group; return (split_k, groups_per_split)."""
    split_k = max(1, min(int(split_k), num_groups))
    gps = triton.cdiv(num_groups, split_k)
    return triton.cdiv(num_groups, gps), gps


def _out_and_ws(x2, N, out, split_k):
    M = x2.shape[0]
    y = out if out is not None else torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    ws = torch.empty((split_k, M, N), dtype=torch.float32, device=x2.device) if split_k > 1 else y
    return y, ws


def gemv(x2, qweight, qzeros, scales, group_size, bias=None, *, out=None, BLOCK_N=128, BLOCK_M=None,
         split_k=1, num_warps=4, num_stages=1):
    """Split-K GEMV. ``x2`` is ``[M, K]`` (row stride free, unit column stride)."""
    M, K = x2.shape
    N = scales.shape[1]
    if BLOCK_M is None:
        BLOCK_M = min(8, triton.next_power_of_2(M))
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M), split_k)
    cnt = tile_counters(x2.device, grid[0] * grid[1]) if split_k > 1 else y
    _awq_gemv_kernel[grid](
        x2, qweight, qzeros, scales, bias if bias is not None else y, y, ws, cnt,
        M, N, K, x2.stride(0), y.stride(0), split_k, gps,
        GROUP=group_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_BIAS=bias is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y


def dot(x2, qweight, qzeros, scales, group_size, bias=None, *, out=None, BLOCK_M=16, BLOCK_N=64, split_k=1,
        GROUP_M=8, SCALE_AFTER=True, num_warps=4, num_stages=3):
    """``tl.dot`` kernel: split-K (small M) or a tiled GEMM (``split_k=1``, large M)."""
    M, K = x2.shape
    N = scales.shape[1]
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    cnt = tile_counters(x2.device, tiles) if split_k > 1 else y
    _awq_dot_kernel[(tiles, split_k)](
        x2, qweight, qzeros, scales, bias if bias is not None else y, y, ws, cnt,
        M, N, K, x2.stride(0), y.stride(0), split_k, gps,
        GROUP=group_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M, SCALE_AFTER=SCALE_AFTER,
        HAS_BIAS=bias is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return y


def dequantize_triton(qweight, qzeros, scales, group_size, dtype=None, *, out=None, BLOCK_N=128, num_warps=4):
    """Dense ``[K, N]`` weight in ``dtype`` (default ``scales.dtype``), math in fp32."""
    K = qweight.shape[0]
    N = scales.shape[1]
    dtype = dtype or scales.dtype
    w = out if out is not None else torch.empty((K, N), dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(N, BLOCK_N), K // group_size)
    _awq_dequant_kernel[grid](qweight, qzeros, scales, w, N, K, GROUP=group_size, BLOCK_N=BLOCK_N,
                              num_warps=num_warps)
    return w


def dequant_matmul(x2, qweight, qzeros, scales, group_size, bias=None, *, out=None, BLOCK_N=128, num_warps=4):
    """Dequantize (Triton) then ``torch.matmul`` (cuBLAS): the prefill path."""
    w = dequantize_triton(qweight, qzeros, scales, group_size, x2.dtype, BLOCK_N=BLOCK_N, num_warps=num_warps)
    if bias is not None:
        if out is not None:
            return torch.addmm(bias.to(x2.dtype), x2, w, out=out)
        return torch.addmm(bias.to(x2.dtype), x2, w)
    return torch.matmul(x2, w, out=out) if out is not None else torch.matmul(x2, w)


KERNELS = {"gemv": gemv, "splitk": dot, "gemm": dot, "dequant": dequant_matmul}
