"""W4A16 for small batches on the tensor cores, weight fragments dequantized in registers (Gluon; experimental).

Why: Triton's ``tl.dot`` gives no control over register layouts, so an operand made by unpacking 4-bit words is
staged through shared memory every group (the ``swap``/``splitk`` kernels' per-group chain), and the CUDA-core
GEMVs spend ~4 instructions per weight (issue-bound at M = 1, docs/kernels_notes.md). Gluon (Triton's
explicit-layout language, Triton >= 3.5) lets the kernel state layouts: with the weights repacked at load time
into the ``mma.m16n8k16`` fragment order (:mod:`kernels.awq_repack`), one 32-bit word is one thread's 8-weight
A fragment, and three shifts + four ``lop3`` per word give it as bf16 pairs ``128 + q`` (fp16: ``1024 + q``) in
exactly the register layout the MMA reads: the conversion to the dot-operand layout is checked trivial at compile time
(``convert_layout(assert_trivial=True)``). About one instruction per weight by count (sm_90 SASS) against ~4.

Math per group (fp32 accumulation): ``acc_g = W'^T x^T`` over the group's k on the exact integers ``128 + q``,
then ``y += s * (acc_g - (128 + z) * sum_k x)``, like ``splitk``; the sum of x on the CUDA cores (moved into the
accumulator's layout through shared memory, a CTA barrier per group) or, ``XSUM_MMA``, by one more ``mma`` with an
A operand of ones, landing in that layout (the table's choice at 1-8 rows on the H200: ~3 % faster than the same
config with the barrier, docs/kernels_notes.md). ``SCALED``: the weights scaled in the fragments instead,
``((128 + q) - (128 + z)) * s`` in bf16, no sum of x. ``ZSUB``: ``(128 + q) - (128 + z)`` in the fragments
(exact integers in bf16) and ``s`` on each group's fp32 accumulator, no sum of x and no bf16 multiply per weight
(the H200 table's choice at 16 rows on the large shapes, with x waited for before the loop, ``XREADY``, and/or the
next group's words, zero points and scales in flight, ``PREFETCH = 2``; the scaled loop elsewhere). One program:
``16 * num_warps`` output columns (one 16-row tile per warp), ``BM`` rows of x (the MMA's N, 8 or 16), a slice of
K groups; split-K partials are summed by ``awq_triton.reduce_partials``.

Status: compiled for sm_90 with Triton 3.6 (the weights never pass through shared memory; x's small tile does,
on its way into the B operand layout, or with ``XGROUPS`` a whole chunk of x is staged there by ``cp.async``); the
engine's kernel at 1-16 rows on sm_90 (:mod:`kernels.repacked_dispatch`). Launched early under programmatic
dependent launch (``PDL``): its first weights are requested while the launch before ends, and its split-K sum waits
resident (M = 1 1-1.6 us faster on the H200, docs/kernels_notes.md). bf16 or fp16 x (``OFF`` above is 128 for
bf16, 1024 for fp16: :func:`_offset`; scales in x's dtype). Gluon has no CPU interpreter:
run on the GPU only (``tests/gpu``); its sm_90 builds and the repack are tested on the CPU.
"""

from __future__ import annotations

import functools

import torch
import triton

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # griddepcontrol (sm_90), Gluon calls them too

from .awq_repack import check_repackable
from .awq_triton import PDL as _PDL_ON, _out_and_ws, _split_args, finish_split, tile_counters

XSTAGE_BYTES = 64 * 1024  # the most shared memory a program's staged x takes (``XGROUPS``)

