"""Decode GEMV whose packed weights stream through the bulk tensor copy engine (TMA), a few groups deep.

Why. The register-only GEMVs of :mod:`kernels.awq_gemv_decode` issue one 4-byte load per packed word and thread;
on the H100 their best configs read 55-67 % of the copy bandwidth at M = 1, with ``long scoreboard`` the top
stall (Nsight Compute), and neither more bytes in flight per thread (``DEPTH``) nor more warps (``KW``) moved
them further. Here one instruction copies a whole quantization group of a column tile (``[GROUP, BLOCK_J]``
words, 16 KB at g128 x 32 words) into shared memory, and Triton's software pipeliner (``tl.range(num_stages=)``,
which also pipelines loads that feed no ``tl.dot``) keeps ``NUM_STAGES - 1`` groups in flight per program
while one is computed. The activation slice comes by TMA too; the zero points and the scales (bf16 pairs read
as 32-bit words) by ``cp.async``, in the same pipeline.

Arithmetic as in the other GEMVs: ``(w >> 16*(c&1)) & (0xF << 4p) | 0x4B000000`` read as fp32 is ``2**23 +
q * 16**p`` exactly, minus the zero point made the same way (exact), times x. The tile's register layout (chosen
by Triton for the copy out of shared memory) gives each thread a few words of ``R`` rows, the same rows for
every group; ``tl.reshape`` to ``[R, GROUP / R, BLOCK_J]`` and a sum over the first axis adds a thread's own
rows only (no shuffles, checked in the sm_90 TTGIR), the result is scaled per column and kept per thread;
the sum across threads happens once, at the end. ``R`` must equal the layout's register repeats along the
rows for that to hold (the launcher computes it: ``GROUP * BLOCK_J / (128 * num_warps)``); another ``R``
is still correct, only slower.

One row of x per program (grid axis 2). Split-K partials as in the other kernels (``TAIL``). Needs 16-byte
aligned rows: ``N / 8`` a multiple of 4 and x rows 16-byte aligned (:func:`tma_ok`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .awq_gemv_decode import _col, _finish8, _scales8, _zero_points
from .awq_triton import _out_and_ws, _split_args, _tail, finish_split, pdl_release, tile_counters

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without host-side tensor descriptors
    TensorDescriptor = None


@triton.jit
def _cols(w, magic):
    """The eight columns of each word as fp32 ``2**23 + q * 16**p``, in nibble order (columns 0,2,4,6,1,3,5,7)."""
    wh = (w.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)
    return (_col(w, 0, 0, magic), _col(w, 0, 1, magic), _col(w, 0, 2, magic), _col(w, 0, 3, magic),
            _col(wh, 0, 0, magic), _col(wh, 0, 1, magic), _col(wh, 0, 2, magic), _col(wh, 0, 3, magic))


@triton.jit
def _scales_nibble_order(s_ptr, g, N, offs_j, PAIRS: tl.constexpr):
    """Group ``g``'s scales of each word's eight columns in nibble order, times ``16**-p``. ``PAIRS`` (bf16
    scales): four 32-bit loads per word, each holding columns ``2p`` (low half) and ``2p + 1`` (high half);
    a bf16 widens to fp32 by moving it to the high half."""
    if PAIRS:
        sp = s_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (g * N + offs_j * 8) // 2
        w0 = tl.load(sp + 0)
        w1 = tl.load(sp + 1)
        w2 = tl.load(sp + 2)
        w3 = tl.load(sp + 3)
        hi = -65536  # 0xFFFF0000
        return ((w0 << 16).to(tl.float32, bitcast=True), (w1 << 16).to(tl.float32, bitcast=True) * (1.0 / 16),
                (w2 << 16).to(tl.float32, bitcast=True) * (1.0 / 256),
                (w3 << 16).to(tl.float32, bitcast=True) * (1.0 / 4096),
                (w0 & hi).to(tl.float32, bitcast=True), (w1 & hi).to(tl.float32, bitcast=True) * (1.0 / 16),
                (w2 & hi).to(tl.float32, bitcast=True) * (1.0 / 256),
                (w3 & hi).to(tl.float32, bitcast=True) * (1.0 / 4096))
    else:
        return _scales8(s_ptr, g, N, offs_j)


@triton.jit
def _own_rows(x, f, z, R: tl.constexpr, GROUP: tl.constexpr, BLOCK_J: tl.constexpr):
    """``sum_k x_k (f_k - z)`` over the rows ``k = i * GROUP / R + r`` (i < R) for each ``r``: with ``R`` the
    layout's register repeats these are one thread's rows, so the sum stays inside the thread."""
    return tl.sum(tl.reshape(x * (f - z[None, :]), (R, GROUP // R, BLOCK_J)), axis=0)


@triton.jit(do_not_specialize=["magic"])
def _awq_gemv_tma_kernel(
    x_desc, w_desc, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_ym, SPLIT_K, groups_per_split, magic,
    N8: tl.constexpr, GROUP: tl.constexpr, BLOCK_J: tl.constexpr, R: tl.constexpr, NUM_STAGES: tl.constexpr,
    PAIRS: tl.constexpr, HAS_BIAS: tl.constexpr, TAIL: tl.constexpr,
):
    pdl_release()
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    j0 = pid_j * BLOCK_J
    offs_j = j0 + tl.arange(0, BLOCK_J)
    jmask = offs_j < N8
    offs_jl = tl.minimum(offs_j, N8 - 1)  # tail lanes re-read the last word's zeros and scales
    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)

    a0 = tl.zeros((GROUP // R, BLOCK_J), dtype=tl.float32)
    a1 = tl.zeros_like(a0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    a4 = tl.zeros_like(a0)
    a5 = tl.zeros_like(a0)
    a6 = tl.zeros_like(a0)
    a7 = tl.zeros_like(a0)
    for g in tl.range(g0, g1, num_stages=NUM_STAGES):
        w = w_desc.load([g * GROUP, j0])                                           # [GROUP, BLOCK_J] words
        xv = tl.reshape(x_desc.load([m, g * GROUP]), (GROUP,)).to(tl.float32)[:, None]
        z0, z1, z2, z3, z4, z5, z6, z7 = _zero_points(tl.load(qz_ptr + g * N8 + offs_jl), magic)
        s0, s1, s2, s3, s4, s5, s6, s7 = _scales_nibble_order(s_ptr, g, N, offs_jl, PAIRS)
        f0, f1, f2, f3, f4, f5, f6, f7 = _cols(w, magic)
        a0 += _own_rows(xv, f0, z0, R, GROUP, BLOCK_J) * s0[None, :]
        a1 += _own_rows(xv, f1, z1, R, GROUP, BLOCK_J) * s1[None, :]
        a2 += _own_rows(xv, f2, z2, R, GROUP, BLOCK_J) * s2[None, :]
        a3 += _own_rows(xv, f3, z3, R, GROUP, BLOCK_J) * s3[None, :]
        a4 += _own_rows(xv, f4, z4, R, GROUP, BLOCK_J) * s4[None, :]
        a5 += _own_rows(xv, f5, z5, R, GROUP, BLOCK_J) * s5[None, :]
        a6 += _own_rows(xv, f6, z6, R, GROUP, BLOCK_J) * s6[None, :]
        a7 += _own_rows(xv, f7, z7, R, GROUP, BLOCK_J) * s7[None, :]

    n8 = offs_j[None, :] * 8
    _finish8(tl.sum(a0, axis=0)[None, :], tl.sum(a1, axis=0)[None, :], tl.sum(a2, axis=0)[None, :],
             tl.sum(a3, axis=0)[None, :], tl.sum(a4, axis=0)[None, :], tl.sum(a5, axis=0)[None, :],
             tl.sum(a6, axis=0)[None, :], tl.sum(a7, axis=0)[None, :], y_ptr, ws_ptr, cnt_ptr, b_ptr,
             m * stride_ym, m * N, n8, jmask[None, :], m * tl.num_programs(0) + pid_j, pid_k, M, N, SPLIT_K,
             HAS_BIAS, TAIL)


def tma_ok(x2: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether the copy engine can read these operands: 16-byte aligned bases and row strides."""
    return (TensorDescriptor is not None and qweight.shape[1] % 4 == 0 and qweight.data_ptr() % 16 == 0
            and x2.data_ptr() % 16 == 0 and (x2.stride(0) * x2.element_size()) % 16 == 0 and x2.stride(1) == 1)


