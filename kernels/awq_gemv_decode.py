"""Decode GEMV (M = 1..4) with every reduction in registers: one packed column word per thread, K down the rows.

Layout. A program owns ``BLOCK_J`` packed words (``8 * BLOCK_J`` output columns) and a slice of K groups; its
``[BLOCK_K, BLOCK_J]`` tile of int32 words is spread over the threads along J only (``BLOCK_J`` = 32 lanes x
``num_warps`` x words per thread), so each thread holds whole columns of the tile and the sum over K is a chain
of FMAs in its own registers: no shuffles, no shared memory, no barriers in the loop. The eight columns of a
word are unpacked with constant shifts (eight ``[BLOCK_K, BLOCK_J]`` tensors in the word's own layout), so
nothing is reordered either.

Arithmetic per weight, about three instructions: ``(w >> 16*(c&1)) & (0xF << 4*p) | 0x4B000000`` read as
fp32 is ``2**23 + q * 16**p`` exactly (one ``lop3``; the shift is shared by four columns), minus the zero
point made the same way (one ``fadd``, exact: ``(q - z) * 16**p``), times ``x`` into the group's partial sum
(one ``ffma``). Per group and column, the partial sum is scaled once by ``scale * 16**-p``.

Rows: one program per row of x (grid axis 2); rows re-read the weights from L2. Split-K partials are reduced in
the same launch by the counter scheme of :mod:`kernels.awq_triton` (deterministic order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .awq_triton import _out_and_ws, _split_args, _tail, finish_split, pdl_release, tile_counters


@triton.jit
def _col(w, HALF: tl.constexpr, POS: tl.constexpr, magic):
    """fp32 ``2**23 + code * 16**POS`` of the column stored in (``HALF``, ``POS``) of each word of ``w``.

    ``magic`` (``0x4B000000``) comes in as a run-time argument so that it sits in one register and the mask is
    the ``lop3``'s immediate; as two literals the compiler re-materialises a mask register for every weight.
    """
    if HALF == 1:
        w = (w.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)  # logical: no sign extension
    return ((w & (0xF << (4 * POS))) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _zero_points(z, magic):
    """Each word's eight zero points, made like the codes (``2**23 + z * 16**pos``), in nibble order."""
    return (_col(z, 0, 0, magic), _col(z, 0, 1, magic), _col(z, 0, 2, magic), _col(z, 0, 3, magic),
            _col(z, 1, 0, magic), _col(z, 1, 1, magic), _col(z, 1, 2, magic), _col(z, 1, 3, magic))


@triton.jit
def _scales8(s_ptr, g, N, offs_j):
    """Group ``g``'s scales of each word's eight columns in nibble order (nibble ``4h + p`` holds column
    ``AWQ_ORDER[4h + p]`` = 0, 2, 4, 6, 1, 3, 5, 7), times ``16**-p`` to undo the in-place code scaling."""
    sb = s_ptr + g * N + offs_j * 8
    return (tl.load(sb + 0).to(tl.float32), tl.load(sb + 2).to(tl.float32) * (1.0 / 16),
            tl.load(sb + 4).to(tl.float32) * (1.0 / 256), tl.load(sb + 6).to(tl.float32) * (1.0 / 4096),
            tl.load(sb + 1).to(tl.float32), tl.load(sb + 3).to(tl.float32) * (1.0 / 16),
            tl.load(sb + 5).to(tl.float32) * (1.0 / 256), tl.load(sb + 7).to(tl.float32) * (1.0 / 4096))


@triton.jit
def _part_init(like, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, ACC2D: tl.constexpr):
    """A group's running sum for one column position: ``[BLOCK_J]``, or ``[BLOCK_K, BLOCK_J]`` with ``ACC2D``."""
    if ACC2D:
        return tl.zeros((BLOCK_K, BLOCK_J), dtype=tl.float32)
    else:
        return tl.zeros_like(like)


@triton.jit
def _part_add(p, xv, wc, zc, ACC2D: tl.constexpr):
    """``p += x * (q - z) * 16**pos``; ``ACC2D`` keeps one sum per row (a single FMA per weight) and
    reduces over the rows once per group, otherwise each step's rows are reduced at once."""
    t = xv * (wc - zc[None, :])
    if ACC2D:
        return p + t
    else:
        return p + tl.sum(t, axis=0)