# cp.async global -> shared (Triton 3.6 names it ``async_copy_global_to_shared``, later releases ``async_load``)
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# a CTA-wide barrier (Triton 3.6 names it ``thread_barrier``, later releases ``barrier``)
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@functools.cache  # (a launch's layouts cost ~50 us of Python to build; a prefill launches 128 linears per step)
def _layouts(num_warps: int, BK: int, T: int, WM: int = 1):
    """``num_warps`` warps along the output columns (each its own 16-row weight tiles), ``WM`` along the rows of x
    (each its ``BM / WM`` rows: at 64 rows one warp cannot hold all of x's operand and the accumulator)."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, WM], instr_shape=[16, 8])
    a_l = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    kh = BK // 16
    # packed words of one step, [tile (T), n_hi (warp), n_lo (8), k_hi (BK/16), k_mid (4)]: lane = 4 n_lo + k_mid
    # as in the fragment; the k-tiles of a step in one thread's registers (one 8- or 16-byte load), T n-tiles
    # per warp sharing each x fragment (the MMA layout repeats over rows beyond 16 x warps); the warps along the
    # rows of x (the low bits of the warp id in the MMA layout) load the same words (zero bases: a broadcast)
    w_l = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1 << i, 0] for i in range(kh.bit_length() - 1)]
        + [[1 << i, 0, 0, 0, 0] for i in range(T.bit_length() - 1)],
        lane_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 4, 0, 0]],
        warp_bases=[[0, 0, 0, 0, 0] for _ in range(WM.bit_length() - 1)]
        + [[0, 1 << i, 0, 0, 0] for i in range(num_warps.bit_length() - 1)],
        block_bases=[], shape=[T, num_warps, 8, kh, 4])
    # x rows [BM, BK]: eight consecutive features (16 bytes) per thread
    x_l = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 * 8 // BK, BK // 8],
                           warps_per_cta=[num_warps * WM, 1], order=[1, 0])
    return mma, a_l, b_l, w_l, x_l


@functools.cache
def staged_layout(BK: int):
    """For ``XSTEPS``: the shared buffer x's chunk is stored in, 16-byte units swizzled over 8 rows so that the
    ``ldmatrix`` of each step's B operand (8 rows of x at one k) touches every bank once."""
    return gl.SwizzledSharedLayout(vec=8, per_phase=max(1, 64 // BK), max_phase=min(8, BK // 8), order=[1, 0])


@functools.cache
def nvmma_shared(block: tuple[int, ...], dtype) -> gl.NVMMASharedLayout:
    """The default NVMMA shared layout of a ``block`` of ``dtype`` (a TMA / wgmma operand), built once."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def _unpack_asm(magic: str) -> str:
    """PTX of one word -> four pairs ``OFF + q``: three shifts, then each nibble pair masked into the exponent of
    ``magic`` (a pair of ``OFF``: bf16 128 = 0x4300, whose last mantissa bit is 1; fp16 1024 = 0x6400)."""
    return ("{ .reg .b32 t0, t1, t2;\n shr.u32 t0, $4, 4; shr.u32 t1, $4, 8; shr.u32 t2, $4, 12;\n"
            + "".join(f"lop3.b32 ${i}, {src}, 0x000F000F, {magic}, 0xea; "
                      for i, src in enumerate(("$4", "t0", "t1", "t2"))) + "}")


_UNPACK_BF16 = gl.constexpr(_unpack_asm("0x43004300"))
_UNPACK_F16 = gl.constexpr(_unpack_asm("0x64006400"))


@gluon.jit
def _fragments(w, a_l: gl.constexpr, W: gl.constexpr, T: gl.constexpr, BK: gl.constexpr, DT: gl.constexpr):
    """Words ``[T, W, 8, BK/16, 4]`` -> the A operand ``[16 W T, BK]`` in ``DT`` (``OFF + q``, :func:`_offset`), in
    ``a_l``, in registers."""
    w2 = gl.join(w, w)
    w4 = gl.join(w2, w2)
    w8 = gl.join(w4, w4)  # [tile, n_hi, n_lo, k_hi, k_mid, k3, n3, k0]
    if DT == gl.float16:
        a8 = gl.inline_asm_elementwise(_UNPACK_F16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [w8], dtype=gl.float16,
                                       is_pure=True, pack=8)
    else:
        a8 = gl.inline_asm_elementwise(_UNPACK_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [w8], dtype=gl.bfloat16,
                                       is_pure=True, pack=8)
    a = gl.reshape(gl.permute(a8, [0, 1, 6, 2, 3, 5, 4, 7]), [16 * W * T, BK])
    return gl.convert_layout(a, a_l, assert_trivial=True)


@gluon.jit
def _offset(DT: gl.constexpr):
    """``OFF``, what the unpacked codes carry: 128 in bf16 (7 mantissa bits), 1024 in fp16 (10)."""
    if DT == gl.float16:
        return 1024
    else:
        return 128


@gluon.jit
def _word_offsets(pid_n, K, w_l: gl.constexpr, W: gl.constexpr, T: gl.constexpr, KH: gl.constexpr):
    """Word offsets ``[T, W, 8, KH, 4]`` (layout ``w_l``) of column block ``pid_n``'s first step:
    ``packed[nt, kc, lane, j]`` is word ``((nt * K/64 + kc) * 32 + lane) * 4 + j``, tiles ``nt`` tile-major over
    warps as in the MMA layout."""
    it = gl.arange(0, T, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, w_l)))))
    i0 = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, w_l)))))
    i1 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, w_l)))))
    i2 = gl.arange(0, KH, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, w_l)))))
    i3 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, w_l)))))
    nt = (pid_n * T + it)[:, None] * W + i0[None, :]
    return ((nt[:, :, None, None, None] * (K // 64) * 32 + i1[None, None, :, None, None] * 4
             + i3[None, None, None, None, :]) * 4 + i2[None, None, None, :, None])


@gluon.jit
def _x_rows(pid_m, M, stride_xm, BM: gl.constexpr, BK: gl.constexpr, x_l: gl.constexpr):
    """Offsets and mask of row block ``pid_m``'s first ``[BM, BK]`` step of x (rows past ``M`` masked)."""
    rk = gl.arange(0, BK, layout=gl.SliceLayout(0, x_l))
    rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, x_l))
    return rm[:, None] * stride_xm + rk[None, :], (rm < M)[:, None] & (rk >= 0)[None, :]


