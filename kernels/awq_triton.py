"""Triton W4A16 kernels that read the AutoAWQ GEMM layout directly (no repack).

Four variants, one launcher each (the dispatcher in :mod:`kernels.dispatch` picks one by M):

* ``gemv``    split-K GEMV on CUDA cores: one row of x per program, ``BLOCK_N`` columns, a K slice; one K step
              is one quantization group (zeros/scales loaded once per group, scale applied once per column
              after the group's reduction). Measured slower than ``splitk`` on the H100 at every M, so the
              table never picks it; kept as the simplest variant and a reference point.
* ``splitk``  split-K ``tl.dot`` kernel for small batches. Factored per group:
              ``acc += s * (x @ (OFF + q) - (OFF + z) * sum(x))`` where ``OFF + q`` (OFF = 128 for bf16,
              1024 for fp16) is made exactly in the activation dtype by one ``lop3`` per pair of weights
              (inline PTX; the AWQ nibble order puts columns ``2p`` and ``2p+1`` in bits 0-3 and 16-19 of the
              word shifted by ``4p``), so the tensor cores see exact small integers and the scale is applied to
              the fp32 group result, not to every weight.
* ``gemm``    the same kernel with ``split_k = 1``, large tiles, grouped tile order, scale applied per weight.
* ``dequant`` a dequantize kernel writing a dense ``[K, N]`` weight, then ``torch.matmul`` (cuBLAS) — prefill.

Per-weight unpack without int->float conversions (``gemv``, ``gemm``, ``dequant``): column offset ``c`` of a
word sits in the low 16-bit half for even ``c`` and the high half for odd ``c``, at bit ``4 * (c // 2)`` of that
half. ``((w >> 16 * (c % 2)) & (0xF << 4 * (c // 2))) | 0x4B000000`` reinterpreted as fp32 is exactly
``2**23 + q * 16**(c // 2)``; the zero point gets the same treatment, so one fp32 subtraction gives
``(q - z) * 16**p`` exactly and ``16**-p`` is folded into the group's scale. No I2F (quarter rate on Hopper).

Loads: ``PREFETCH = L`` keeps the loads of the next ``L`` groups in flight (register double-buffering) while
one group is computed; ``X_IN_REGS=False`` leaves the activation tile to Triton's software pipeliner.

Split-K reduction, in one launch: each program writes its fp32 partial tile to a workspace, then
increments a per-tile counter (acq_rel, GPU scope); the last program of a tile sums the partials in fixed
split order (deterministic), adds the bias, writes the output and resets the counter to 0. The counters live
in a persistent, zero-initialised int32 buffer per device (see :func:`tile_counters`), so the op allocates
only a ``torch.empty`` workspace from the caching allocator: CUDA-graph safe. Ops that share a device must
not run concurrently on different streams (they would share counters).

Accumulation is fp32 everywhere. Group sizes 32, 64, 128. Under ``TRITON_INTERPRET=1`` the inline PTX is
replaced by the same values computed with integer ops, and (bf16 only) ``tl.dot`` runs on fp32 copies of the
exact bf16 operands, because the interpreter's bf16 ``tl.dot`` is broken (triton 3.9).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .epilogue import silu_mul, silu_mul_math

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAGIC = tl.constexpr(0x4B000000)  # fp32 bits of 2**23


def _pair_ptx(kind: str, magic: str, scaled: bool) -> str:
    """PTX for one packed word (8 copies in ``$4..$11``, ``pack=8``): ``OFF + q`` for the four column pairs
    ``(2p, 2p+1)`` by shift + ``lop3``, minus the zero pairs (``$12, $14, $16, $18``), times the scale pairs
    (``$20, $22, $24, $26``) when ``scaled``; results in ``$0..$3`` (columns 0-7 in order)."""
    lines = ["{ .reg .b32 t0, t1, t2, u0, u1, u2, u3;", "shr.u32 t0, $4, 4; shr.u32 t1, $4, 8; shr.u32 t2, $4, 12;"]
    lines += [f"lop3.b32 u{p}, {'$4' if p == 0 else f't{p - 1}'}, 0x000F000F, {magic}, 0xea;" for p in range(4)]
    dst = "u" if scaled else "$"
    lines += [f"sub.rn.{kind} {dst}{p}, u{p}, ${12 + 2 * p};" for p in range(4)]
    if scaled:
        lines += [f"mul.rn.{kind} ${p}, u{p}, ${20 + 2 * p};" for p in range(4)]
    return "\n".join(lines) + " }"


# the pack=8 dequantizers' PTX and operand lists: four 32-bit outputs (8 x 16 bits), 8 words per input
_PTX_ZSUB_BF16 = tl.constexpr(_pair_ptx("bf16x2", "0x43004300", False))
_PTX_ZSUB_F16 = tl.constexpr(_pair_ptx("f16x2", "0x64006400", False))
_PTX_SCALED_BF16 = tl.constexpr(_pair_ptx("bf16x2", "0x43004300", True))
_PTX_SCALED_F16 = tl.constexpr(_pair_ptx("f16x2", "0x64006400", True))
_ASM_IO_2 = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 16))
_ASM_IO_3 = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 24))

# Programmatic dependent launch: see kernels/pdl.py
from .pdl import PDL, _PDL_LAUNCH, pdl_enter, pdl_release  # noqa: E402,F401

MAX_TILES = 1 << 16  # counters per device


# ---------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, y_offs, ws_offs, n_offs, mask, tile_id, pid_k, M, N,
            SPLIT_K, HAS_BIAS: tl.constexpr, TAIL: tl.constexpr):
    """Store ``acc`` (+bias) to ``y``; with split-K, reduce the partials first (last program of the tile), or
    with ``TAIL`` 0 leave them to ``reduce_partials`` (a second launch)."""
    if SPLIT_K == 1:
        out = acc
        if HAS_BIAS:
            out += tl.load(b_ptr + n_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * M * N + ws_offs, acc, mask=mask)
        if TAIL > 0:
            tl.debug_barrier()  # every thread's partial is stored before the release below
            prev = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
            if prev == SPLIT_K - 1:
                tot = tl.zeros_like(acc)
                # fixed order (the sum does not depend on arrival order); four splits' loads per round are
                # independent, so one L2 round trip covers four partials instead of one
                for s0 in range(0, SPLIT_K, 4):
                    for ds in tl.static_range(4):
                        ok = mask & (tl.zeros_like(ws_offs) + (s0 + ds) < SPLIT_K)
                        tot += tl.load(ws_ptr + (s0 + ds) * M * N + ws_offs, mask=ok, other=0.0,
                                       cache_modifier=".cg")
                if HAS_BIAS:
                    tot += tl.load(b_ptr + n_offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(y_ptr + y_offs, tot.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile_id, 0)  # ready for the next launch (and the next graph replay)


@triton.jit
def _reduce_partials_kernel(ws_ptr, b_ptr, y_ptr, M, N, SPLIT_K, stride_ym, HAS_BIAS: tl.constexpr,
                            SPLIT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, SILU_MUL: tl.constexpr):
    """``y = sum over splits of ws [SPLIT_K, M, N]`` (+ bias): the split-K sum as a launch of its own. A program
    loads a ``[SPLIT_BLOCK, BLOCK_N]`` tile at once (every split of its columns, when ``SPLIT_BLOCK`` covers
    them: one L2 round trip) and sums it down the splits (a fixed tree: deterministic). Measured on the H100,
    the in-kernel tail (the last program of a column tile summing in rounds) cost 4-9 us of a 20-30 us GEMV.
    ``SILU_MUL``: ``y [M, N/2] = silu(sum[:, :N/2]) * sum[:, N/2:]`` (the MLP's activation, see
    :mod:`kernels.epilogue`)."""
    pdl_enter()  # launched early (programmatic dependent launch): the partials are complete after this
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    W = N // 2 if SILU_MUL else N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, SPLIT_BLOCK)
    nmask = offs_n < W
    acc = tl.zeros((SPLIT_BLOCK, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((SPLIT_BLOCK, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, SPLIT_K, SPLIT_BLOCK):
        s = s0 + offs_s
        ptrs = ws_ptr + (s[:, None] * M + m) * N + offs_n[None, :]
        smask = (s[:, None] < SPLIT_K) & nmask[None, :]
        acc += tl.load(ptrs, mask=smask, other=0.0, cache_modifier=".cg")
        if SILU_MUL:
            acc_up += tl.load(ptrs + W, mask=smask, other=0.0, cache_modifier=".cg")
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    if SILU_MUL:
        up = tl.sum(acc_up, axis=0)
        if HAS_BIAS:
            up += tl.load(b_ptr + W + offs_n, mask=nmask, other=0.0).to(tl.float32)
        res = silu_mul_math(out.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32), dtype)
    else:
        res = out.to(dtype)
    tl.store(y_ptr + m * stride_ym + offs_n, res, mask=nmask)


def _tail(tail: int) -> int:
    """A config's ``TAIL`` checked: 0 (split-K partials summed by ``reduce_partials``) or the in-kernel sum's
    splits per round."""
    if tail not in (0, 4, 8, 16):
        raise ValueError(f"TAIL must be 0 (a separate reduce launch), 4, 8 or 16 splits per round, got {tail}")
    return tail


def reduce_partials(ws: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None,
                    act: str | None = None) -> torch.Tensor:
    """Sum ``ws [split, M, N]`` over its first axis into ``y [M, N]`` (+ ``bias``); see ``_reduce_partials_kernel``.

    ``act="silu_mul"``: return a new ``[M, N/2]`` tensor ``silu(gate) * up`` instead (``y`` is left unused)."""
    split, M, N = ws.shape
    width = N // 2 if act else N
    if act:
        y = torch.empty((M, width), dtype=y.dtype, device=y.device)
    # one-warp programs, about two per SM of an H100 over all M rows (Nsight Compute: [32, 128] tiles on 4
    # warps gave 112 programs for N = 14336 at M = 1, one active warp per scheduler, 5.4 us; sizing by N alone
    # made 8k programs at M = 16 and cost the swap kernel 2-8 us), up to 64 partials per thread at once
    # sized by the full width also with act, so the tile (and the order of the sum over splits) is the one the
    # unfused op uses: the fused activation is bit-equal to the linear then ``silu_mul``
    bn = max(8, min(256, 1 << max(0, (M * N // 264).bit_length() - 1)))
    sb = min(triton.next_power_of_2(split), 2048 // bn)
    _reduce_partials_kernel[(triton.cdiv(width, bn), M)](
        ws, bias if bias is not None else y, y, M, N, split, y.stride(0), HAS_BIAS=bias is not None,
        SPLIT_BLOCK=sb, BLOCK_N=bn, SILU_MUL=act == "silu_mul", num_warps=1, **_PDL_LAUNCH)
    return y


def finish_split(ws: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, reduce: bool,
                 act: str | None) -> torch.Tensor:
    """A launcher's last step: the split-K sum as a launch of its own (the activation fused into it), or ``y`` as
    the kernel left it (then the activation, if any, as a launch of its own). ``act="partials"``: return the
    fp32 partials ``ws [split, M, N]`` unsummed and without bias, for a consumer that sums them itself
    (:func:`kernels.awq_linear_partials` only asks for them when there is a separate sum)."""
    if act == "partials":
        if not reduce:
            raise ValueError("act='partials' needs a config that sums its split-K partials in a second launch")
        return ws
    if reduce:
        return reduce_partials(ws, y, bias, act)
    return y if act is None else silu_mul(y)


# ---------------------------------------------------------------------------------------------------------
# split-K GEMV (CUDA cores)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _unpack8(w):
    """int32 ``[R, C]`` -> ``[R, 8C]``: each word repeated 8 times along the last dim, in registers."""
    w = tl.interleave(w, w)
    w = tl.interleave(w, w)
    return tl.interleave(w, w)


@triton.jit
def _nibbles(w8, n):
    """Column ``n``'s code kept in place: fp32 ``2**23 + q * 16**((n >> 1) & 3)`` (see module doc)."""
    sh = (n & 1) << 4
    mk = 0xF << (((n >> 1) & 3) << 2)
    return (((w8 >> sh) & mk) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _code_at(w8, n):
    """The 4-bit code of column ``n`` in its replicated word ``w8`` (AWQ nibble order), as an integer."""
    return (w8 >> ((((n >> 1) & 3) << 2) + ((n & 1) << 4))) & 0xF


@triton.jit
def _codes_plus_offset(w, n, dtype: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 ``[R, C]`` -> ``[R, 8C]`` in ``dtype``: ``OFF + q`` (exact), ``OFF`` = 128 (bf16) or 1024 (fp16).

    GPU: shift each replicated word by ``4 * ((n >> 1) & 3)`` so the pair of columns ``(2p, 2p+1)`` sits in
    bits 0-3 and 16-19 (the AWQ order puts nibbles ``p`` and ``4 + p`` there), then one ``lop3`` per pair
    makes both halves of a bf16x2/f16x2 register: ``(v & 0x000F000F) | magic``. Interpreter: the same
    values through integer arithmetic (it cannot run inline PTX).
    """
    w8 = _unpack8(w)
    if USE_ASM:
        ws = w8 >> (((n >> 1) & 3) << 2)
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xea;", "=r,r,r", [ws],
                                             dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x64006400, 0xea;", "=r,r,r", [ws],
                                             dtype=tl.float16, is_pure=True, pack=2)
    else:
        off = 128.0 if dtype == tl.bfloat16 else 1024.0
        return (_code_at(w8, n).to(tl.float32) + off).to(dtype)


@triton.jit
def _zero_pairs(z, n, dtype: tl.constexpr):
    """Zero points of columns ``n`` (``z``: each column's packed word) as the 32-bit pair ``OFF + z`` of columns
    ``(n & ~1, n | 1)`` in ``dtype``x2 (meaningful at even ``n``), for :func:`_codes_minus_zeros`."""
    magic = 0x43004300 if dtype == tl.bfloat16 else 0x64006400
    return ((z >> (((n >> 1) & 3) << 2)) & 0x000F000F) | magic


@triton.jit
def _pairs_ptx(w8, zp, sp, dtype: tl.constexpr, SCALED: tl.constexpr):
    """The inline-PTX block of :func:`_codes_minus_zeros` / :func:`_dequant_scaled` (GPU only)."""
    zb = tl.broadcast_to(zp, w8.shape)
    if SCALED:
        sb = tl.broadcast_to(sp, w8.shape)
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(_PTX_SCALED_BF16, _ASM_IO_3, [w8, zb, sb], dtype=tl.bfloat16,
                                             is_pure=True, pack=8)
        else:
            return tl.inline_asm_elementwise(_PTX_SCALED_F16, _ASM_IO_3, [w8, zb, sb], dtype=tl.float16,
                                             is_pure=True, pack=8)
    else:
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(_PTX_ZSUB_BF16, _ASM_IO_2, [w8, zb], dtype=tl.bfloat16, is_pure=True,
                                             pack=8)
        else:
            return tl.inline_asm_elementwise(_PTX_ZSUB_F16, _ASM_IO_2, [w8, zb], dtype=tl.float16, is_pure=True,
                                             pack=8)


@triton.jit
def _codes_minus_zeros(w, zp, dtype: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 ``[R, C]`` -> ``[R, 8C]`` in ``dtype``: ``q - z`` (exact: small integers), zero points folded in
    before the MMA, so no per-group ``(OFF + z) * sum(x)`` correction (its sum over x cost a cross-thread
    reduction every group). ``zp``: :func:`_zero_pairs`, broadcastable to ``[R, 8C]``.

    GPU: one inline-PTX block per word (``pack=8``, see :func:`_pair_ptx`): three shifts and four ``lop3``
    make the four ``OFF + q`` pairs ``(2p, 2p+1)`` (nibbles ``p`` and ``4 + p`` of the AWQ order), four
    ``sub.{bf16,f16}x2`` take the zero pairs off: 11 instructions per 8 weights where the per-column shift of
    :func:`_codes_plus_offset` took ~12 plus the replication moves. Interpreter: the same values through
    integer arithmetic.
    """
    w8 = _unpack8(w)
    if USE_ASM:
        return _pairs_ptx(w8, zp, zp, dtype, False)
    else:
        n = tl.broadcast_to(tl.arange(0, w8.shape[1])[None, :], w8.shape)
        zn = (tl.broadcast_to(zp, w8.shape) >> ((n & 1) << 4)) & 0xF
        return (_code_at(w8, n) - zn).to(tl.float32).to(dtype)


@triton.jit
def _dequant_scaled(w, zp, sp, dtype: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 ``[R, C]`` -> ``[R, 8C]`` weights ``(q - z) * s`` in ``dtype`` (one rounding, as the dequantize
    kernel): :func:`_codes_minus_zeros` plus one ``mul.{bf16,f16}x2`` per pair with ``sp``, the scales of
    columns ``(n & ~1, n | 1)`` read as one 32-bit word. 15 instructions per 8 weights; the ``_nibbles``
    route (fp32 unpack, subtract, scale, convert) took about five per weight."""
    w8 = _unpack8(w)
    if USE_ASM:
        return _pairs_ptx(w8, zp, sp, dtype, True)
    else:
        n = tl.broadcast_to(tl.arange(0, w8.shape[1])[None, :], w8.shape)
        half = (n & 1) << 4
        zn = (tl.broadcast_to(zp, w8.shape) >> half) & 0xF
        sn = ((tl.broadcast_to(sp, w8.shape) >> half) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
        return ((_code_at(w8, n) - zn).to(tl.float32) * sn.to(tl.float32)).to(dtype)


@triton.jit
def _scale_pairs(s_ptr, g, N, n, nmask):
    """Group ``g``'s scales of columns ``(n & ~1, n | 1)`` as one 32-bit word per column (16-bit scales)."""
    return tl.load(s_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (g * N + n) // 2, mask=nmask, other=0)


@triton.jit
def _load_group(x_ptr, qw_ptr, qz_ptr, s_ptr, g, valid, offs_m, offs_j, offs_n, offs_k, M, N, N8, stride_xm,
                GROUP: tl.constexpr, WITH_X: tl.constexpr):
    """The tiles of group ``g``: x ``[BM, GROUP]`` (if ``WITH_X``, else a dummy), packed weights, zeros, scales.
    ``valid`` false masks every load off (no memory traffic)."""
    mlim = tl.where(valid, M, 0)
    jlim = tl.where(valid, N8, 0)
    nlim = tl.where(valid, N, 0)
    k = g * GROUP + offs_k
    if WITH_X:
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=(offs_m < mlim)[:, None], other=0.0)
    else:
        a = tl.zeros((1,), dtype=x_ptr.dtype.element_ty)
    w = tl.load(qw_ptr + k[:, None] * N8 + offs_j[None, :], mask=(offs_j < jlim)[None, :], other=0)
    z = tl.load(qz_ptr + g * N8 + (offs_n >> 3), mask=offs_n < nlim, other=0)
    s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < nlim, other=0.0)
    return a, w, z, s


@triton.jit
def _group_params(qz_ptr, s_ptr, g, N8, N, n, nmask):
    """Zero points (as ``2**23 + z * 16**p``) and scales (times ``16**-p``) of group ``g``, columns ``n``."""
    z = tl.load(qz_ptr + g * N8 + (n >> 3), mask=nmask, other=0)
    zf = _nibbles(z, n)
    fac = 1.0 / (1 << (((n >> 1) & 3) << 2)).to(tl.float32)
    s = tl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32) * fac
    return zf, s


@triton.jit
def _awq_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, N8, K, stride_xm, stride_ym, SPLIT_K, groups_per_split,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One row of x per program (grid axis 1); loads for the next group are issued before the current one
    is computed (register double-buffering), so memory latency overlaps the unpacking arithmetic."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    BN8: tl.constexpr = BLOCK_N // 8
    offs_j = pid_n * BN8 + tl.arange(0, BN8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = offs_j < N8
    nmask = offs_n < N
    offs_k = tl.arange(0, GROUP)
    fac = 1.0 / (1 << (((offs_n >> 1) & 3) << 2)).to(tl.float32)

    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)

    k = g0 * GROUP + offs_k
    w = tl.load(qw_ptr + k[:, None] * N8 + offs_j[None, :], mask=jmask[None, :], other=0)
    z = tl.load(qz_ptr + g0 * N8 + (offs_n >> 3), mask=nmask, other=0)
    s = tl.load(s_ptr + g0 * N + offs_n, mask=nmask, other=0.0)
    xv = tl.load(x_ptr + m * stride_xm + k)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in range(g0, g1):
        more = g + 1 < g1
        jlim = tl.where(more, N8, 0)  # masks that switch the prefetch off after the last group
        nlim = tl.where(more, N, 0)
        kn = k + GROUP
        w_n = tl.load(qw_ptr + kn[:, None] * N8 + offs_j[None, :], mask=(offs_j < jlim)[None, :], other=0)
        z_n = tl.load(qz_ptr + (g + 1) * N8 + (offs_n >> 3), mask=offs_n < nlim, other=0)
        s_n = tl.load(s_ptr + (g + 1) * N + offs_n, mask=offs_n < nlim, other=0.0)
        xv_n = tl.load(x_ptr + m * stride_xm + kn, mask=offs_k < tl.where(more, GROUP, 0), other=0.0)

        zf = _nibbles(z, offs_n)
        wd = _nibbles(_unpack8(w), offs_n[None, :]) - zf[None, :]  # (q - z) * 16**p, exact
        part = tl.sum(xv.to(tl.float32)[:, None] * wd, axis=0)
        acc += part * (s.to(tl.float32) * fac)

        w, z, s, xv, k = w_n, z_n, s_n, xv_n, kn

    acc2 = acc[None, :]
    mask = nmask[None, :]
    n2 = offs_n[None, :]
    tile_id = m * tl.num_programs(0) + pid_n
    _finish(acc2, y_ptr, ws_ptr, cnt_ptr, b_ptr, m * stride_ym + n2, m * N + n2, n2, mask, tile_id, pid_k,
            M, N, SPLIT_K, HAS_BIAS, 4)


# ---------------------------------------------------------------------------------------------------------
# tl.dot kernel: split-K for small M, tiled GEMM (split_k=1) for large M
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _awq_dot_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, N8, K, stride_xm, stride_ym, SPLIT_K, groups_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_AFTER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, USE_ASM: tl.constexpr,
    PREFETCH: tl.constexpr, X_IN_REGS: tl.constexpr,
    TAIL: tl.constexpr, ZSUB: tl.constexpr = False,
):
    pdl_enter()
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_n * BN8 + tl.arange(0, BN8)
    offs_k = tl.arange(0, GROUP)
    nmask = offs_n < N
    mmask = offs_m < M

    OFF: tl.constexpr = 128.0 if x_ptr.dtype.element_ty == tl.bfloat16 else 1024.0
    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)

    # PREFETCH = L >= 1: the loads of groups g+1 .. g+L are in flight (in registers) while group g is computed,
    # so a program keeps L tiles of memory traffic outstanding instead of waiting a full memory latency per
    # group. X_IN_REGS=False leaves the activation tile to Triton's software pipeliner (cp.async, num_stages),
    # which keeps big activation tiles (large M) out of registers. PREFETCH = 0: plain loads.
    if PREFETCH >= 1:
        a1, w1, z1, s1 = _load_group(x_ptr, qw_ptr, qz_ptr, s_ptr, g0, g0 < g1, offs_m, offs_j, offs_n, offs_k,
                                     M, N, N8, stride_xm, GROUP, X_IN_REGS)
    if PREFETCH >= 2:
        a2, w2, z2, s2 = _load_group(x_ptr, qw_ptr, qz_ptr, s_ptr, g0 + 1, g0 + 1 < g1, offs_m, offs_j, offs_n,
                                     offs_k, M, N, N8, stride_xm, GROUP, X_IN_REGS)
    if PREFETCH >= 3:
        a3, w3, z3, s3 = _load_group(x_ptr, qw_ptr, qz_ptr, s_ptr, g0 + 2, g0 + 2 < g1, offs_m, offs_j, offs_n,
                                     offs_k, M, N, N8, stride_xm, GROUP, X_IN_REGS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g0, g1):
        if PREFETCH == 0:
            a_c, w_c, z_c, s_c = _load_group(x_ptr, qw_ptr, qz_ptr, s_ptr, g, g < g1, offs_m, offs_j, offs_n, offs_k,
                                             M, N, N8, stride_xm, GROUP, True)
        else:
            a_n, w_n, z_n, s_n = _load_group(x_ptr, qw_ptr, qz_ptr, s_ptr, g + PREFETCH, g + PREFETCH < g1, offs_m,
                                             offs_j, offs_n, offs_k, M, N, N8, stride_xm, GROUP, X_IN_REGS)
            a_c, w_c, z_c, s_c = a1, w1, z1, s1
            if PREFETCH == 1:
                a1, w1, z1, s1 = a_n, w_n, z_n, s_n
            elif PREFETCH == 2:
                a1, w1, z1, s1 = a2, w2, z2, s2
                a2, w2, z2, s2 = a_n, w_n, z_n, s_n
            else:
                a1, w1, z1, s1 = a2, w2, z2, s2
                a2, w2, z2, s2 = a3, w3, z3, s3
                a3, w3, z3, s3 = a_n, w_n, z_n, s_n
            if not X_IN_REGS:  # plain load at the top of the body: Triton stages it through shared memory
                kc = g * GROUP + offs_k
                a_c = tl.load(x_ptr + offs_m[:, None] * stride_xm + kc[None, :], mask=(offs_m < M)[:, None], other=0.0)
        if SCALE_AFTER and ZSUB:
            # acc += s * (x @ (q - z)): exact small integers into the MMA, zero points taken off per pair
            b = _codes_minus_zeros(w_c, _zero_pairs(z_c, offs_n, a_c.dtype)[None, :], a_c.dtype, USE_ASM)
            if DOT_F32:
                part = tl.dot(a_c.to(tl.float32), b.to(tl.float32))
            else:
                part = tl.dot(a_c, b)
            acc += part * s_c.to(tl.float32)[None, :]
        elif ZSUB:
            # the weight made in the activation dtype, (q - z) * s, by paired instructions
            b = _dequant_scaled(w_c, _zero_pairs(z_c, offs_n, a_c.dtype)[None, :],
                                _scale_pairs(s_ptr, g, N, offs_n, nmask)[None, :], a_c.dtype, USE_ASM)
            if DOT_F32:
                acc = tl.dot(a_c.to(tl.float32), b.to(tl.float32), acc)
            else:
                acc = tl.dot(a_c, b, acc)
        elif SCALE_AFTER:
            # factored: acc += s * (x @ (OFF + q) - (OFF + z) * sum(x)), the dot on exact small integers
            zo = ((z_c >> ((((offs_n >> 1) & 3) << 2) + ((offs_n & 1) << 4))) & 0xF).to(tl.float32) + OFF
            b = _codes_plus_offset(w_c, offs_n[None, :], a_c.dtype, USE_ASM)
            xs = tl.sum(a_c.to(tl.float32), axis=1)
            if DOT_F32:  # interpreter only: its bf16 tl.dot is broken; same (exact) operands in fp32
                part = tl.dot(a_c.to(tl.float32), b.to(tl.float32))
            else:
                part = tl.dot(a_c, b)
            acc += (part - xs[:, None] * zo[None, :]) * s_c.to(tl.float32)[None, :]
        else:
            zf = _nibbles(z_c, offs_n)
            sf = s_c.to(tl.float32) * (1.0 / (1 << (((offs_n >> 1) & 3) << 2)).to(tl.float32))
            wf = (_nibbles(_unpack8(w_c), offs_n[None, :]) - zf[None, :]) * sf[None, :]
            b = wf.to(a_c.dtype)
            if DOT_F32:
                acc = tl.dot(a_c.to(tl.float32), b.to(tl.float32), acc)
            else:
                acc = tl.dot(a_c, b, acc)

    tile_id = pid_m * num_pid_n + pid_n
    mask = mmask[:, None] & nmask[None, :]
    n2 = offs_n[None, :]
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, offs_m[:, None] * stride_ym + n2, offs_m[:, None] * N + n2,
            n2, mask, tile_id, pid_k, M, N, SPLIT_K, HAS_BIAS, TAIL)