@triton.jit
def _part_sum(p, ACC2D: tl.constexpr):
    if ACC2D:
        return tl.sum(p, axis=0)
    else:
        return p


@triton.jit(do_not_specialize=["magic"])
def _awq_gemv_decode_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, SPLIT_K, groups_per_split, magic,
    N8: tl.constexpr, GROUP: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC2D: tl.constexpr, PREFETCH: tl.constexpr, TAIL: tl.constexpr,
):
    pdl_release()
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_kk = tl.arange(0, BLOCK_K)
    jmask = offs_j < N8
    offs_jl = tl.minimum(offs_j, N8 - 1)  # tail lanes re-read the last word: weight loads need no mask
    row_x = x_ptr + m * stride_xm
    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)

    a0 = tl.zeros((BLOCK_J,), dtype=tl.float32)
    a1 = tl.zeros_like(a0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    a4 = tl.zeros_like(a0)
    a5 = tl.zeros_like(a0)
    a6 = tl.zeros_like(a0)
    a7 = tl.zeros_like(a0)
    k_last = g1 * GROUP - BLOCK_K
    k_0 = g0 * GROUP + offs_kk
    w_nx = tl.load(qw_ptr + k_0[:, None] * N8 + offs_jl[None, :])
    x_nx = tl.load(row_x + tl.broadcast_to(k_0[:, None], (BLOCK_K, BLOCK_J)))
    for g in range(g0, g1):
        z = tl.load(qz_ptr + g * N8 + offs_jl)
        z0, z1, z2, z3, z4, z5, z6, z7 = _zero_points(z, magic)
        p0 = _part_init(a0, BLOCK_K, BLOCK_J, ACC2D)
        p1 = _part_init(a0, BLOCK_K, BLOCK_J, ACC2D)
        p2 = _part_init(a0, BLOCK_K, BLOCK_J, ACC2D)
        p3 = _part_init(a0, BLOCK_K, BLOCK_J, ACC2D)
        p4 = _part_init(a0, BLOCK_K, BLOCK_J, ACC2D)
        p5 = _part_init(a0, BLOCK_K, BLOCK_J, ACC2D)
        p6 = _part_init(a0, BLOCK_K, BLOCK_J, ACC2D)
        p7 = _part_init(a0, BLOCK_K, BLOCK_J, ACC2D)
        # every loaded tile feeds all eight column sums; the K steps are a loop, not unrolled (unrolled, the
        # compiler hoists every load of the group into registers and spills)
        for kk in range(0, GROUP // BLOCK_K):
            if PREFETCH:  # this step's tiles were loaded one step ago; issue the next step's now
                w = w_nx
                xv = x_nx.to(tl.float32)
                k_n = tl.minimum(g * GROUP + (kk + 1) * BLOCK_K, k_last) + offs_kk  # the last step re-reads itself
                w_nx = tl.load(qw_ptr + k_n[:, None] * N8 + offs_jl[None, :])
                # x loaded in the tile's own layout (every lane reads the same BLOCK_K values): no conversion
                x_nx = tl.load(row_x + tl.broadcast_to(k_n[:, None], (BLOCK_K, BLOCK_J)))
            else:
                k = g * GROUP + kk * BLOCK_K + offs_kk
                w = tl.load(qw_ptr + k[:, None] * N8 + offs_jl[None, :])
                xv = tl.load(row_x + k).to(tl.float32)[:, None]
            wh = (w.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)
            p0 = _part_add(p0, xv, _col(w, 0, 0, magic), z0, ACC2D)
            p1 = _part_add(p1, xv, _col(w, 0, 1, magic), z1, ACC2D)
            p2 = _part_add(p2, xv, _col(w, 0, 2, magic), z2, ACC2D)
            p3 = _part_add(p3, xv, _col(w, 0, 3, magic), z3, ACC2D)
            p4 = _part_add(p4, xv, _col(wh, 0, 0, magic), z4, ACC2D)
            p5 = _part_add(p5, xv, _col(wh, 0, 1, magic), z5, ACC2D)
            p6 = _part_add(p6, xv, _col(wh, 0, 2, magic), z6, ACC2D)
            p7 = _part_add(p7, xv, _col(wh, 0, 3, magic), z7, ACC2D)
        p0 = _part_sum(p0, ACC2D)
        p1 = _part_sum(p1, ACC2D)
        p2 = _part_sum(p2, ACC2D)
        p3 = _part_sum(p3, ACC2D)
        p4 = _part_sum(p4, ACC2D)
        p5 = _part_sum(p5, ACC2D)
        p6 = _part_sum(p6, ACC2D)
        p7 = _part_sum(p7, ACC2D)
        s0, s1, s2, s3, s4, s5, s6, s7 = _scales8(s_ptr, g, N, offs_jl)
        a0 += p0 * s0
        a1 += p1 * s1
        a2 += p2 * s2
        a3 += p3 * s3
        a4 += p4 * s4
        a5 += p5 * s5
        a6 += p6 * s6
        a7 += p7 * s7

    # the eight accumulators hold columns 8j + AWQ_ORDER[n] for nibble n = 0..7, i.e. 0, 2, 4, 6, 1, 3, 5, 7
    n8 = offs_j[None, :] * 8
    _finish8(a0[None, :], a1[None, :], a2[None, :], a3[None, :], a4[None, :], a5[None, :], a6[None, :], a7[None, :],
             y_ptr, ws_ptr, cnt_ptr, b_ptr, m * stride_ym, m * N, n8, jmask[None, :], m * tl.num_programs(0) + pid_j,
             pid_k, M, N, SPLIT_K, HAS_BIAS, TAIL)


@triton.jit
def _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, w, xr, z0, z1, z2, z3, z4, z5, z6, z7, magic):
    """One K row: ``p_c += x * (q_c - z_c) * 16**pos`` for the eight columns of each thread's word, every row
    of x (``xr`` is ``[BLOCK_M, BLOCK_J]`` or ``[KW, BLOCK_J]``; the zero points come 2-D, ``[1, BLOCK_J]`` or the
    sums' shape, so a 1-D word broadcasts to the rows): the unpack is shared by the rows."""
    xr = xr.to(tl.float32)
    wh = (w.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)
    p0 += xr * (_col(w, 0, 0, magic) - z0)
    p1 += xr * (_col(w, 0, 1, magic) - z1)
    p2 += xr * (_col(w, 0, 2, magic) - z2)
    p3 += xr * (_col(w, 0, 3, magic) - z3)
    p4 += xr * (_col(wh, 0, 0, magic) - z4)
    p5 += xr * (_col(wh, 0, 1, magic) - z5)
    p6 += xr * (_col(wh, 0, 2, magic) - z6)
    p7 += xr * (_col(wh, 0, 3, magic) - z7)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _load_step(wp, xp, xm, kn, N8: tl.constexpr):
    """The eight packed words (rows ``kn .. kn+7``) and the matching x values of one step."""
    return (tl.load(wp + (kn + 0) * N8), tl.load(wp + (kn + 1) * N8), tl.load(wp + (kn + 2) * N8),
            tl.load(wp + (kn + 3) * N8), tl.load(wp + (kn + 4) * N8), tl.load(wp + (kn + 5) * N8),
            tl.load(wp + (kn + 6) * N8), tl.load(wp + (kn + 7) * N8),
            tl.load(xp + kn + 0, mask=xm, other=0.0), tl.load(xp + kn + 1, mask=xm, other=0.0),
            tl.load(xp + kn + 2, mask=xm, other=0.0), tl.load(xp + kn + 3, mask=xm, other=0.0),
            tl.load(xp + kn + 4, mask=xm, other=0.0), tl.load(xp + kn + 5, mask=xm, other=0.0),
            tl.load(xp + kn + 6, mask=xm, other=0.0), tl.load(xp + kn + 7, mask=xm, other=0.0))


@triton.jit
def _step_fma(p0, p1, p2, p3, p4, p5, p6, p7, c0, c1, c2, c3, c4, c5, c6, c7, x0, x1, x2, x3, x4, x5, x6, x7,
              z0, z1, z2, z3, z4, z5, z6, z7, magic):
    """One step: the eight rows' words ``c`` and x values ``x`` into the column sums, row by row."""
    p0, p1, p2, p3, p4, p5, p6, p7 = _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, c0, x0,
                                              z0, z1, z2, z3, z4, z5, z6, z7, magic)
    p0, p1, p2, p3, p4, p5, p6, p7 = _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, c1, x1,
                                              z0, z1, z2, z3, z4, z5, z6, z7, magic)
    p0, p1, p2, p3, p4, p5, p6, p7 = _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, c2, x2,
                                              z0, z1, z2, z3, z4, z5, z6, z7, magic)
    p0, p1, p2, p3, p4, p5, p6, p7 = _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, c3, x3,
                                              z0, z1, z2, z3, z4, z5, z6, z7, magic)
    p0, p1, p2, p3, p4, p5, p6, p7 = _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, c4, x4,
                                              z0, z1, z2, z3, z4, z5, z6, z7, magic)
    p0, p1, p2, p3, p4, p5, p6, p7 = _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, c5, x5,
                                              z0, z1, z2, z3, z4, z5, z6, z7, magic)
    p0, p1, p2, p3, p4, p5, p6, p7 = _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, c6, x6,
                                              z0, z1, z2, z3, z4, z5, z6, z7, magic)
    p0, p1, p2, p3, p4, p5, p6, p7 = _row_fma(p0, p1, p2, p3, p4, p5, p6, p7, c7, x7,
                                              z0, z1, z2, z3, z4, z5, z6, z7, magic)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit(do_not_specialize=["magic"])
