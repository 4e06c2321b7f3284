"""W4A16 at 1-16 rows with split-K inside the program: ``KW`` warps along K, summed in shared memory (Gluon).

Why: :mod:`kernels.awq_gluon_mma` gets its parallelism at 1-16 rows from split-K across programs (8-16 splits),
and the splits' sum costs 2-4 us of a 14-19 us call (a second launch, or the last split's wait and every other
split's release fence: docs/kernels_notes.md). Here ``KW`` warps of one program take ``KW`` slices of the
program's K range and their accumulators are summed once at the end (a cross-warp reduction through shared memory,
no global traffic, no fence): the same warps in flight with fewer or no splits across programs.

How: the product is batched over the K-warps, ``acc[kw] = W'[kw]^T x[kw]^T`` on a rank-3 ``mma.m16n8k16`` layout
(warps ``[KW, W, 1]``), each K-warp's words, zero points, scales and x tile loaded for its own groups; the
fragments come from the repacked words as in :mod:`kernels.awq_gluon_mma` (``_fragments`` with a batch axis,
checked trivial at compile time). x's ``[RB, BK]`` tile per K-warp goes through shared memory into the B
operand layout each step. ``SCALED``: weights scaled in the fragments (one accumulator); else per group
``y += s (acc_g - (128 + z) sum_k x)``. Split-K across programs on top is summed by
:func:`kernels.awq_triton.reduce_partials`. bf16 only; GPU only (Gluon has no CPU interpreter); its sm_90 build
is tested on the CPU.
"""

from __future__ import annotations

import torch
import triton

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .awq_gluon_mma import _word_offset, _zeros_bf16
from .awq_repack import check_repackable
from .awq_triton import _out_and_ws, _split_args, reduce_partials