# ---------------------------------------------------------------------------------------------------------
# dequantize to a dense [K, N] weight (for the cuBLAS path)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _awq_dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, N8, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    BN8: tl.constexpr = BLOCK_N // 8
    offs_j = pid_n * BN8 + tl.arange(0, BN8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    zf, s = _group_params(qz_ptr, s_ptr, g, N8, N, offs_n, nmask)
    k = g * GROUP + tl.arange(0, GROUP)
    w = tl.load(qw_ptr + k[:, None] * N8 + offs_j[None, :], mask=(offs_j < N8)[None, :], other=0)
    wd = (_nibbles(_unpack8(w), offs_n[None, :]) - zf[None, :]) * s[None, :]
    tl.store(w_ptr + k[:, None] * N + offs_n[None, :], wd.to(w_ptr.dtype.element_ty), mask=nmask[None, :])


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


def gemv(x2, qweight, qzeros, scales, group_size, bias=None, *, out=None, BLOCK_N=128, split_k=1, num_warps=4,
         num_stages=1, BLOCK_M=None):
    """Split-K GEMV, one program per (column block, row, K slice). ``x2`` is ``[M, K]`` (unit column stride).
    ``BLOCK_M`` is accepted for old configs and ignored (one row per program)."""
    M, K = x2.shape
    N = scales.shape[1]
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (triton.cdiv(N, BLOCK_N), M, split_k)
    cnt = tile_counters(x2.device, grid[0] * grid[1]) if split_k > 1 else y
    _awq_gemv_kernel[grid](
        x2, qweight, qzeros, scales, bias if bias is not None else y, y, ws, cnt,
        M, N, N // 8, K, x2.stride(0), y.stride(0), split_k, gps,
        GROUP=group_size, BLOCK_N=BLOCK_N, HAS_BIAS=bias is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y


def dot(x2, qweight, qzeros, scales, group_size, bias=None, *, out=None, BLOCK_M=16, BLOCK_N=64, split_k=1,
        GROUP_M=8, SCALE_AFTER=True, PREFETCH=2, X_IN_REGS=True, num_warps=4, num_stages=1, TAIL=4, ZSUB=False,
        act=None):
    """``tl.dot`` kernel: split-K (small M) or a tiled GEMM (``split_k=1``, large M). ``ZSUB``: zero points (and,
    without ``SCALE_AFTER``, scales) applied to pairs of weights by packed 16-bit instructions (the weight-scaled
    form needs scales in the activation dtype; otherwise it is ignored)."""
    M, K = x2.shape
    N = scales.shape[1]
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    cnt = tile_counters(x2.device, tiles) if split_k > 1 and TAIL else y
    _awq_dot_kernel[(tiles, split_k)](
        x2, qweight, qzeros, scales, bias if bias is not None else y, y, ws, cnt,
        M, N, N // 8, K, x2.stride(0), y.stride(0), split_k, gps,
        GROUP=group_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M, SCALE_AFTER=SCALE_AFTER,
        HAS_BIAS=bias is not None, DOT_F32=_INTERPRET and x2.dtype == torch.bfloat16, USE_ASM=not _INTERPRET, PREFETCH=PREFETCH, X_IN_REGS=X_IN_REGS,
        TAIL=_tail(TAIL), ZSUB=bool(ZSUB) and (SCALE_AFTER or scales.dtype == x2.dtype),
        num_warps=num_warps, num_stages=num_stages, **_PDL_LAUNCH,
    )
    return finish_split(ws, y, bias, split_k > 1 and TAIL == 0, act)


def dequantize_triton(qweight, qzeros, scales, group_size, dtype=None, *, out=None, BLOCK_N=128, num_warps=4):
    """Dense ``[K, N]`` weight in ``dtype`` (default ``scales.dtype``), math in fp32."""
    K = qweight.shape[0]
    N = scales.shape[1]
    dtype = dtype or scales.dtype
    w = out if out is not None else torch.empty((K, N), dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(N, BLOCK_N), K // group_size)
    _awq_dequant_kernel[grid](qweight, qzeros, scales, w, N, N // 8, K, GROUP=group_size, BLOCK_N=BLOCK_N,
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