def _awq_gemv_rows_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, SPLIT_K, groups_per_split, magic,
    N8: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, HAS_BIAS: tl.constexpr,
    DEPTH: tl.constexpr, EVEN_J: tl.constexpr, TAIL: tl.constexpr,
):
    """Like ``_awq_gemv_decode_kernel``, but each K row is its own 1-D load (one word per thread) and its
    ``BLOCK_M`` x values a ``[BLOCK_M, 1]`` column, so each sum is a plain FMA chain: no 2-D weight tile, no
    per-row accumulators, few registers, many warps per SM; a word is unpacked once for all rows of x.
    Software-pipelined by hand, 8 rows per step: the words and x values of the next ``DEPTH`` (1 or 2) steps
    are in flight while this step's are used (Triton pipelines only loads that feed ``tl.dot``). The grid is
    capped by N/8 x splits threads (~16 warps per SM at 8192x8192), so the bytes in flight per thread set
    the bandwidth: DEPTH 2 doubles them. With ``BLOCK_J`` above ``32 * num_warps`` a thread holds adjacent words;
    when the tiles divide N/8 (``EVEN_J``) their loads are unclamped, so they become one 8- or 16-byte load."""
    pdl_release()
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    jmask = offs_j < N8
    mmask = offs_m < M
    if EVEN_J:
        offs_jl = offs_j
    else:
        offs_jl = tl.minimum(offs_j, N8 - 1)  # tail lanes re-read the last word: weight loads need no mask
    # x in the accumulators' own [BLOCK_M, BLOCK_J] layout (each lane reads the rows' values; L1 broadcasts):
    # a [BLOCK_M, 1] load would be converted through shared memory every row
    xp = x_ptr + tl.broadcast_to(offs_m[:, None] * stride_xm, (BLOCK_M, BLOCK_J))
    xm = tl.broadcast_to(mmask[:, None], (BLOCK_M, BLOCK_J))
    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)
    k_last = g1 * GROUP - 8
    k_step2 = tl.minimum(g0 * GROUP + 8, k_last)

    wp = qw_ptr + offs_jl
    n0, n1, n2, n3, n4, n5, n6, n7, y0, y1, y2, y3, y4, y5, y6, y7 = _load_step(wp, xp, xm, g0 * GROUP, N8)
    if DEPTH == 2:
        m0, m1, m2, m3, m4, m5, m6, m7, v0, v1, v2, v3, v4, v5, v6, v7 = _load_step(wp, xp, xm, k_step2, N8)
    a0 = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    a1 = tl.zeros_like(a0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    a4 = tl.zeros_like(a0)
    a5 = tl.zeros_like(a0)
    a6 = tl.zeros_like(a0)
    a7 = tl.zeros_like(a0)
    for g in range(g0, g1):
        z = tl.load(qz_ptr + g * N8 + offs_jl[None, :])  # [1, BLOCK_J]: broadcasts over the rows of x
        z0, z1, z2, z3, z4, z5, z6, z7 = _zero_points(z, magic)
        p0 = tl.zeros_like(a0)
        p1 = tl.zeros_like(a0)
        p2 = tl.zeros_like(a0)
        p3 = tl.zeros_like(a0)
        p4 = tl.zeros_like(a0)
        p5 = tl.zeros_like(a0)
        p6 = tl.zeros_like(a0)
        p7 = tl.zeros_like(a0)
        for kk in range(0, GROUP // 8):
            c0, c1, c2, c3, c4, c5, c6, c7 = n0, n1, n2, n3, n4, n5, n6, n7
            x0, x1, x2, x3, x4, x5, x6, x7 = y0, y1, y2, y3, y4, y5, y6, y7
            if DEPTH == 2:  # step kk+1's tiles move up; step kk+2's are issued (past the end: the last again)
                n0, n1, n2, n3, n4, n5, n6, n7 = m0, m1, m2, m3, m4, m5, m6, m7
                y0, y1, y2, y3, y4, y5, y6, y7 = v0, v1, v2, v3, v4, v5, v6, v7
                kn = tl.minimum(g * GROUP + (kk + 2) * 8, k_last)
                m0, m1, m2, m3, m4, m5, m6, m7, v0, v1, v2, v3, v4, v5, v6, v7 = _load_step(wp, xp, xm, kn, N8)
            else:  # step kk+1's are issued (past the end: the last step again, from cache)
                kn = tl.minimum(g * GROUP + (kk + 1) * 8, k_last)
                n0, n1, n2, n3, n4, n5, n6, n7, y0, y1, y2, y3, y4, y5, y6, y7 = _load_step(wp, xp, xm, kn, N8)
            p0, p1, p2, p3, p4, p5, p6, p7 = _step_fma(p0, p1, p2, p3, p4, p5, p6, p7,
                                                       c0, c1, c2, c3, c4, c5, c6, c7, x0, x1, x2, x3, x4, x5, x6, x7,
                                                       z0, z1, z2, z3, z4, z5, z6, z7, magic)
        s0, s1, s2, s3, s4, s5, s6, s7 = _scales8(s_ptr, g, N, offs_jl)
        a0 += p0 * s0[None, :]
        a1 += p1 * s1[None, :]
        a2 += p2 * s2[None, :]
        a3 += p3 * s3[None, :]
        a4 += p4 * s4[None, :]
        a5 += p5 * s5[None, :]
        a6 += p6 * s6[None, :]
        a7 += p7 * s7[None, :]

    n8 = offs_j[None, :] * 8
    mask = mmask[:, None] & jmask[None, :]
    _finish8(a0, a1, a2, a3, a4, a5, a6, a7, y_ptr, ws_ptr, cnt_ptr, b_ptr, offs_m[:, None] * stride_ym,
             offs_m[:, None] * N, n8, mask, pid_m * tl.num_programs(0) + pid_j, pid_k, M, N, SPLIT_K, HAS_BIAS, TAIL)


@triton.jit(do_not_specialize=["magic"])
def _awq_gemv_kwarps_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, SPLIT_K, groups_per_split, magic,
    N8: tl.constexpr, GROUP: tl.constexpr, KW: tl.constexpr, BLOCK_J: tl.constexpr, HAS_BIAS: tl.constexpr,
    TAIL: tl.constexpr,
):
    """The ``ROWS`` kernel with ``KW`` warps sharing each group's rows (warp ``w`` takes rows
    ``w * GROUP / KW ..`` of every group of the program's K slice) and one reduction across warps at the end.

    Why: Nsight Compute on the H100 (4096x14336, M = 1) showed the one-warp ``ROWS`` programs at 3.2 active warps
    per scheduler (of 16), 0.42 waves, ``long scoreboard`` the top stall, 1.29 TB/s: the split cannot exceed
    the number of groups and each thread owns one word, so the grid alone caps the loads in flight. Splitting
    K across warps of one program multiplies the warps by ``KW`` without more split-K partials (the tail).
    Tensors are ``[KW, BLOCK_J]``: a warp per row of the first axis, a packed word per lane (clamped column
    indices keep the loads one word wide). One row of x per program (grid axis 2).
    """
    pdl_release()
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    R: tl.constexpr = GROUP // KW  # rows of each group per warp, a multiple of 8
    STEPS: tl.constexpr = R // 8
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = offs_j < N8
    offs_jl = tl.minimum(offs_j, N8 - 1)  # tail lanes re-read the last word; hides contiguity (one word a lane)
    wr = tl.arange(0, KW) * R  # first row of each warp's share of a group
    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)
    total = (g1 - g0) * STEPS
    ones = tl.full((KW, BLOCK_J), 1, tl.int32)
    wp = qw_ptr + (wr[:, None] * ones) * N8 + offs_jl[None, :] * ones
    xp = x_ptr + m * stride_xm + wr[:, None] * ones
    xm = ones > 0
    n0, n1, n2, n3, n4, n5, n6, n7, y0, y1, y2, y3, y4, y5, y6, y7 = _load_step(wp, xp, xm, g0 * GROUP, N8)
    a0 = tl.zeros((KW, BLOCK_J), dtype=tl.float32)
    a1 = tl.zeros_like(a0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    a4 = tl.zeros_like(a0)
    a5 = tl.zeros_like(a0)
    a6 = tl.zeros_like(a0)
    a7 = tl.zeros_like(a0)
    zoffs = offs_jl[None, :] * ones
    for g in range(g0, g1):
        z = tl.load(qz_ptr + g * N8 + zoffs)
        z0, z1, z2, z3, z4, z5, z6, z7 = _zero_points(z, magic)
        p0 = tl.zeros_like(a0)
        p1 = tl.zeros_like(a0)
        p2 = tl.zeros_like(a0)
        p3 = tl.zeros_like(a0)
        p4 = tl.zeros_like(a0)
        p5 = tl.zeros_like(a0)
        p6 = tl.zeros_like(a0)
        p7 = tl.zeros_like(a0)
        for kk in range(0, STEPS):
            c0, c1, c2, c3, c4, c5, c6, c7 = n0, n1, n2, n3, n4, n5, n6, n7
            x0, x1, x2, x3, x4, x5, x6, x7 = y0, y1, y2, y3, y4, y5, y6, y7
            nxt = tl.minimum((g - g0) * STEPS + kk + 1, total - 1)  # past the end: the last step again
            kn = (g0 + nxt // STEPS) * GROUP + (nxt % STEPS) * 8
            n0, n1, n2, n3, n4, n5, n6, n7, y0, y1, y2, y3, y4, y5, y6, y7 = _load_step(wp, xp, xm, kn, N8)
            p0, p1, p2, p3, p4, p5, p6, p7 = _step_fma(p0, p1, p2, p3, p4, p5, p6, p7,
                                                       c0, c1, c2, c3, c4, c5, c6, c7, x0, x1, x2, x3, x4, x5, x6, x7,
                                                       z0, z1, z2, z3, z4, z5, z6, z7, magic)
        s0, s1, s2, s3, s4, s5, s6, s7 = _scales8(s_ptr, g, N, zoffs)
        a0 += p0 * s0
        a1 += p1 * s1
        a2 += p2 * s2
        a3 += p3 * s3
        a4 += p4 * s4
        a5 += p5 * s5
        a6 += p6 * s6
        a7 += p7 * s7

    n8 = offs_j[None, :] * 8
    _finish8(tl.sum(a0, axis=0)[None, :], tl.sum(a1, axis=0)[None, :], tl.sum(a2, axis=0)[None, :],
             tl.sum(a3, axis=0)[None, :], tl.sum(a4, axis=0)[None, :], tl.sum(a5, axis=0)[None, :],
             tl.sum(a6, axis=0)[None, :], tl.sum(a7, axis=0)[None, :], y_ptr, ws_ptr, cnt_ptr, b_ptr,
             m * stride_ym, m * N, n8, jmask[None, :], m * tl.num_programs(0) + pid_j, pid_k, M, N, SPLIT_K,
             HAS_BIAS, TAIL)


@triton.jit
def _store_col(acc, c: tl.constexpr, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS: tl.constexpr):
    """Column ``8j + c`` of the output rows (+ bias); ``n8`` holds ``8j``."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + n8 + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_offs + n8 + c, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials(ws_ptr, ws_offs, n8, mask, SPLIT_K, M, N, ROUND: tl.constexpr):
    """Sum the split-K partials of the tile's eight column sets, in split order (deterministic).

    ``ROUND`` splits x eight columns are independent loads per round: a loop of one load per step waits a full
    L2 round trip for each of the ``8 * SPLIT_K`` partials (at split 33 that tail is most of a 40 us GEMV).
    """
    t0 = tl.zeros_like(mask.to(tl.float32))
    t1 = tl.zeros_like(t0)
    t2 = tl.zeros_like(t0)
    t3 = tl.zeros_like(t0)
    t4 = tl.zeros_like(t0)
    t5 = tl.zeros_like(t0)
    t6 = tl.zeros_like(t0)
    t7 = tl.zeros_like(t0)
    for s0 in range(0, SPLIT_K, ROUND):
        for ds in tl.static_range(ROUND):
            ok = mask & (tl.zeros_like(n8) + s0 + ds < SPLIT_K)
            base = ws_ptr + (s0 + ds) * M * N + ws_offs + n8
            t0 += tl.load(base + 0, mask=ok, other=0.0, cache_modifier=".cg")
            t1 += tl.load(base + 1, mask=ok, other=0.0, cache_modifier=".cg")
            t2 += tl.load(base + 2, mask=ok, other=0.0, cache_modifier=".cg")
            t3 += tl.load(base + 3, mask=ok, other=0.0, cache_modifier=".cg")
            t4 += tl.load(base + 4, mask=ok, other=0.0, cache_modifier=".cg")
            t5 += tl.load(base + 5, mask=ok, other=0.0, cache_modifier=".cg")
            t6 += tl.load(base + 6, mask=ok, other=0.0, cache_modifier=".cg")
            t7 += tl.load(base + 7, mask=ok, other=0.0, cache_modifier=".cg")
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _finish8(a0, a1, a2, a3, a4, a5, a6, a7, y_ptr, ws_ptr, cnt_ptr, b_ptr, y_offs, ws_offs, n8, mask, tile_id,
             pid_k, M, N, SPLIT_K, HAS_BIAS: tl.constexpr, TAIL: tl.constexpr):
    """Write the eight column accumulators (nibble order: columns 0, 2, 4, 6, 1, 3, 5, 7 of each word); with
    split-K the partials go to the workspace (in column order) and the last program of the tile sums them,
    ``TAIL`` splits per round, or, with ``TAIL`` 0, ``reduce_partials`` does in a launch of its own."""
    if SPLIT_K == 1:
        _store_col(a0, 0, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
        _store_col(a1, 2, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
        _store_col(a2, 4, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
        _store_col(a3, 6, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
        _store_col(a4, 1, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
        _store_col(a5, 3, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
        _store_col(a6, 5, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
        _store_col(a7, 7, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
    else:
        base = ws_ptr + pid_k * M * N + ws_offs + n8
        tl.store(base + 0, a0, mask=mask)
        tl.store(base + 2, a1, mask=mask)
        tl.store(base + 4, a2, mask=mask)
        tl.store(base + 6, a3, mask=mask)
        tl.store(base + 1, a4, mask=mask)
        tl.store(base + 3, a5, mask=mask)
        tl.store(base + 5, a6, mask=mask)
        tl.store(base + 7, a7, mask=mask)
        if TAIL > 0:
            tl.debug_barrier()  # every thread's partial is stored before the release below
            prev = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
            if prev == SPLIT_K - 1:
                t0, t1, t2, t3, t4, t5, t6, t7 = _sum_partials(ws_ptr, ws_offs, n8, mask, SPLIT_K, M, N, TAIL)
                _store_col(t0, 0, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
                _store_col(t1, 1, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
                _store_col(t2, 2, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
                _store_col(t3, 3, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
                _store_col(t4, 4, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
                _store_col(t5, 5, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
                _store_col(t6, 6, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
                _store_col(t7, 7, b_ptr, y_ptr, y_offs, n8, mask, HAS_BIAS)
                tl.atomic_xchg(cnt_ptr + tile_id, 0)  # ready for the next launch (and the next graph replay)


def gemv_decode(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                BLOCK_J: int = 128, BLOCK_K: int = 16, split_k: int = 1, num_warps: int = 4,
                num_stages: int = 1, ACC2D: bool = False, PREFETCH: bool = False, ROWS: bool = False,
                BLOCK_M: int = 1, DEPTH: int = 1, KW: int = 0, TAIL: int = 4,
                act: str | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` for decode-sized ``M``; ``x2`` has unit column stride.

    ``BLOCK_J`` should be a multiple of ``32 * num_warps`` (whole words per thread) so that K lies entirely inside
    threads.
    ``ROWS`` selects the row-load kernel, which takes ``BLOCK_M`` rows of x per program (the others: one row);
    ``KW`` > 0 the kernel whose ``KW`` warps share each group's rows (``num_warps`` is then ``KW * BLOCK_J / 32``).
    Split-K partials are summed by the last program of each column tile, ``TAIL`` splits per round (4, 8 or 16),
    or with ``TAIL=0`` by a second launch (``reduce_partials``).
    """
    tail = _tail(TAIL)
    M, K = x2.shape
    N = scales.shape[1]
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    block_m = min(triton.next_power_of_2(M), BLOCK_M) if ROWS else 1
    grid = (triton.cdiv(N // 8, BLOCK_J), split_k, triton.cdiv(M, block_m))
    cnt = tile_counters(x2.device, grid[0] * grid[2]) if split_k > 1 and tail else y
    bias_arg = bias if bias is not None else y
    if KW:
        if group_size % (8 * KW):
            raise ValueError(f"KW={KW} needs group_size divisible by {8 * KW} (got {group_size})")
        grid = (triton.cdiv(N // 8, BLOCK_J), split_k, M)
        cnt = tile_counters(x2.device, grid[0] * grid[2]) if split_k > 1 and tail else y
        _awq_gemv_kwarps_kernel[grid](
            x2, qweight, qzeros, scales, bias_arg, y, ws, cnt,
            M, N, K, x2.stride(0), y.stride(0), split_k, gps, 0x4B000000,
            N8=N // 8, GROUP=group_size, KW=KW, BLOCK_J=BLOCK_J, HAS_BIAS=bias is not None, TAIL=tail,
            num_warps=KW * max(1, BLOCK_J // 32), num_stages=num_stages,
        )
        return finish_split(ws, y, bias, split_k > 1 and tail == 0, act)
    if ROWS:
        _awq_gemv_rows_kernel[grid](
            x2, qweight, qzeros, scales, bias_arg, y, ws, cnt,
            M, N, K, x2.stride(0), y.stride(0), split_k, gps, 0x4B000000,
            N8=N // 8, GROUP=group_size, BLOCK_M=block_m, BLOCK_J=BLOCK_J, HAS_BIAS=bias is not None,
            DEPTH=DEPTH, EVEN_J=(N // 8) % BLOCK_J == 0, TAIL=tail, num_warps=num_warps, num_stages=num_stages,
        )
        return finish_split(ws, y, bias, split_k > 1 and tail == 0, act)
    _awq_gemv_decode_kernel[grid](
        x2, qweight, qzeros, scales, bias_arg, y, ws, cnt,
        M, N, K, x2.stride(0), y.stride(0), split_k, gps, 0x4B000000,
        N8=N // 8, GROUP=group_size, BLOCK_J=BLOCK_J, BLOCK_K=min(BLOCK_K, group_size), HAS_BIAS=bias is not None,
        ACC2D=ACC2D, PREFETCH=PREFETCH, TAIL=tail, num_warps=num_warps, num_stages=num_stages,
    )
    return finish_split(ws, y, bias, split_k > 1 and tail == 0, act)