def rows_per_thread(group_size: int, block_j: int, num_warps: int) -> int:
    """Register repeats along the rows of a ``[group_size, block_j]`` int32 tile in the layout Triton gives a
    copy out of shared memory (16-byte vectors along the row, the rest of the warp down the rows, warps
    stacked down the rows): ``group_size / (rows covered by one pass of the program)``."""
    rows_per_pass = (32 // max(1, block_j // 4)) * num_warps
    return max(1, group_size // max(1, rows_per_pass))


def gemv_tma(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
             BLOCK_J: int = 32, split_k: int = 1, num_warps: int = 4, NUM_STAGES: int = 3, R: int = 0,
             TAIL: int = 0, act: str | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` for decode-sized ``M`` (one program per row of x), weights by TMA; see module doc.

    ``BLOCK_J`` packed words per program (a multiple of 4, at most 256), ``NUM_STAGES`` the software pipeline's
    depth in groups, ``R`` the rows each thread sums on its own (0: :func:`rows_per_thread`)."""
    if not tma_ok(x2, qweight):
        raise ValueError("gemv_tma needs N/8 a multiple of 4 and 16-byte aligned x rows and weights "
                         "(Triton with triton.tools.tensor_descriptor); use another kernel for these operands")
    if BLOCK_J % 4 or not 4 <= BLOCK_J <= 256:
        raise ValueError(f"gemv_tma: BLOCK_J must be a multiple of 4 in [4, 256], got {BLOCK_J}")
    tail = _tail(TAIL)
    M, K = x2.shape
    N = scales.shape[1]
    N8 = N // 8
    r = R or rows_per_thread(group_size, BLOCK_J, num_warps)
    if group_size % r:
        raise ValueError(f"gemv_tma: R={r} must divide group_size={group_size}")
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (triton.cdiv(N8, BLOCK_J), split_k, M)
    cnt = tile_counters(x2.device, grid[0] * grid[2]) if split_k > 1 and tail else y
    w_desc = TensorDescriptor(qweight, [K, N8], [N8, 1], [group_size, BLOCK_J])
    x_desc = TensorDescriptor(x2, [M, K], [x2.stride(0), 1], [1, group_size])
    _awq_gemv_tma_kernel[grid](
        x_desc, w_desc, qzeros, scales, bias if bias is not None else y, y, ws, cnt,
        M, N, K, y.stride(0), split_k, gps, 0x4B000000,
        N8=N8, GROUP=group_size, BLOCK_J=BLOCK_J, R=r, NUM_STAGES=NUM_STAGES,
        PAIRS=scales.dtype == torch.bfloat16, HAS_BIAS=bias is not None, TAIL=tail, num_warps=num_warps,
    )
    return finish_split(ws, y, bias, split_k > 1 and tail == 0, act)