def _layouts(KW: int, W: int, BK: int, T: int):
    """The rank-3 MMA layout (batch = the ``KW`` K-warps, ``W`` warps along the output columns), its operands,
    the words' layout ``[KW, T, W, 8, BK/16, 4]`` (as :func:`kernels.awq_gluon_mma._layouts`, with the K-warp
    as a leading axis) and x's ``[KW, RB, BK]`` tile layout (16 bytes per thread)."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[KW, W, 1], instr_shape=[1, 16, 8])
    a_l = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    kh = BK // 16
    w_l = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 0, 1 << i, 0] for i in range(kh.bit_length() - 1)]
        + [[0, 1 << i, 0, 0, 0, 0] for i in range(T.bit_length() - 1)],
        lane_bases=[[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 2], [0, 0, 0, 1, 0, 0], [0, 0, 0, 2, 0, 0],
                    [0, 0, 0, 4, 0, 0]],
        warp_bases=[[0, 0, 1 << i, 0, 0, 0] for i in range(W.bit_length() - 1)]
        + [[1 << i, 0, 0, 0, 0, 0] for i in range(KW.bit_length() - 1)],
        block_bases=[], shape=[KW, T, W, 8, kh, 4])
    x_l = gl.BlockedLayout(size_per_thread=[1, 1, 8], threads_per_warp=[1, 256 // BK, BK // 8],
                           warps_per_cta=[KW, W, 1], order=[2, 1, 0])
    return mma, a_l, b_l, w_l, x_l


@gluon.jit
def _fragments3(w, a_l: gl.constexpr, KW: gl.constexpr, W: gl.constexpr, T: gl.constexpr, BK: gl.constexpr):
    """Words ``[KW, T, W, 8, BK/16, 4]`` -> A operands ``[KW, 16 W T, BK]`` bf16 (``128 + q``) in ``a_l``: the
    unpacking of :func:`kernels.awq_gluon_mma._fragments` per K-warp."""
    w2 = gl.join(w, w)
    w4 = gl.join(w2, w2)
    w8 = gl.join(w4, w4)  # [kw, tile, n_hi, n_lo, k_hi, k_mid, k3, n3, k0]
    a8 = gl.inline_asm_elementwise(
        "{ .reg .b32 t0, t1, t2;\n shr.u32 t0, $4, 4; shr.u32 t1, $4, 8; shr.u32 t2, $4, 12;\n"
        "lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xea; lop3.b32 $1, t0, 0x000F000F, 0x43004300, 0xea;\n"
        "lop3.b32 $2, t1, 0x000F000F, 0x43004300, 0xea; lop3.b32 $3, t2, 0x000F000F, 0x43004300, 0xea; }",
        "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [w8], dtype=gl.bfloat16, is_pure=True, pack=8)
    a = gl.reshape(gl.permute(a8, [0, 1, 2, 7, 3, 4, 6, 5, 8]), [KW, 16 * W * T, BK])
    return gl.convert_layout(a, a_l, assert_trivial=True)


@gluon.jit
def _word_offsets3(pid_n, K, w_l: gl.constexpr, KW: gl.constexpr, W: gl.constexpr, T: gl.constexpr,
                   KH: gl.constexpr):
    """Word offsets ``[KW, T, W, 8, KH, 4]`` of column block ``pid_n``'s words at feature 0 (the same for every
    K-warp; each adds its own step's offset), as :func:`kernels.awq_gluon_mma._word_offsets`."""
    L5: gl.constexpr = gl.SliceLayout(0, w_l)
    it = gl.arange(0, T, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L5)))))
    i0 = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L5)))))
    i1 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, L5)))))
    i2 = gl.arange(0, KH, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, L5)))))
    i3 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
    nt = (pid_n * T + it)[:, None] * W + i0[None, :]
    off5 = ((nt[:, :, None, None, None] * (K // 64) * 32 + i1[None, None, :, None, None] * 4
             + i3[None, None, None, None, :]) * 4 + i2[None, None, None, :, None])
    return gl.expand_dims(off5, 0) + gl.zeros([KW, T, W, 8, KH, 4], gl.int32, layout=w_l)


@gluon.jit(do_not_specialize=["M"])  # one build serves every row count (no compile on a request)
def _awq_gluon_kwarps_kernel(x_ptr, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_xm, stride_ym,
                             SPLIT_K, groups_per_split, GROUP: gl.constexpr, BK: gl.constexpr, RB: gl.constexpr,
                             KW: gl.constexpr, W: gl.constexpr, T: gl.constexpr, HAS_BIAS: gl.constexpr,
                             SCALED: gl.constexpr, PREFETCH: gl.constexpr, mma: gl.constexpr, a_l: gl.constexpr,
                             b_l: gl.constexpr,
                             w_l: gl.constexpr, x_l: gl.constexpr):
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    KH: gl.constexpr = BK // 16
    NC: gl.constexpr = 16 * W * T
    woff = _word_offsets3(pid_n, K, w_l, KW, W, T, KH)
    kw_w = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(
        4, gl.SliceLayout(5, w_l))))))
    kw_w = kw_w[:, None, None, None, None, None]
    # x tiles [KW, RB, BK]: K-warp kw's rows of x at its own step
    x_kw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_l)))
    x_rm = pid_m * RB + gl.arange(0, RB, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_l)))
    x_rk = gl.arange(0, BK, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_l)))
    xoff = x_rm[None, :, None] * stride_xm + x_rk[None, None, :]
    # the output columns of each K-warp's accumulator / A operand rows (its zero points and scales)
    acc_l: gl.constexpr = gl.SliceLayout(2, mma)
    kw_acc = gl.arange(0, KW, layout=gl.SliceLayout(1, acc_l))[:, None]
    on_acc = (pid_n * NC + gl.arange(0, NC, layout=gl.SliceLayout(0, acc_l)))[None, :]

    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = gl.minimum(g0 + groups_per_split, num_groups)
    gpk = (g1 - g0 + KW - 1) // KW  # groups per K-warp (the last K-warp's past g1 are masked: x = 0)
    y_acc = gl.zeros([KW, NC, RB], gl.float32, layout=mma)
    if PREFETCH:  # each step loads the next step's words (past the K-warp's last: the next K-warp's, unused)
        w = gl.load(pw_ptr + woff + _word_offset(gl.minimum(g0 + kw_w * gpk, g1 - 1) * GROUP, BK))
    if SCALED:
        sa_l: gl.constexpr = gl.SliceLayout(2, a_l)
        kw_a = gl.arange(0, KW, layout=gl.SliceLayout(1, sa_l))[:, None]
        on_a = (pid_n * NC + gl.arange(0, NC, layout=gl.SliceLayout(0, sa_l)))[None, :]
        for i in range(0, gpk):
            ga = gl.minimum(g0 + kw_a * gpk + i, g1 - 1)
            za = _zeros_bf16(gl.load(qz_ptr + ga * (N // 8) + on_a // 8), on_a)
            sa = gl.load(s_ptr + ga * N + on_a)
            for st in gl.static_range(GROUP // BK):
                gw = gl.minimum(g0 + kw_w * gpk + i, g1 - 1)
                if PREFETCH:
                    w_next = gl.load(pw_ptr + woff + _word_offset(gl.minimum(gw * GROUP + (st + 1) * BK,
                                                                             g1 * GROUP - BK), BK))
                else:
                    w = gl.load(pw_ptr + woff + _word_offset(gw * GROUP + st * BK, BK))
                gx = g0 + x_kw * gpk + i
                xr = gl.load(x_ptr + xoff + (gx * GROUP + st * BK)[:, None, None],
                             mask=(x_rm < M)[None, :, None] & (gx < g1)[:, None, None] & (x_rk >= 0)[None, None, :],
                             other=0.0)
                xb = gl.convert_layout(gl.permute(xr, [0, 2, 1]), b_l)
                a = (_fragments3(w, a_l, KW, W, T, BK) - za[:, :, None]) * sa[:, :, None]
                y_acc = gl.nvidia.ampere.mma_v2(a, xb, y_acc)
                if PREFETCH:
                    w = w_next
    else:
        xs_l: gl.constexpr = gl.SliceLayout(2, x_l)
        for i in range(0, gpk):
            acc = gl.zeros([KW, NC, RB], gl.float32, layout=mma)
            xs = gl.zeros([KW, RB], gl.float32, layout=xs_l)
            gx = g0 + x_kw * gpk + i
            for st in gl.static_range(GROUP // BK):
                gw = gl.minimum(g0 + kw_w * gpk + i, g1 - 1)
                if PREFETCH:
                    w_next = gl.load(pw_ptr + woff + _word_offset(gl.minimum(gw * GROUP + (st + 1) * BK,
                                                                             g1 * GROUP - BK), BK))
                else:
                    w = gl.load(pw_ptr + woff + _word_offset(gw * GROUP + st * BK, BK))
                xr = gl.load(x_ptr + xoff + (gx * GROUP + st * BK)[:, None, None],
                             mask=(x_rm < M)[None, :, None] & (gx < g1)[:, None, None] & (x_rk >= 0)[None, None, :],
                             other=0.0)
                xs += gl.sum(xr.to(gl.float32), axis=2)
                xb = gl.convert_layout(gl.permute(xr, [0, 2, 1]), b_l)
                acc = gl.nvidia.ampere.mma_v2(_fragments3(w, a_l, KW, W, T, BK), xb, acc)
                if PREFETCH:
                    w = w_next
            gz = gl.minimum(g0 + kw_acc * gpk + i, g1 - 1)
            z = gl.load(qz_ptr + gz * (N // 8) + on_acc // 8)
            zo = ((z >> ((((on_acc >> 1) & 3) << 2) + ((on_acc & 1) << 4))) & 0xF).to(gl.float32) + 128.0
            s = gl.load(s_ptr + gz * N + on_acc).to(gl.float32)
            xs_m = gl.convert_layout(xs, gl.SliceLayout(1, mma))
            y_acc += (acc - zo[:, :, None] * xs_m[:, None, :]) * s[:, :, None]

    tot = gl.sum(y_acc, axis=0)  # the K-warps' sum, through shared memory
    out_l: gl.constexpr = gl.SliceLayout(0, mma)
    on = pid_n * NC + gl.arange(0, NC, layout=gl.SliceLayout(1, out_l))
    om = pid_m * RB + gl.arange(0, RB, layout=gl.SliceLayout(0, out_l))
    omask = (om < M)[None, :] & (on < N)[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            tot += gl.load(b_ptr + on).to(gl.float32)[:, None]
        gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], tot.to(gl.bfloat16), mask=omask)
    else:
        gl.store(ws_ptr + pid_k * M * N + om[None, :] * N + on[:, None], tot, mask=omask)


def gluon_kwarps(x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                 RB: int = 8, KW: int = 4, num_warps: int = 1, T: int = 2, split_k: int = 1, SCALED: bool = False,
                 PREFETCH: bool = False, BK: int | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` (bf16) with ``packed`` from :func:`kernels.awq_repack.repack_awq`; see module doc.

    ``RB``: rows of x per program (8 or 16); ``KW``: warps along K in a program (1, 2, 4, 8), their partial sums
    added in shared memory; ``num_warps``: warps along the output columns (``16 * num_warps * T`` columns a
    program; the launch has ``KW * num_warps`` warps); ``split_k``: programs along K on top (summed by
    :func:`kernels.awq_triton.reduce_partials`); ``SCALED``: the weights scaled in the fragments; ``PREFETCH``:
    each step loads the next step's words before its MMA; ``BK``:
    features per step (16, 32 or 64 dividing the group; default ``min(64, group)``)."""
    M, K = x2.shape
    N = scales.shape[1]
    check_repackable(K, N)
    if x2.dtype != torch.bfloat16 or x2.stride(1) != 1:
        raise ValueError("gluon_kwarps takes bf16 x with unit column stride")
    if N % (16 * num_warps * T) or group_size % 32:
        raise ValueError(f"gluon_kwarps needs N a multiple of {16 * num_warps * T} and group size 32, 64 or 128")
    BK = BK or min(64, group_size)
    if BK not in (16, 32, 64) or group_size % BK:
        raise ValueError(f"gluon_kwarps takes BK 16, 32 or 64 dividing the group size {group_size}, got {BK}")
    if RB not in (8, 16) or KW not in (1, 2, 4, 8) or KW * num_warps > 16:
        raise ValueError(f"gluon_kwarps takes RB 8 or 16 rows and KW 1, 2, 4 or 8 K-warps (at most 16 warps in "
                         f"all), got RB {RB}, KW {KW}, num_warps {num_warps}")
    mma, a_l, b_l, w_l, x_l = _layouts(KW, num_warps, BK, T)
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (N // (16 * num_warps * T), split_k, triton.cdiv(M, RB))
    _awq_gluon_kwarps_kernel[grid](
        x2, packed, qzeros, scales, bias if bias is not None else y, y, ws, M, N, K, x2.stride(0), y.stride(0),
        split_k, gps, GROUP=group_size, BK=BK, RB=RB, KW=KW, W=num_warps, T=T, HAS_BIAS=bias is not None,
        SCALED=bool(SCALED), PREFETCH=bool(PREFETCH), mma=mma, a_l=a_l, b_l=b_l, w_l=w_l, x_l=x_l,
        num_warps=KW * num_warps)
    if split_k > 1:
        return reduce_partials(ws, y, bias)
    return y
