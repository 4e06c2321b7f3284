"""W4A16 for 32-128 rows on Hopper's warpgroup MMA, weights from the fragment-repacked layout (Gluon; experimental).

Why: on the repacked weights (:mod:`kernels.awq_repack`) the register-operand Gluon kernel
(:mod:`kernels.awq_gluon_mma`) wins at M <= 32 but loses to ``splitk`` at 64 rows: every warp holds its own copy
of x's operand, so each column tile re-reads x and the registers run out. Here x stays in shared memory as the
``wgmma`` A operand (``[64, BK]``, one warpgroup), and the warps write the dequantized weights there too: each warp
unpacks its 16-column tiles straight into MMA-fragment registers (three shifts + four ``lop3`` per word, as in
``awq_gluon_mma``), scales them (``((OFF + q) - (OFF + z)) * s`` in bf16 or fp16, like ``SCALED``) and stores the
``[BN, BK]`` tile; ``wgmma`` reads it transposed as B. One fp32 accumulator ``[64, BN]`` per warpgroup; split-K
partials summed by ``reduce_partials``. No software pipelining yet (a probe of the approach).
"""

from __future__ import annotations

import functools

import torch
import triton

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper

from .awq_gluon_mma import (_cta_barrier, _fragments, _layouts, _word_offset, _word_offsets, _x_rows,
                            _zeros_scales, GL_DTYPES, check_dtypes, nvmma_shared)
from .awq_repack import check_repackable
from .awq_triton import _out_and_ws, _split_args, finish_split

ROWS = 64  # rows of x per program: one warpgroup's wgmma M
BM = gl.constexpr(ROWS)


@gluon.jit(do_not_specialize=["M"])  # one build serves every row count (no compile on a request)
def _awq_gluon_wgmma_kernel(x_ptr, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_xm, stride_ym,
                            SPLIT_K, groups_per_split, GROUP: gl.constexpr, BK: gl.constexpr, BN: gl.constexpr,
                            T: gl.constexpr, HAS_BIAS: gl.constexpr, a_l: gl.constexpr, w_l: gl.constexpr,
                            x_l: gl.constexpr, acc_l: gl.constexpr, xs_l: gl.constexpr, ws_l: gl.constexpr):
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    DT: gl.constexpr = x_ptr.dtype.element_ty  # bf16 or fp16
    W: gl.constexpr = 4
    KH: gl.constexpr = BK // 16
    woff = _word_offsets(pid_n, K, w_l, W, T, KH)
    xoff, xmask = _x_rows(pid_m, M, stride_xm, BM, BK, x_l)
    on_a = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, a_l))

    x_smem = gl.allocate_shared_memory(DT, [BM, BK], xs_l)
    w_smem = gl.allocate_shared_memory(DT, [BN, BK], ws_l)
    acc = gl.zeros([BM, BN], gl.float32, layout=acc_l)
    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = gl.minimum(g0 + groups_per_split, num_groups)
    for g in range(g0, g1):
        za, sa = _zeros_scales(qz_ptr, s_ptr, g, on_a, N)
        for st in gl.static_range(GROUP // BK):
            k0 = g * GROUP + st * BK
            w = gl.load(pw_ptr + woff + _word_offset(k0, BK))
            xr = gl.load(x_ptr + xoff + k0, mask=xmask, other=0.0)
            a = (_fragments(w, a_l, W, T, BK, DT) - za[:, None]) * sa[:, None]
            _cta_barrier()  # the last step's wgmma has read both tiles
            w_smem.store(a)
            x_smem.store(xr)
            hopper.fence_async_shared()
            _cta_barrier()
            acc = hopper.warpgroup_mma(x_smem, w_smem.permute([1, 0]), acc)

    om = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_l))
    on = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_l))
    omask = (om < M)[:, None] & (on < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += gl.load(b_ptr + on).to(gl.float32)[None, :]
        gl.store(y_ptr + om[:, None] * stride_ym + on[None, :], acc.to(DT), mask=omask)
    else:
        gl.store(ws_ptr + (pid_k * M + om[:, None]) * N + on[None, :], acc, mask=omask)


@functools.cache
def _wgmma_acc(BN: int) -> gl.NVMMADistributedLayout:
    """The accumulator of four warps' ``wgmma`` over ``BN`` rows of x (built once per ``BN``)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])


def gluon_wgmma(x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                BN: int = 128, split_k: int = 1, BK: int | None = None, act: str | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` (bf16 or fp16) on repacked weights with ``wgmma``; ``BN`` 64, 128 or 256 columns per program,
    64 rows of x per program; ``act``: see :func:`kernels.awq_triton.finish_split`; see the module doc."""
    M, K = x2.shape
    N = scales.shape[1]
    check_repackable(K, N)
    check_dtypes("gluon_wgmma", x2, scales)
    if x2.stride(1) != 1:
        raise ValueError("gluon_wgmma takes x with unit column stride")
    if BN not in (64, 128, 256) or N % BN:
        raise ValueError(f"gluon_wgmma takes BN 64, 128 or 256 dividing N = {N}, got {BN}")
    BK = BK or min(64, group_size)
    if BK not in (16, 32, 64) or group_size % BK:
        raise ValueError(f"gluon_wgmma takes BK 16, 32 or 64 dividing the group size {group_size}, got {BK}")
    T = BN // 64
    _, a_l, _, w_l, x_l = _layouts(4, BK, T)
    acc_l = _wgmma_acc(BN)
    xs_l = nvmma_shared((BM, BK), GL_DTYPES[x2.dtype])
    ws_l = nvmma_shared((BN, BK), GL_DTYPES[x2.dtype])
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (N // BN, split_k, triton.cdiv(M, ROWS))
    _awq_gluon_wgmma_kernel[grid](
        x2, packed, qzeros, scales, bias if bias is not None else y, y, ws, M, N, K, x2.stride(0), y.stride(0),
        split_k, gps, GROUP=group_size, BK=BK, BN=BN, T=T, HAS_BIAS=bias is not None, a_l=a_l, w_l=w_l, x_l=x_l,
        acc_l=acc_l, xs_l=xs_l, ws_l=ws_l, num_warps=4)
    return finish_split(ws, y, bias, split_k > 1, act)