@gluon.jit
def _x_chunk(pid_m, M, stride_xm, XSTEPS: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, x_l: gl.constexpr):
    """Offsets, features (from the chunk's start) and row mask of row block ``pid_m``'s chunk of x, its steps'
    ``[BM, BK]`` tiles stacked as ``[XSTEPS * BM, BK]`` (a buffer's rows)."""
    r = gl.arange(0, XSTEPS * BM, layout=gl.SliceLayout(1, x_l))
    rm = pid_m * BM + r % BM
    f = (r // BM * BK)[:, None] + gl.arange(0, BK, layout=gl.SliceLayout(0, x_l))[None, :]
    return rm[:, None] * stride_xm + f, f, (rm < M)[:, None] & (f >= 0)


if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton >= 3.7 (3.6 names it ``_reinterpret``)
    @gluon.jit
    def _buffers(x_smem, NBUF: gl.constexpr, ROWS: gl.constexpr, BK: gl.constexpr, xs_l: gl.constexpr):
        return x_smem.reinterpret(x_smem.dtype, [NBUF, ROWS, BK], xs_l)
else:
    @gluon.jit
    def _buffers(x_smem, NBUF: gl.constexpr, ROWS: gl.constexpr, BK: gl.constexpr, xs_l: gl.constexpr):
        return x_smem._reinterpret(x_smem.dtype, [NBUF, ROWS, BK], xs_l)


@gluon.jit
def _issue_x(x_smem, buf, x_ptrs, feats, rows, left, NBUF: gl.constexpr, XSTEPS: gl.constexpr,
             BM: gl.constexpr, BK: gl.constexpr, xs_l: gl.constexpr):
    """Start copying a chunk of x (``x_ptrs``: :func:`_x_chunk`'s offsets from the chunk's first feature) into
    buffer ``buf`` of ``x_smem`` (``cp.async``: no registers held while it flies; features past ``left``, beyond
    the split, filled with 0). :func:`_chunk_ready` waits for it after the chunk's first weights are requested,
    so the two loads overlap."""
    _async_load(_buffers(x_smem, NBUF, XSTEPS * BM, BK, xs_l).index(buf), x_ptrs, mask=rows & (feats < left))
    async_copy.commit_group()


@gluon.jit
def _chunk_ready(x_smem, x_ptrs, feats, rows, g, g1, chunk, XSTEPS: gl.constexpr, NBUF: gl.constexpr,
                 BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, xs_l: gl.constexpr):
    """At chunk ``chunk``'s first step, its weights already requested: wait for the chunk's copy (this thread's,
    then every thread's: the barrier also says every warp is done with the chunk before), then, with two
    buffers, start copying the next chunk into the one the chunk before used."""
    async_copy.wait_group(0)
    _cta_barrier()
    if NBUF == 2:
        nxt = g + XSTEPS // (GROUP // BK)
        if nxt < g1:
            _issue_x(x_smem, (chunk + 1) % 2, x_ptrs + nxt * GROUP, feats, rows, (g1 - nxt) * GROUP, NBUF, XSTEPS,
                     BM, BK, xs_l)


@gluon.jit
def _staged_tile(x_smem, x_ptrs, feats, rows, g, g0, g1, st: gl.constexpr, XSTEPS: gl.constexpr,
                 NBUF: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, xs_l: gl.constexpr,
                 READY: gl.constexpr):
    """The ``[BM, BK]`` buffer tile that holds step ``st`` of group ``g``'s x; at a chunk's first step (its weights
    already requested) the chunk is made ready first (:func:`_chunk_ready`), unless ``READY`` (``XREADY``: the
    split's x waited for before the loop)."""
    SPG: gl.constexpr = GROUP // BK
    XG: gl.constexpr = XSTEPS // SPG
    i = g - g0
    if st == 0 and not READY:
        if i % XG == 0:  # (XONCE: the split's first step)
            _chunk_ready(x_smem, x_ptrs, feats, rows, g, g1, i // XG, XSTEPS, NBUF, BM, BK, GROUP, xs_l)
    return x_smem.index((i // XG % NBUF * XG + i % XG) * SPG + st)


@gluon.jit
def _repeat_tiles(v, T: gl.constexpr, R: gl.constexpr, BM: gl.constexpr, mma: gl.constexpr):
    """``[R, BM]`` (one 16-row tile per warp, in ``mma``) as ``[T * R, BM]``, the copies stacked tile-major as the
    layout repeats its tiles: register copies only (``XSUM_MMA``: the sum of x from the ones ``mma``)."""
    if T >= 2:
        v = gl.reshape(gl.permute(gl.join(v, v), [2, 0, 1]), [2 * R, BM])
    if T >= 4:
        v = gl.reshape(gl.permute(gl.join(v, v), [2, 0, 1]), [4 * R, BM])
    return gl.convert_layout(v, mma, assert_trivial=True)


@gluon.jit
def _zeros_scales(qz_ptr, s_ptr, g, n, N):
    """``OFF + z`` and the scales of group ``g`` for columns ``n`` (AutoAWQ ``qzeros``/``scales``), in ``n``'s
    layout and the scales' dtype: what ``SCALED`` subtracts from and multiplies into the A fragments."""
    return (_zeros(gl.load(qz_ptr + g * (N // 8) + n // 8), n, s_ptr.dtype.element_ty),
            gl.load(s_ptr + g * N + n))


@gluon.jit
def _wload(ptrs, EVICT_FIRST: gl.constexpr):
    """The weights' words, read once a call: ``EVICT_FIRST`` marks them first to go from L1 and L2 (a fractional
    L2 policy), so the streamed weights leave L2 to the split-K partials, x, zero points and scales (16 rows on the
    H200: 8192² 16.3 -> 15.7 us, 8192x28672 48.2 -> 46.2; 1 row: 0.1-0.4 us slower on three shapes)."""
    if EVICT_FIRST:
        return gl.load(ptrs, eviction_policy="evict_first")
    else:
        return gl.load(ptrs)


@gluon.jit
def _second_step_words(w, pw_ptr, g, GROUP: gl.constexpr, BK: gl.constexpr, EVICT_FIRST: gl.constexpr):
    """Group ``g``'s second step's words where a group is two steps (group 128, ``BK`` 64), else ``w`` itself (one
    step): what ``PREFETCH = 2`` keeps in flight besides the first."""
    if GROUP // BK == 2:
        return _wload(pw_ptr + _word_offset(g * GROUP + BK, BK), EVICT_FIRST)
    else:
        return w


@gluon.jit
def _zeros(zw, n, DT: gl.constexpr):
    """``OFF + z`` in ``DT`` (exact) of columns ``n`` from their packed ``qzeros`` words ``zw`` (AutoAWQ nibble
    order)."""
    return (((zw >> ((((n >> 1) & 3) << 2) + ((n & 1) << 4))) & 0xF) + _offset(DT)).to(DT)


@gluon.jit
def _word_offset(k0, BK: gl.constexpr):
    """Word offset of the step starting at input feature ``k0`` (a multiple of ``BK``, 16 or more) within a
    tile's row of words: 64-feature chunks are 128 words apart, 16-feature slices one word. At ``BK = 64`` the
    slice term is 0, and leaving it out lets the compiler prove 16-byte alignment (one 16-byte load per thread
    instead of four 4-byte loads)."""
    if BK == 64:
        return (k0 // 64) * 128
    else:
        return (k0 // 64) * 128 + (k0 % 64) // 16


@gluon.jit
def _x_operand(x_smem, x_ptr, xcoff, xcf, xcrows, xoff, xmask, g, g0, g1, st: gl.constexpr, XSTEPS: gl.constexpr,
               NBUF: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, xs_l: gl.constexpr,
               READY: gl.constexpr, b_l: gl.constexpr):
    """Step ``st`` of group ``g``'s x as the MMA's B operand (``x^T``): from the staged buffer by ``ldmatrix``
    (:func:`_staged_tile`), or loaded coalesced and moved into the operand layout (x not staged)."""
    if XSTEPS:
        return _staged_tile(x_smem, x_ptr + xcoff, xcf, xcrows, g, g0, g1, st, XSTEPS, NBUF, BM, BK, GROUP, xs_l,
                            READY).permute([1, 0]).load(b_l)
    else:
        # (one pointer add: written as two, the 8-row SCALED build took 9 registers more and lost a program per SM)
        xr = gl.load(x_ptr + xoff + (g * GROUP + st * BK), mask=xmask, other=0.0)
        return gl.convert_layout(gl.permute(xr, [1, 0]), b_l)


@gluon.jit
def _zsub_group(y_acc, w, w1, zw, sg, g, gn, x_smem, x_ptr, xcoff, xcf, xcrows, xoff, xmask, g0, g1, pw_ptr, qz_ptr,
                s_ptr, N, on_a, on, XSTEPS: gl.constexpr, NBUF: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                GROUP: gl.constexpr, xs_l: gl.constexpr, XREADY: gl.constexpr, a_l: gl.constexpr,
                b_l: gl.constexpr, mma: gl.constexpr, W: gl.constexpr, T: gl.constexpr, EVICT_FIRST: gl.constexpr):
    """One group of the ``ZSUB`` loop under ``PREFETCH = 2``: group ``g`` from its words ``w``/``w1``, zero-point
    words ``zw`` and scales ``sg`` (requested a group before), with group ``gn``'s requested first and returned."""
    wn = _wload(pw_ptr + _word_offset(gn * GROUP, BK), EVICT_FIRST)
    wn1 = _second_step_words(wn, pw_ptr, gn, GROUP, BK, EVICT_FIRST)
    zn = gl.load(qz_ptr + gn * (N // 8) + on_a // 8)
    sn = gl.load(s_ptr + gn * N + on)
    DT: gl.constexpr = s_ptr.dtype.element_ty
    za = _zeros(zw, on_a, DT)
    acc = gl.zeros([16 * W * T, BM], gl.float32, layout=mma)
    for st in gl.static_range(GROUP // BK):
        if st == 0:
            wst = w
        else:
            wst = w1
        xb = _x_operand(x_smem, x_ptr, xcoff, xcf, xcrows, xoff, xmask, g, g0, g1, st, XSTEPS, NBUF, BM, BK, GROUP,
                        xs_l, XREADY, b_l)
        acc = gl.nvidia.ampere.mma_v2(_fragments(wst, a_l, W, T, BK, DT) - za[:, None], xb, acc)
    return y_acc + acc * sg.to(gl.float32)[:, None], wn, wn1, zn, sn


@gluon.jit(do_not_specialize=["M"])  # one build serves every row count (no compile on a request)
def _awq_gluon_mma_kernel(x_ptr, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                          M, N, K, stride_xm, stride_ym, SPLIT_K, groups_per_split,
                          GROUP: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr, W: gl.constexpr, T: gl.constexpr,
                          HAS_BIAS: gl.constexpr, TAIL: gl.constexpr, PREFETCH: gl.constexpr, SCALED: gl.constexpr,
                          UNROLL: gl.constexpr, mma: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr,
                          w_l: gl.constexpr, x_l: gl.constexpr, XSTEPS: gl.constexpr, XONCE: gl.constexpr,
                          xs_l: gl.constexpr, PDL: gl.constexpr, XSUM_MMA: gl.constexpr, ZSUB: gl.constexpr,
                          XREADY: gl.constexpr, EVICT_FIRST: gl.constexpr):
    if PDL:  # the next launch (the split-K sum, the next layer) may start placing its programs now
        gdc_launch_dependents()
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    DT: gl.constexpr = x_ptr.dtype.element_ty  # bf16 or fp16 (the launcher checks the scales match)
    KH: gl.constexpr = BK // 16
    woff = _word_offsets(pid_n, K, w_l, W, T, KH)
    # x [BM, BK] loaded coalesced (16 bytes per thread), then moved into the B operand layout as x^T: loading
    # straight in the operand layout took one 4-byte load and one 64-bit address per pair of features
    # (~120 more registers at BM = 16)
    xoff, xmask = _x_rows(pid_m, M, stride_xm, BM, BK, x_l)
    NBUF: gl.constexpr = 1 if XONCE else 2
    if XSTEPS:
        # x staged in shared memory by cp.async, the whole split at once (XONCE) or XSTEPS steps at a time in two
        # buffers (the next chunk copied while this one computes): one CTA barrier per chunk instead of two per
        # step, and each step's B operand read straight from the buffer by ldmatrix
        x_smem = gl.allocate_shared_memory(DT, [NBUF * XSTEPS, BM, BK], xs_l)
        xcoff, xcf, xcrows = _x_chunk(pid_m, M, stride_xm, XSTEPS, BM, BK, x_l)
    else:  # (placeholders for the helpers' arguments: x read step by step)
        x_smem, xcoff, xcf, xcrows = x_ptr, 0, 0, 0
    # output columns / rows in the accumulator layout (the columns also in the A fragments' layout)
    on = pid_n * 16 * W * T + gl.arange(0, 16 * W * T, layout=gl.SliceLayout(1, mma))
    on_a = pid_n * 16 * W * T + gl.arange(0, 16 * W * T, layout=gl.SliceLayout(1, a_l))
    om = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))

    num_groups = K // GROUP
    g0 = pid_k * groups_per_split
    g1 = gl.minimum(g0 + groups_per_split, num_groups)
    if PREFETCH:
        w = _wload(pw_ptr + woff + _word_offset(g0 * GROUP, BK), EVICT_FIRST)
    if PREFETCH == 2:  # (ZSUB) the first group's other step, zero points and scales too; none waits for the launch
        w1 = _second_step_words(w, pw_ptr + woff, g0, GROUP, BK, EVICT_FIRST)
        zw = gl.load(qz_ptr + g0 * (N // 8) + on_a // 8)
        sg = gl.load(s_ptr + g0 * N + on)
    if PDL == 2:
        # launched early (``launch_pdl``): the weights do not depend on the launch before, so the first step's
        # words (PREFETCH) are requested while it ends; x, y and the split-K buffers only after it is done
        gdc_wait()
    if XSTEPS:  # the first chunk (XONCE: the split), before the loop
        _issue_x(x_smem, 0, x_ptr + xcoff + g0 * GROUP, xcf, xcrows, (g1 - g0) * GROUP, NBUF, XSTEPS, BM, BK, xs_l)
    if XREADY:  # (XONCE) the split's x waited for here, once: no barrier is left inside the loop
        async_copy.wait_group(0)
        _cta_barrier()
    y_acc = gl.zeros([16 * W * T, BM], gl.float32, layout=mma)
    if SCALED:
        # the weights scaled in the A fragments ((128 + q) - (128 + z)) * s, one accumulator, no sum over x: fewer
        # registers for 32-64 rows (the product rounds to bf16, as in the ``gemm`` kernel)
        for g in range(g0, g1):
            za, sa = _zeros_scales(qz_ptr, s_ptr, g, on_a, N)
            for st in gl.static_range(GROUP // BK):
                k0 = g * GROUP + st * BK
                if PREFETCH:
                    w_next = _wload(pw_ptr + woff + _word_offset(gl.minimum(k0 + BK, g1 * GROUP - BK), BK), EVICT_FIRST)
                else:
                    w = _wload(pw_ptr + woff + _word_offset(k0, BK), EVICT_FIRST)
                xb = _x_operand(x_smem, x_ptr, xcoff, xcf, xcrows, xoff, xmask, g, g0, g1, st, XSTEPS, NBUF, BM, BK,
                                GROUP, xs_l, XREADY, b_l)
                a = (_fragments(w, a_l, W, T, BK, DT) - za[:, None]) * sa[:, None]
                y_acc = gl.nvidia.ampere.mma_v2(a, xb, y_acc)
                if PREFETCH:
                    w = w_next
    elif ZSUB and PREFETCH == 2:
        # the next group's words, zero points and scales requested before this group computes (the zero points
        # feed the first fragments: loaded in their own group they stall it). Two groups a trip, the sets taking
        # turns: with one group a trip, ptxas put the loads at the trip's end and copied them into the carried
        # registers at once (waiting for them); so unrolled, the second group's set is in flight during the first
        # (the next trip's first set still sits at the trip's end)
        for g in range(g0, g1 - 1, 2):
            y_acc, wb, wb1, zb, sb = _zsub_group(y_acc, w, w1, zw, sg, g, g + 1, x_smem, x_ptr, xcoff, xcf, xcrows,
                                                 xoff, xmask, g0, g1, pw_ptr + woff, qz_ptr, s_ptr, N, on_a, on,
                                                 XSTEPS, NBUF, BM, BK, GROUP, xs_l, XREADY, a_l, b_l, mma, W, T,
                                                 EVICT_FIRST)
            y_acc, w, w1, zw, sg = _zsub_group(y_acc, wb, wb1, zb, sb, g + 1, gl.minimum(g + 2, g1 - 1), x_smem,
                                               x_ptr, xcoff, xcf, xcrows, xoff, xmask, g0, g1, pw_ptr + woff, qz_ptr,
                                               s_ptr, N, on_a, on, XSTEPS, NBUF, BM, BK, GROUP, xs_l, XREADY, a_l,
                                               b_l, mma, W, T, EVICT_FIRST)
        if (g1 - g0) % 2 == 1:  # the split's odd last group (its own set, requested one group ahead)
            y_acc, w, w1, zw, sg = _zsub_group(y_acc, w, w1, zw, sg, g1 - 1, g1 - 1, x_smem, x_ptr, xcoff, xcf,
                                               xcrows, xoff, xmask, g0, g1, pw_ptr + woff, qz_ptr, s_ptr, N, on_a,
                                               on, XSTEPS, NBUF, BM, BK, GROUP, xs_l, XREADY, a_l, b_l, mma, W, T,
                                               EVICT_FIRST)
    elif ZSUB:
        # the zero points taken off in the A fragments, ``(128 + q) - (128 + z)``, exact small integers in bf16; the
        # scale applied to each group's fp32 accumulator: one bf16 op per weight pair fewer than SCALED, no sum of x
        for g in range(g0, g1):
            za = _zeros(gl.load(qz_ptr + g * (N // 8) + on_a // 8), on_a, DT)
            acc = gl.zeros([16 * W * T, BM], gl.float32, layout=mma)
            for st in gl.static_range(GROUP // BK):
                k0 = g * GROUP + st * BK
                if PREFETCH:
                    w_next = _wload(pw_ptr + woff + _word_offset(gl.minimum(k0 + BK, g1 * GROUP - BK), BK), EVICT_FIRST)
                else:
                    w = _wload(pw_ptr + woff + _word_offset(k0, BK), EVICT_FIRST)
                xb = _x_operand(x_smem, x_ptr, xcoff, xcf, xcrows, xoff, xmask, g, g0, g1, st, XSTEPS, NBUF, BM, BK,
                                GROUP, xs_l, XREADY, b_l)
                acc = gl.nvidia.ampere.mma_v2(_fragments(w, a_l, W, T, BK, DT) - za[:, None], xb, acc)
                if PREFETCH:
                    w = w_next
            y_acc += acc * gl.load(s_ptr + g * N + on).to(gl.float32)[:, None]
    else:
        if XSUM_MMA:
            # the sum of x over each group's features by the tensor cores, an A operand of ones (one 16-row tile
            # per warp): it lands in the accumulator's layout, where the sum of x computed on the CUDA cores had
            # to pass through shared memory behind a CTA barrier every group
            ones = gl.full([16 * W, BK], 1.0, DT, layout=a_l)
        for g in range(g0, g1):
            acc = gl.zeros([16 * W * T, BM], gl.float32, layout=mma)
            if XSUM_MMA:
                xacc = gl.zeros([16 * W, BM], gl.float32, layout=mma)
            else:
                xs = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, x_l))
            for st in gl.static_range(GROUP // BK):
                k0 = g * GROUP + st * BK
                if PREFETCH:
                    # the next step's words are in flight while this step computes (the split's last step
                    # reloads itself, cached, rather than read the next split's words)
                    w_next = _wload(pw_ptr + woff + _word_offset(gl.minimum(k0 + BK, g1 * GROUP - BK), BK), EVICT_FIRST)
                else:
                    w = _wload(pw_ptr + woff + _word_offset(k0, BK), EVICT_FIRST)
                if XSTEPS:
                    xbuf = _staged_tile(x_smem, x_ptr + xcoff, xcf, xcrows, g, g0, g1, st, XSTEPS, NBUF, BM, BK,
                                        GROUP, xs_l, XREADY)
                    if not XSUM_MMA:
                        xs += gl.sum(xbuf.load(x_l).to(gl.float32), axis=1)
                    xb = xbuf.permute([1, 0]).load(b_l)
                else:
                    xr = gl.load(x_ptr + xoff + k0, mask=xmask, other=0.0)
                    if not XSUM_MMA:
                        xs += gl.sum(xr.to(gl.float32), axis=1)
                    xb = gl.convert_layout(gl.permute(xr, [1, 0]), b_l)
                acc = gl.nvidia.ampere.mma_v2(_fragments(w, a_l, W, T, BK, DT), xb, acc)
                if XSUM_MMA:
                    xacc = gl.nvidia.ampere.mma_v2(ones, xb, xacc)
                if PREFETCH:
                    w = w_next
            z = gl.load(qz_ptr + g * (N // 8) + on // 8)
            zo = (((z >> ((((on >> 1) & 3) << 2) + ((on & 1) << 4))) & 0xF) + _offset(DT)).to(gl.float32)
            s = gl.load(s_ptr + g * N + on).to(gl.float32)
            if XSUM_MMA:
                y_acc += (acc - zo[:, None] * _repeat_tiles(xacc, T, 16 * W, BM, mma)) * s[:, None]
            else:
                xs_m = gl.convert_layout(xs, gl.SliceLayout(0, mma))
                y_acc += (acc - zo[:, None] * xs_m[None, :]) * s[:, None]

    omask = (om < M)[None, :] & (on < N)[:, None]
    y_ptrs = y_ptr + om[None, :] * stride_ym + on[:, None]
    if TAIL == 2:  # split-K (the launcher passes 2 only then)
        y_acc = _add_other_splits(y_acc, ws_ptr, cnt_ptr, pid_m * gl.num_programs(0) + pid_n, pid_k, SPLIT_K,
                                  M - pid_m * BM, 16 * W * T, BM, mma, UNROLL, True)
        if pid_k == SPLIT_K - 1:
            _store_y(y_acc, y_ptrs, b_ptr + on, omask, HAS_BIAS)
    elif SPLIT_K == 1:
        _store_y(y_acc, y_ptrs, b_ptr + on, omask, HAS_BIAS)
    else:
        ws_offs = om[None, :] * N + on[:, None]
        gl.store(ws_ptr + pid_k * M * N + ws_offs, y_acc, mask=omask)
        if TAIL:
            _sum_in_last_split(gl.zeros([16 * W * T, BM], gl.float32, layout=mma), ws_ptr, ws_offs, omask,
                               y_ptrs, b_ptr + on, cnt_ptr, pid_m * gl.num_programs(0) + pid_n, M, N, SPLIT_K,
                               HAS_BIAS)


@gluon.jit
def _store_y(acc, y_ptrs, b_ptrs, omask, HAS_BIAS: gl.constexpr):
    """The tile's total (+ bias) in y's dtype, in the accumulator's layout."""
    if HAS_BIAS:
        acc += gl.load(b_ptrs).to(gl.float32)[:, None]
    gl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=omask)


@gluon.jit
def _sum_in_last_split(tot, ws_ptr, ws_offs, omask, y_ptrs, b_ptrs, cnt_ptr, tile, M, N, SPLIT_K,
                       HAS_BIAS: gl.constexpr):
    """Split-K without a second launch: after this program's partial is in ``ws``, the last program of output
    ``tile`` to arrive (a counter per tile) sums every split's partial in a fixed order (``tot``: zeros in the
    partials' layout), adds the bias, stores ``y`` and leaves the counter at 0 for the next launch / graph
    replay."""
    _cta_barrier()  # every thread's partial is written before the counter says so
    prev = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if prev == SPLIT_K - 1:
        for s0 in range(0, SPLIT_K, 4):
            for ds in gl.static_range(4):
                tot += gl.load(ws_ptr + (s0 + ds) * M * N + ws_offs, mask=omask & (s0 + ds < SPLIT_K),
                               other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            tot += gl.load(b_ptrs).to(gl.float32)[:, None]
        gl.store(y_ptrs, tot.to(y_ptrs.dtype.element_ty), mask=omask)
        gl.atomic_xchg(cnt_ptr + tile, 0)


@gluon.jit
def _add_other_splits(acc, ws_ptr, cnt_ptr, tile, pid_k, SPLIT_K, live, R0: gl.constexpr, R1: gl.constexpr,
                      acc_l: gl.constexpr, UNROLL: gl.constexpr, LIVE: gl.constexpr):
    """Split-K summed in the registers of the tile's last split (``TAIL = 2``); returns the tile's total there
    (the caller stores it when ``pid_k == SPLIT_K - 1``). Why: the last-program sum of ``TAIL = 1`` stores every
    partial and reads them all back, and the second launch (``TAIL = 0``) re-reads them from memory: 8-14 us on a
    56 us kernel at 256 rows (pipelined kernel), 3-9 us on 13-16 us at 1-16 rows (this kernel; Nsight Compute, H200).

    Splits ``0 .. SPLIT_K - 2`` store their ``[R0, R1]`` accumulator as it sits in registers (each thread its own
    fragments, in a per-tile slot only this function reads: whole 32-byte sectors, no layout conversion) and count
    it on the tile's counter; split ``SPLIT_K - 1`` waits for the count and adds the slots to its own registers in
    split order, so the sum's order, and every bit, is fixed, and leaves the counter at 0. The wait cannot hang:
    the last split's programs have the highest block indices of their tile, and CUDA starts blocks in index order,
    so the others are running or done (the rule stream-K GEMMs rely on).

    ``LIVE``: only the first ``live`` of the ``R1`` rows (the rows of x that exist) are stored and read: at M = 1
    an 8-row tile moves an eighth of the bytes (the pipelined kernel's 64-256-row tiles are full or nearly, and a
    predicate per element there costs the registers that keep two programs per SM). The last split reads
    ``UNROLL`` slots per round, all in flight together: at 16-28 splits one load after another is 15-27 L2 round
    trips on the program's path. (Neither moved the small-M timings on the H200: docs/kernels_notes.md.)"""
    r1 = gl.arange(0, R1, layout=gl.SliceLayout(0, acc_l))
    offs = gl.arange(0, R0, layout=gl.SliceLayout(1, acc_l))[:, None] * R1 + r1[None, :]
    rows = ((r1 < live) | (not LIVE))[None, :] & (offs >= 0)
    slots = ws_ptr + tile.to(gl.int64) * ((SPLIT_K - 1) * R0 * R1)
    if pid_k < SPLIT_K - 1:
        gl.store(slots + pid_k * (R0 * R1) + offs, acc, mask=rows)
        _cta_barrier()  # every thread's partial is written before the counter says so
        gl.atomic_add(cnt_ptr + tile, 1, sem="release", scope="gpu")
    else:
        seen = gl.atomic_add(cnt_ptr + tile, 0, sem="acquire", scope="gpu")
        while seen < SPLIT_K - 1:
            seen = gl.atomic_add(cnt_ptr + tile, 0, sem="acquire", scope="gpu")
        for s0 in range(0, SPLIT_K - 1, UNROLL):
            for ds in gl.static_range(UNROLL):  # (masked slots past the last add 0: the order stays fixed)
                acc += gl.load(slots + (s0 + ds) * (R0 * R1) + offs, mask=rows & (s0 + ds < SPLIT_K - 1),
                               other=0.0, cache_modifier=".cg")
        gl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")  # (seen by the next launch: no fence needed here)
    return acc


def tail_unroll(tile_elems: int, threads: int) -> int:
    """Slots the last split of the small-M kernel's ``TAIL = 2`` reads per round: as many as keep ~64 registers of
    loads in flight (8 at 1-16 rows; the pipelined kernel reads one, its 64-256-row accumulator already holding
    32-128 registers a thread)."""
    return max(1, min(8, 64 * threads // tile_elems))


GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}  # the activations the Gluon kernels take


def check_dtypes(launcher: str, x2: torch.Tensor, scales: torch.Tensor) -> None:
    """The activations the Gluon kernels take (bf16 or fp16) and scales of the same dtype (the fragments are scaled
    and offset in it), before a launch."""
    if x2.dtype not in GL_DTYPES:
        raise ValueError(f"{launcher} takes bf16 or fp16 x, got {x2.dtype}")
    if scales.dtype != x2.dtype:
        raise ValueError(f"{launcher} needs scales in x's dtype {x2.dtype}, got {scales.dtype}: convert them once "
                         f"at load time")


def check_tail(launcher: str, TAIL: int) -> None:
    """The split-K sums the Gluon launchers take, before a launch."""
    if TAIL not in (0, 1, 2):
        raise ValueError(f"{launcher} takes TAIL 0 (a second launch sums the splits), 1 (the last program, from "
                         f"memory) or 2 (the last split, in registers); got {TAIL!r}")


def staged_steps(xgroups: int, gps: int, spg: int, step_bytes: int) -> tuple[int, bool]:
    """Steps of x per staged chunk and whether one chunk holds the split (else two buffers take turns), for
    ``XGROUPS = xgroups``: at most the split's steps, a power of 2 (an arange; the padding past the split is
    filled with zeros) and within :data:`XSTAGE_BYTES` in all; ``(0, False)`` when x is not staged."""
    if not xgroups:
        return 0, False
    cap = XSTAGE_BYTES // step_bytes
    steps = triton.next_power_of_2(min(xgroups, gps) * spg)
    if steps >= gps * spg and steps <= cap:
        return steps, True
    return min(steps, cap // 2), False


def register_tail_ws(tiles: int, split_k: int, tile_elems: int, device: torch.device) -> torch.Tensor:
    """The fp32 slots :func:`_add_other_splits` stores the first ``split_k - 1`` splits' partials in."""
    return torch.empty(tiles * (split_k - 1) * tile_elems, dtype=torch.float32, device=device)


def gluon_mma(x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None, BM: int = 8, num_warps: int = 4,
              T: int = 2, split_k: int = 1, TAIL: bool = True, PREFETCH: int = 0,
              BK: int | None = None, SCALED: bool = False, WM: int = 1, XGROUPS: int = 0,
              PDL: int = 2, XSUM_MMA: bool = False, ZSUB: bool = False, XREADY: bool = False,
              MAXNREG: int = 0, EVICT_FIRST: bool = False, act: str | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` (bf16 or fp16) with ``packed`` from :func:`kernels.awq_repack.repack_awq`; see module doc.

    ``BM``: rows of x per program (8, 16, 32 or 64: the MMA's N); ``TAIL``: split-K partials summed by
    ``reduce_partials``, a second launch (0), by the last program of each tile from memory (1) or in the last
    split's registers (2, :func:`_add_other_splits`); ``PREFETCH``: 1 (or True) load the next step's words
    before this step's MMA (and, under ``PDL = 2``, the first step's before the wait), 2 (``ZSUB``, one or two
    steps a group) the next group's words, zero points and scales before this group's; ``BK``: features per step
    (16, 32 or 64 dividing the group; default ``min(64, group)``: fewer hold less of x in registers at 64 rows);
    ``SCALED``: the weights scaled in the fragments (one accumulator); ``WM``: warps along the rows of x
    (``num_warps`` counts those along the columns);
    ``XGROUPS``: x staged in shared memory this many groups at a time (at most a split's and
    :data:`XSTAGE_BYTES`, in a power of 2 of steps; 0: each step's x tile passes through shared memory on its
    own, two CTA barriers per step); ``PDL``: programmatic dependent launch, 0 off, 1 the next launch released at
    the start, 2 (default) also launched early itself (``launch_pdl``), waiting for the launch before after its
    first weight loads (off where :data:`kernels.awq_triton.PDL` is: ``RAYAWQ_PDL=0``); ``XSUM_MMA`` (unscaled):
    the per-group sum of x by one more ``mma`` per step with an A operand of ones, in the accumulator's layout
    (no shared memory, no CTA barrier per group; one 16-row tile per warp, so ``1 / T`` more ``mma``); ``ZSUB``:
    the zero points taken off in the fragments (exact integers ``q - z`` in bf16) and the scales applied to each
    group's fp32 accumulator: ``SCALED`` without its bf16 multiply per weight, and no sum of x; ``XREADY`` (x staged
    for the whole split): x waited for once before the loop (with ``PREFETCH``, after the first step's weights are
    requested) instead of at the split's first step inside it, where the compiler then also put a CTA barrier in
    every group (it cannot see that the conditional wait has run); ``MAXNREG``: a cap on registers per thread (ptxas ``.maxnreg``; 0: none),
    e.g. 64 to keep four 256-thread programs per SM where ``PREFETCH = 2`` takes 72; ``EVICT_FIRST``: the weights'
    loads marked first to leave L1 and L2 (:func:`_wload`); ``act``: see :func:`kernels.awq_triton.finish_split`."""
    M, K = x2.shape
    N = scales.shape[1]
    check_repackable(K, N)
    check_dtypes("gluon_mma", x2, scales)
    if x2.stride(1) != 1:
        raise ValueError("gluon_mma takes x with unit column stride")
    if N % (16 * num_warps * T) or group_size % 32:
        raise ValueError(f"gluon_mma needs N a multiple of {16 * num_warps * T} and group size 32, 64 or 128")
    BK = BK or min(64, group_size)
    if BK not in (16, 32, 64) or group_size % BK:
        raise ValueError(f"gluon_mma takes BK 16, 32 or 64 dividing the group size {group_size}, got {BK}")
    if WM not in (1, 2, 4) or BM % (8 * WM):
        raise ValueError(f"gluon_mma takes WM 1, 2 or 4 warps along the rows, each of 8 rows or more (BM {BM})")
    if PDL not in (0, 1, 2):
        raise ValueError(f"gluon_mma takes PDL 0 (off), 1 (release the next launch) or 2 (also launched early), "
                         f"got {PDL!r}")
    PDL = PDL if _PDL_ON else 0
    if XSUM_MMA and SCALED:
        raise ValueError("gluon_mma XSUM_MMA (the sum of x by a ones mma) is for the unscaled loop; SCALED has no "
                         "sum of x")
    if ZSUB and (SCALED or XSUM_MMA):
        raise ValueError("gluon_mma ZSUB (zero points off in the fragments, scales per group) is a loop of its own: "
                         "not with SCALED or XSUM_MMA")
    if PREFETCH not in (0, 1, 2):
        raise ValueError(f"gluon_mma takes PREFETCH 0 (off), 1 (the next step's words) or 2 (the next group's, ZSUB), "
                         f"got {PREFETCH!r}")
    if PREFETCH == 2 and not (ZSUB and group_size // BK in (1, 2)):
        raise ValueError("gluon_mma PREFETCH 2 (the next group's words, zero points and scales) is for the ZSUB loop "
                         "with one or two steps a group (BK 64 for group 128)")
    if MAXNREG and not (24 <= MAXNREG <= 255 and MAXNREG % 8 == 0):
        raise ValueError(f"gluon_mma takes MAXNREG 0 (no cap) or a multiple of 8 in 24..255, got {MAXNREG!r}")
    if XGROUPS < 0:
        raise ValueError(f"gluon_mma takes XGROUPS 0 (x not staged) or the groups of x staged at a time, "
                         f"got {XGROUPS}")
    mma, a_l, b_l, w_l, x_l = _layouts(num_warps, BK, T, WM)
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    if BM not in (8, 16, 32, 64):
        raise ValueError(f"gluon_mma takes BM 8, 16, 32 or 64 rows per program, got {BM}")
    grid = (N // (16 * num_warps * T), split_k, triton.cdiv(M, BM))
    check_tail("gluon_mma", TAIL)
    tail = int(TAIL) if split_k > 1 else 0
    if tail == 2:
        ws = register_tail_ws(grid[0] * grid[2], split_k, 16 * num_warps * T * BM, x2.device)
    cnt = tile_counters(x2.device, grid[0] * grid[2]) if tail else y
    xsteps, xonce = staged_steps(XGROUPS, gps, group_size // BK, BM * BK * 2)
    if XREADY and not xonce:
        raise ValueError(f"gluon_mma XREADY (x waited for before the loop) needs the split's x staged at once: "
                         f"XGROUPS >= the split's {gps} groups, within {XSTAGE_BYTES} bytes; got XGROUPS {XGROUPS}")
    _awq_gluon_mma_kernel[grid](
        x2, packed, qzeros, scales, bias if bias is not None else y, y, ws, cnt, M, N, K, x2.stride(0),
        y.stride(0), split_k, gps, GROUP=group_size, BK=BK, BM=BM, W=num_warps, T=T, HAS_BIAS=bias is not None,
        TAIL=tail, PREFETCH=int(PREFETCH), SCALED=bool(SCALED),
        UNROLL=tail_unroll(16 * num_warps * T * BM, 32 * num_warps * WM), mma=mma, a_l=a_l, b_l=b_l, w_l=w_l,
        x_l=x_l, XSTEPS=xsteps, XONCE=xonce,
        xs_l=staged_layout(BK), PDL=PDL, XSUM_MMA=bool(XSUM_MMA), ZSUB=bool(ZSUB), XREADY=bool(XREADY),
        EVICT_FIRST=bool(EVICT_FIRST),
        num_warps=num_warps * WM, launch_pdl=PDL == 2, **({"maxnreg": MAXNREG} if MAXNREG else {}))
    return finish_split(ws, y, bias, split_k > 1 and not tail, act)
