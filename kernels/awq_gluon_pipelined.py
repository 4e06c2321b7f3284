"""W4A16 for large batches (prefill) on Hopper: weights as ``wgmma``'s register operand, x pipelined by TMA (Gluon).

Why: above ~128 rows the engine fell back to dequantize + cuBLAS, which writes and re-reads a bf16 copy of every
weight (0.5x of cuBLAS at 256 rows), and the unpipelined :mod:`kernels.awq_gluon_wgmma` stages the dequantized
tile through shared memory every step. Here the product is computed transposed, ``y^T = W x^T``: the weights are
``wgmma``'s A operand, which Hopper takes from registers, and the fragment-repacked words
(:mod:`kernels.awq_repack`) dequantize (three shifts + four ``lop3`` per word, then ``(q - z) * s`` in bf16, as
``SCALED`` in :mod:`kernels.awq_gluon_mma`) straight into that register layout (checked trivial at compile time).
x is the B operand: ``[BB, BK]`` tiles of x loaded by TMA into a ring of ``STAGES`` shared-memory buffers
(mbarrier per buffer) and read K-major by ``wgmma``. Each step's ``wgmma`` runs asynchronously while the next
step's words are unpacked (into other registers: two steps per loop iteration); the words, zero points and
scales of step ``i + 2`` are loaded at step ``i`` (registers), so neither DRAM latency nor the dequantization sits
on the MMA's path.

One program: ``16 * W * T`` output features (``W`` warps, 4 or 8: one or two warpgroups, each warp its own
16-feature tiles, ``T`` per warp) by ``BB`` rows of x (``wgmma``'s N, up to 256); split-K partials are summed by
``reduce_partials`` or by each tile's last program (``TAIL``). The output tile goes through shared memory so each
thread stores 16 contiguous bytes. bf16 or fp16 x (fp16: the words unpack to ``1024 + q``); tested on the GPU
(``tests/gpu``; Gluon has no CPU interpreter) and compiled for sm_90 on the CPU.
"""

from __future__ import annotations

import functools

import torch
import triton

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # griddepcontrol (sm_90)

from .awq_gluon_mma import (_add_other_splits, _cta_barrier, _fragments, _layouts, _sum_in_last_split, _word_offset,
                            _word_offsets, _zeros, GL_DTYPES, check_dtypes, check_tail, nvmma_shared, register_tail_ws)
from .awq_repack import check_repackable
from .awq_triton import PDL, _out_and_ws, _split_args, finish_split, tile_counters
from .dispatch import num_sms

# the TMA load (Triton 3.6 names it ``async_copy_global_to_shared``, later releases ``async_load``)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
# a shared buffer viewed as another dtype and shape (Triton 3.6 names it ``_reinterpret``, later releases
# ``reinterpret``)
_REINTERPRET_PUBLIC = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))


@gluon.jit
def _step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, k0, GROUP: gl.constexpr, BK: gl.constexpr):
    """Words, packed zero-point words and scales of the step at input feature ``k0`` (clamped to the last step, so
    the prefetch past a split's end reads valid memory), all as loaded: what turns them into operands runs at the
    step that uses them (:func:`_step_a`). Unpacked here, next to their load, the zero points' shift held ~23 % of
    the warps' stall samples (Nsight Compute, H200); moving it changed no timing, but keeps each load a full step
    pair ahead of its first use."""
    k0 = gl.minimum(k0, K - BK)
    w = gl.load(pw_ptr + woff + _word_offset(k0, BK))
    g = k0 // GROUP
    return w, gl.load(qz_ptr + g * (N // 8) + on_a // 8), gl.load(s_ptr + g * N + on_a)


@gluon.jit
def _odd_step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, k0, zw, s, GROUP: gl.constexpr, BK: gl.constexpr):
    """:func:`_step_operands` for an odd step (splits hold whole groups, so even steps start a group): at
    ``GROUP = 2 BK`` it shares the even step's zero points and scales ``zw``, ``s`` and loads only its words."""
    if GROUP == 2 * BK:
        return gl.load(pw_ptr + woff + _word_offset(gl.minimum(k0, K - BK), BK)), zw, s
    else:
        return _step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, k0, GROUP, BK)


@gluon.jit
def _step_a(w, zw, s, on_a, a_l: gl.constexpr, W: gl.constexpr, T: gl.constexpr, BK: gl.constexpr):
    """The A operand of a step from :func:`_step_operands`' loads: ``((OFF + q) - (OFF + z)) * s`` in the scales'
    dtype (bf16 or fp16)."""
    return (_fragments(w, a_l, W, T, BK, s.dtype) - _zeros(zw, on_a, s.dtype)[:, None]) * s[:, None]


@gluon.jit
def _load_x(x_desc, x_smem, bars, m0, s0, u, ok, BK: gl.constexpr, NB: gl.constexpr, PAIR: gl.constexpr):
    """Fill ring slot ``u % NB`` with x's step ``u`` (``PAIR``: steps ``2u``, ``2u + 1``, both boxes on the
    slot's one barrier) if ``ok``."""
    slot = u % NB
    if PAIR:
        mbarrier.expect(bars.index(slot), 2 * x_desc.block_type.nbytes, pred=ok)
        _tma_load(x_desc, [m0, (s0 + 2 * u) * BK], bars.index(slot), x_smem.index(2 * slot), pred=ok)
        _tma_load(x_desc, [m0, (s0 + 2 * u + 1) * BK], bars.index(slot), x_smem.index(2 * slot + 1), pred=ok)
    else:
        mbarrier.expect(bars.index(slot), x_desc.block_type.nbytes, pred=ok)
        _tma_load(x_desc, [m0, (s0 + u) * BK], bars.index(slot), x_smem.index(slot), pred=ok)


@gluon.jit
def _advance(acc, a_prev, a, x_desc, x_smem, bars, m0, s0, i, nu, BK: gl.constexpr, STAGES: gl.constexpr,
             W: gl.constexpr, DEPTH: gl.constexpr, PAIR: gl.constexpr, SECOND: gl.constexpr):
    """Step ``i`` on A fragments ``a``; ``a_prev`` are step ``i - 1``'s (passed to the wait as its dependency;
    what keeps their registers from being rewritten early is the two-variable loop in the caller).

    ``DEPTH = 0``: wait for step ``i - 1``'s wgmma, refill its x buffer with step ``i - 1 + STAGES``, issue step
    ``i``'s. ``DEPTH = 1``: issue step ``i``'s first, then wait until only it is in flight (the tensor cores always
    have the next wgmma queued), then refill.

    ``PAIR``: the ring's slots are pairs of buffers, steps ``2u`` and ``2u + 1`` (``SECOND``: this is the pair's
    second step, which neither waits for a barrier nor refills). Why: the barrier wait and the refill (warpgroup
    barriers, elect, TMA issue; with two warpgroups a CTA barrier) were ~40 % of a step's instructions that are
    not unpacking (Nsight Compute, H200); paired, once per 128 features."""
    NB: gl.constexpr = STAGES // 2 if PAIR else STAGES
    SYNC: gl.constexpr = not (PAIR and SECOND)
    u = i // 2 if PAIR else i  # the slot's use: a pair of steps or one step
    buf = 2 * (u % NB) + SECOND if PAIR else u % NB
    if DEPTH == 0:
        acc, a_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_prev))
    else:
        if SYNC:
            mbarrier.wait(bars.index(u % NB), (u // NB) & 1)
        acc = warpgroup_mma(a, x_smem.index(buf).permute((1, 0)), acc, is_async=True)
        acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
    if SYNC:
        if W > 4:
            _cta_barrier()  # both warpgroups are done with the buffer the next load overwrites
        nxt = u - 1 + NB
        _load_x(x_desc, x_smem, bars, m0, s0, nxt, (u >= 1) & (nxt < nu), BK, NB, PAIR)
    if DEPTH == 0:
        if SYNC:
            mbarrier.wait(bars.index(u % NB), (u // NB) & 1)
        acc = warpgroup_mma(a, x_smem.index(buf).permute((1, 0)), acc, is_async=True)
    return acc


@gluon.jit
def _k_loop(x_desc, x_smem, bars, pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, m0, s0, nst, GROUP: gl.constexpr,
            BK: gl.constexpr, BB: gl.constexpr, W: gl.constexpr, T: gl.constexpr, STAGES: gl.constexpr,
            DEPTH: gl.constexpr, PAIR: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr):
    """The ``[BF, BB]`` fp32 product of ``nst`` steps from step ``s0`` (features of ``woff``/``on_a``, rows from
    ``m0``): x's ring ``x_smem`` filled by TMA (barriers ``bars``), the words unpacked into ``wgmma``'s A operand
    two steps ahead. Left with the ring drained and its barriers invalidated."""
    BF: gl.constexpr = 16 * W * T
    # PAIR: the STAGES buffers hold STAGES / 2 pairs of steps, a barrier per pair (steps come in pairs: GROUP = 2 BK)
    NBARS: gl.constexpr = STAGES // 2 if PAIR else STAGES
    nu = nst // 2 if PAIR else nst  # the ring's uses: pairs of steps or steps
    for i in gl.static_range(NBARS):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(NBARS):
        _load_x(x_desc, x_smem, bars, m0, s0, i, i < nu, BK, NBARS, PAIR)

    w0, z0, sc0 = _step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, s0 * BK, GROUP, BK)
    w1, z1, sc1 = _odd_step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, (s0 + 1) * BK, z0, sc0, GROUP, BK)
    acc = gl.zeros([BF, BB], gl.float32, layout=acc_l)
    if DEPTH == 0:
        acc = warpgroup_mma_init(acc)
    # Two steps per iteration, their A operands in two variables: a wgmma reads its register operand while it
    # runs, so the next step's fragments must go to other registers (ptxas does not guard this: one variable
    # rewritten at the top of a loop gave wrong sums). Each step unpacks its fragments while the previous
    # step's wgmma runs, then waits for it and issues its own.
    a1 = gl.zeros([BF, BK], s_ptr.dtype.element_ty, layout=a_l)
    for j in range(0, nst - 1, 2):
        # operands of steps j + 2, j + 3 in flight while steps j, j + 1 compute
        w2, z2, sc2 = _step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, (s0 + j + 2) * BK, GROUP, BK)
        a0 = _step_a(w0, z0, sc0, on_a, a_l, W, T, BK)
        acc = _advance(acc, a1, a0, x_desc, x_smem, bars, m0, s0, j, nu, BK, STAGES, W, DEPTH, PAIR, False)
        w3, z3, sc3 = _odd_step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, (s0 + j + 3) * BK, z2, sc2, GROUP,
                                         BK)
        a1 = _step_a(w1, z1, sc1, on_a, a_l, W, T, BK)
        acc = _advance(acc, a0, a1, x_desc, x_smem, bars, m0, s0, j + 1, nu, BK, STAGES, W, DEPTH, PAIR, True)
        w0, z0, sc0 = w2, z2, sc2
        w1, z1, sc1 = w3, z3, sc3
    if not PAIR:  # (PAIR: the step count is even)
        if nst % 2 == 1:  # an odd step count (a split of an odd number of groups at BK = GROUP): the last step
            a0 = _step_a(w0, z0, sc0, on_a, a_l, W, T, BK)
            acc = _advance(acc, a1, a0, x_desc, x_smem, bars, m0, s0, nst - 1, nu, BK, STAGES, W, DEPTH, False,
                           False)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for i in gl.static_range(NBARS):
        mbarrier.invalidate(bars.index(i))
    return acc


@gluon.jit(do_not_specialize=["M"])  # one build serves every row count (no compile on a request)
def _awq_gluon_pipelined_kernel(x_desc, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_ym,
                                SPLIT_K, steps_per_split, FULL, GROUP: gl.constexpr, BK: gl.constexpr,
                                BB: gl.constexpr, W: gl.constexpr, T: gl.constexpr, STAGES: gl.constexpr,
                                DEPTH: gl.constexpr, HAS_BIAS: gl.constexpr, TAIL: gl.constexpr,
                                LAST_WAVE: gl.constexpr, PAIR: gl.constexpr, UNEVEN: gl.constexpr, acc_l: gl.constexpr,
                                a_l: gl.constexpr, w_l: gl.constexpr, o_l: gl.constexpr,
                                AFTER_TAIL: gl.constexpr):
    KH: gl.constexpr = BK // 16
    BF: gl.constexpr = 16 * W * T
    if LAST_WAVE:  # a 1-D grid: FULL whole tiles, then SPLIT_K programs for each tile left (see gluon_pipelined)
        pid_n, pid_k, pid_m, n_split, tile, steps_per_split = _last_wave_program(N, K, SPLIT_K, steps_per_split,
                                                                                 FULL, BK, BF)
    else:
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        pid_m = gl.program_id(2)
    woff = _word_offsets(pid_n, K, w_l, W, T, KH)
    on_a = pid_n * BF + gl.arange(0, BF, layout=gl.SliceLayout(1, a_l))
    m0 = pid_m * BB
    s0 = pid_k * steps_per_split
    nst = gl.minimum(s0 + steps_per_split, K // BK) - s0
    if UNEVEN:  # (``LEAD``) the last split takes the steps left, more than the others (see gluon_pipelined)
        if LAST_WAVE:
            nst = gl.where(pid_k == n_split - 1, K // BK - s0, nst)
        else:
            nst = gl.where(pid_k == SPLIT_K - 1, K // BK - s0, nst)

    x_smem = gl.allocate_shared_memory(y_ptr.dtype.element_ty, [STAGES, BB, BK], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    acc = _k_loop(x_desc, x_smem, bars, pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, m0, s0, nst, GROUP, BK, BB, W, T,
                  STAGES, DEPTH, PAIR, acc_l, a_l)

    # (SPLIT_K is read as itself, not through a variable: a launch without split-K specializes it to the constant
    # 1, and an epilogue choosing on a variable holding it crashed Triton 3.6's LLVM lowering)
    if LAST_WAVE:  # whole tiles store, split ones sum in their last split's registers
        if n_split == 1:
            _store_tile(acc, y_ptr, b_ptr, pid_n, m0, M, N, stride_ym, BF, BB, HAS_BIAS, acc_l, o_l)
        else:
            _sum_splits_and_store(acc, ws_ptr, cnt_ptr, tile, pid_k, n_split, y_ptr, b_ptr, pid_n, m0, M, N,
                                  stride_ym, BF, BB, HAS_BIAS, acc_l, o_l)
    elif SPLIT_K == 1:
        _store_tile(acc, y_ptr, b_ptr, pid_n, m0, M, N, stride_ym, BF, BB, HAS_BIAS, acc_l, o_l)
    elif TAIL == 2:
        _sum_splits_and_store(acc, ws_ptr, cnt_ptr, pid_m * gl.num_programs(0) + pid_n, pid_k, SPLIT_K, y_ptr, b_ptr,
                              pid_n, m0, M, N, stride_ym, BF, BB, HAS_BIAS, acc_l, o_l)
    else:
        on = pid_n * BF + gl.arange(0, BF, layout=gl.SliceLayout(1, o_l))
        om = m0 + gl.arange(0, BB, layout=gl.SliceLayout(0, o_l))
        omask = (om < M)[None, :] & (on < N)[:, None]
        ws_offs = om[None, :] * N + on[:, None]
        gl.store(ws_ptr + pid_k * M * N + ws_offs, gl.convert_layout(acc, o_l), mask=omask)
        if TAIL:
            _sum_in_last_split(gl.zeros([BF, BB], gl.float32, layout=o_l), ws_ptr, ws_offs, omask,
                               y_ptr + om[None, :] * stride_ym + on[:, None], b_ptr + on, cnt_ptr,
                               pid_m * gl.num_programs(0) + pid_n, M, N, SPLIT_K, HAS_BIAS)
    if AFTER_TAIL:  # launched early beside _awq_tail_ws_kernel: end after it, so whoever reads y waits for both
        gdc_wait()


@gluon.jit
def _last_wave_program(N, K, SPLIT_K, steps_per_split, FULL, BK: gl.constexpr, BF: gl.constexpr):
    """Program ``i`` of a last-wave split grid: below ``FULL`` a whole tile (tiles in row-block-major order, as the
    3-D grid runs them), above it split ``k`` of tile ``FULL + j`` (each tile's splits consecutive, its last split
    last). Returns the feature and row blocks, the split and split count, the index of the tile's counter and
    slots (split tiles only) and the steps of one split."""
    pid = gl.program_id(0)
    split = pid >= FULL
    rest = gl.maximum(pid - FULL, 0)
    t = gl.where(split, FULL + rest // SPLIT_K, pid)
    NT = N // BF
    return (t % NT, gl.where(split, rest % SPLIT_K, 0), t // NT, gl.where(split, SPLIT_K, 1), t - FULL,
            gl.where(split, steps_per_split, K // BK))


@gluon.jit
def _sum_splits_and_store(acc, ws_ptr, cnt_ptr, tile, pid_k, n_split, y_ptr, b_ptr, pid_n, m0, M, N, stride_ym,
                          BF: gl.constexpr, BB: gl.constexpr, HAS_BIAS: gl.constexpr, acc_l: gl.constexpr,
                          o_l: gl.constexpr):
    """``TAIL = 2``: the splits' partials summed in the last split's registers, which stores the tile."""
    acc = _add_other_splits(acc, ws_ptr, cnt_ptr, tile, pid_k, n_split, M - m0, BF, BB, acc_l, 1, False)
    if pid_k == n_split - 1:
        _store_tile(acc, y_ptr, b_ptr, pid_n, m0, M, N, stride_ym, BF, BB, HAS_BIAS, acc_l, o_l)


@gluon.jit
def _store_tile(acc, y_ptr, b_ptr, pid_n, m0, M, N, stride_ym, BF: gl.constexpr, BB: gl.constexpr,
                HAS_BIAS: gl.constexpr, acc_l: gl.constexpr, o_l: gl.constexpr):
    """features [BF] x rows [BB] -> y[rows, features] (+ bias), in y's dtype: through shared memory into a layout
    where each thread holds eight consecutive features of one row (16-byte stores)."""
    if HAS_BIAS:
        acc += gl.load(b_ptr + pid_n * BF + gl.arange(0, BF, layout=gl.SliceLayout(1, acc_l))).to(gl.float32)[:, None]
    on = pid_n * BF + gl.arange(0, BF, layout=gl.SliceLayout(1, o_l))
    om = m0 + gl.arange(0, BB, layout=gl.SliceLayout(0, o_l))
    y = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), o_l)
    gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], y, mask=(om < M)[None, :] & (on < N)[:, None])


@gluon.jit
def _tail_half(x_desc, x_smem, bars, pw_ptr, qz_ptr, s_ptr, N, K, first, tile0, HALF: gl.constexpr,
               GROUP: gl.constexpr, BK: gl.constexpr, BB: gl.constexpr, W: gl.constexpr, T: gl.constexpr,
               STAGES: gl.constexpr, DEPTH: gl.constexpr, PAIR: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr,
               w_l: gl.constexpr):
    """The partial of half ``HALF`` (steps ``[0, first)`` or ``[first, K / BK)``) of tail tile ``tile0 +
    program``: one warpgroup's :func:`_k_loop` on its own ring (a 1-tuple: what ``warp_specialize`` takes back
    from its default partition)."""
    BF: gl.constexpr = 16 * W * T
    t = tile0 + gl.program_id(0)
    pid_n = t % (N // BF)
    woff = _word_offsets(pid_n, K, w_l, W, T, BK // 16)
    on_a = pid_n * BF + gl.arange(0, BF, layout=gl.SliceLayout(1, a_l))
    nst = first if HALF == 0 else K // BK - first
    return (_k_loop(x_desc, x_smem, bars, pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, (t // (N // BF)) * BB,
                    HALF * first, nst, GROUP, BK, BB, W, T, STAGES, DEPTH, PAIR, acc_l, a_l), )


@gluon.jit
def _as_partial(ring, BF: gl.constexpr, BB: gl.constexpr, part_l: gl.constexpr):
    """The drained x ring ``ring`` viewed as the ``[BF, BB]`` fp32 partial of :func:`_tail_second_half`."""
    if _REINTERPRET_PUBLIC:
        return ring.reinterpret(gl.float32, [BF, BB], part_l)
    else:
        return ring._reinterpret(gl.float32, [BF, BB], part_l)


@gluon.jit
def _tail_second_half(x_desc, x_smem, bars, done, pw_ptr, qz_ptr, s_ptr, N, K, first, tile0, GROUP: gl.constexpr,
                      BK: gl.constexpr, BB: gl.constexpr, W: gl.constexpr, T: gl.constexpr, STAGES: gl.constexpr,
                      DEPTH: gl.constexpr, PAIR: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr,
                      w_l: gl.constexpr, part_l: gl.constexpr):
    """The worker warpgroup of :func:`_awq_tail_ws_kernel`: the second half's partial, left as fp32 in its own
    drained ring (``part_l``, :func:`_partial_layout`), then ``done``."""
    acc = _tail_half(x_desc, x_smem, bars, pw_ptr, qz_ptr, s_ptr, N, K, first, tile0, 1, GROUP, BK, BB, W, T, STAGES,
                     DEPTH, PAIR, acc_l, a_l, w_l)[0]
    _as_partial(x_smem, 16 * W * T, BB, part_l).store(acc)
    mbarrier.arrive(done, count=1)


@gluon.jit(do_not_specialize=["M"])
def _awq_tail_ws_kernel(x_desc, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_ym, first, tile0,
                        GROUP: gl.constexpr, BK: gl.constexpr, BB: gl.constexpr, W: gl.constexpr, T: gl.constexpr,
                        STAGES: gl.constexpr, DEPTH: gl.constexpr, HAS_BIAS: gl.constexpr, PAIR: gl.constexpr,
                        WORKER_REGS: gl.constexpr, PDL: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr,
                        w_l: gl.constexpr, o_l: gl.constexpr, part_l: gl.constexpr):
    """The tiles of a partly filled last wave, each split along K inside one CTA (``WS_TAIL``): two warpgroups,
    each with its own x ring, run the two halves side by side (the second as a warp-specialized worker), and the
    second's partial reaches the first through shared memory instead of L2. Why: split across programs, the last
    wave's sum cost 4-5 us to read back and 2-3 to write at 255 registers a thread (docs/kernels_notes.md).
    ``PDL``: the whole tiles' launch may start at once, on the SMs this grid leaves free."""
    if PDL:
        gdc_launch_dependents()
    BF: gl.constexpr = 16 * W * T
    x0 = gl.allocate_shared_memory(y_ptr.dtype.element_ty, [STAGES, BB, BK], x_desc.layout)
    x1 = gl.allocate_shared_memory(y_ptr.dtype.element_ty, [STAGES, BB, BK], x_desc.layout)
    bars0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    bars1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(done.index(0), count=1)
    acc, = gl.warp_specialize([
        (_tail_half, (x_desc, x0, bars0, pw_ptr, qz_ptr, s_ptr, N, K, first, tile0, 0, GROUP, BK, BB, W, T, STAGES,
                      DEPTH, PAIR, acc_l, a_l, w_l)),
        (_tail_second_half, (x_desc, x1, bars1, done.index(0), pw_ptr, qz_ptr, s_ptr, N, K, first, tile0, GROUP, BK,
                             BB, W, T, STAGES, DEPTH, PAIR, acc_l, a_l, w_l, part_l)),
    ], [W], [WORKER_REGS])
    mbarrier.wait(done.index(0), 0)
    acc += _as_partial(x1, BF, BB, part_l).load(acc_l)
    mbarrier.invalidate(done.index(0))
    t = tile0 + gl.program_id(0)
    _store_tile(acc, y_ptr, b_ptr, t % (N // BF), (t // (N // BF)) * BB, M, N, stride_ym, BF, BB, HAS_BIAS, acc_l,
                o_l)


# registers a thread of the worker warpgroup of _awq_tail_ws_kernel (the first half's warpgroup takes 256: the
# CTA's two warpgroups then hold 62.5K of an SM's 64K, and the sum needs the accumulator and the partial at once)
WS_WORKER_REGS = 232


@functools.cache
def _partial_layout(BF: int, BB: int):
    """Shared layout of the fp32 partial the worker warpgroup hands over: 128-byte rows with their 16-byte units
    swizzled by row, so a warp's 8-byte stores and loads in the accumulator layout (8 rows x 4 threads) take the
    two wavefronts 256 bytes need (row-major, all 8 rows would fall on the same 8 banks)."""
    return nvmma_shared((BF, BB), gl.float32)


def _check_ws_tail(W: int, STAGES: int, BB: int, BK: int, BF: int, SLOTS: int, split_k: int) -> None:
    """What ``WS_TAIL`` needs, before a launch."""
    if not SLOTS or split_k != 1:
        raise ValueError(f"gluon_pipelined WS_TAIL splits the tiles of a partly filled last wave: it needs SLOTS "
                         f"(1 or 2) and split_k 1, got SLOTS {SLOTS}, split_k {split_k}")
    if W != 4:
        raise ValueError(f"gluon_pipelined WS_TAIL takes one warpgroup a half (W 4), got W {W}")
    if STAGES * BB * BK * 2 < BF * BB * 4:
        raise ValueError(f"gluon_pipelined WS_TAIL hands the partial over in the worker's x ring: STAGES {STAGES} "
                         f"x {BB} x {BK} bf16 is smaller than the {BF} x {BB} fp32 partial; take more STAGES")


def _launch_ws_tail(x_desc, packed, qzeros, scales, bias, x2, N, out, n_tiles, tile0, group_size, BK, BB, W, T,
                    STAGES, DEPTH, PAIR, LEAD, acc_l, a_l, w_l, o_l) -> torch.Tensor:
    """``WS_TAIL``: tiles ``tile0 ..`` (row-block-major) by :func:`_awq_tail_ws_kernel`, one CTA each; returns
    ``y`` (allocated here unless ``out``), whose other tiles the caller's launch fills."""
    M, K = x2.shape
    BF = 16 * W * T
    groups = K // group_size
    y, _ = _out_and_ws(x2, N, out, 1)
    first = (groups - max(1, (groups - LEAD) // 2)) * group_size // BK  # the first half's steps: LEAD groups more
    _awq_tail_ws_kernel[(n_tiles, )](
        x_desc, packed, qzeros, scales, bias if bias is not None else y, y, M, N, K, y.stride(0), first, tile0,
        GROUP=group_size, BK=BK, BB=BB, W=W, T=T, STAGES=STAGES, DEPTH=DEPTH, HAS_BIAS=bias is not None,
        PAIR=bool(PAIR), WORKER_REGS=WS_WORKER_REGS, PDL=PDL, acc_l=acc_l, a_l=a_l, w_l=w_l, o_l=o_l,
        part_l=_partial_layout(BF, BB), num_warps=W)
    return y


@functools.cache
def _pipelined_layouts(W: int, T: int, BB: int, BK: int):
    """The accumulator (``wgmma`` over ``W`` warps along the features), the register A operand, the words' load
    layout (as :func:`kernels.awq_gluon_mma._layouts`) and the output store layout."""
    _, _, _, w_l, _ = _layouts(W, BK, T)
    acc_l = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, BB, 16])
    a_l = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    BF = 16 * W * T
    tf = min(32, BF // 8)
    o_l = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[tf, 32 // tf], warps_per_cta=[1, W],
                           order=[0, 1])
    return acc_l, a_l, w_l, o_l


def pairs_fit(group_size: int, BK: int, STAGES: int) -> bool:
    """Whether ``PAIR`` can run: steps come in pairs (``BK`` half the group, splits hold whole groups) and the
    ring holds two pairs or more."""
    return group_size == 2 * BK and STAGES % 2 == 0 and STAGES >= 4


def _lead_groups(groups: int, split: int, gps: int, lead: int) -> int:
    """Groups of each split but the last, which takes the rest: ``lead`` groups more than the others or, where
    they do not divide evenly, one more (``LEAD``); every split keeps one group or more."""
    if lead <= 0:
        return gps
    return max(1, min(gps, (groups - lead) // split))


def _last_wave_split(tiles: int, groups: int, slots: int) -> tuple[int, int]:
    """(whole tiles, splits of each tile left): the tiles of a partly filled last wave split into as many parts as
    the free slots allow (at least 2, at most one group each), or all tiles whole (also when all tiles fit one wave:
    splitting every tile is what a ``split_k`` config does)."""
    rest = tiles % slots
    if rest == 0 or tiles < slots:
        return tiles, 1
    split = min(slots // rest, groups)
    return (tiles - rest, split) if split > 1 else (tiles, 1)


def gluon_pipelined(x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                    BB: int = 128, W: int = 4, T: int = 2, STAGES: int = 3, split_k: int = 1,
                    BK: int | None = None, DEPTH: int = 0, TAIL: int = 0, SLOTS: int = 0, PAIR: bool = False,
                    LEAD: int = 0, WS_TAIL: bool = False, sms: int | None = None,
                    act: str | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` (bf16 or fp16) on repacked weights; see the module doc. ``BB``: rows of x per program (64, 128
    or 256: ``wgmma``'s N); ``W``: warps (4 or 8); ``T``: 16-feature tiles per warp; ``STAGES``: x buffers;
    ``BK``: input features per step (16, 32 or 64 dividing the group size; default ``min(64, group)``);
    ``DEPTH``: wgmmas left in flight when a step waits (0 or 1, see ``_advance``); ``TAIL``: split-K partials
    summed by ``reduce_partials``, a second launch (0), by each tile's last program from memory (1) or from its
    registers, the others' partials stored in their register layout (2, :func:`awq_gluon_mma._add_other_splits`).

    ``SLOTS`` (with ``split_k = 1``): programs of this config one SM holds (1 or 2; 0: off). The tiles that would
    run as a partly filled last wave are split along K instead (as many splits as that wave has free slots for,
    summed as ``TAIL = 2``): 448 tiles on 132 SMs are four waves of work, 396 whole tiles and 52 tiles split in
    two are three and a half. ``PAIR``: x's buffers filled and waited for two steps at a time (``STAGES`` even,
    4 or more, and ``BK`` half the group: see :func:`_advance`). ``LEAD`` (with ``SLOTS`` or ``TAIL = 2``): a
    tile's last split takes this many groups more than the others (or one more where they do not divide), so
    their partials are stored by the time its loop ends instead of after it (in H200 probes under sustained load
    0.4-0.7 % faster at 4096x14336, 1024 rows). ``WS_TAIL`` (with ``SLOTS``, one warpgroup): the tiles of that
    last wave run instead as one CTA each, launched first, whose two warpgroups take the two K halves side by side
    and sum through shared memory (:func:`_awq_tail_ws_kernel`; ``LEAD``: the first half's extra groups); the whole
    tiles follow in a second launch (under programmatic dependent launch, started at once on the SMs left free:
    it reads only x, ready before the first launch started, and ends after it). ``sms``: the SM count that
    arithmetic assumes (default: the GPU's; tests set it)."""
    M, K = x2.shape
    N = scales.shape[1]
    check_repackable(K, N)
    check_dtypes("gluon_pipelined", x2, scales)
    if BB not in (64, 128, 256) or W not in (4, 8) or T not in (1, 2, 4) or STAGES < 2 or DEPTH not in (0, 1):
        raise ValueError(f"gluon_pipelined takes BB 64/128/256, W 4/8, T 1/2/4, STAGES >= 2, DEPTH 0/1; got "
                         f"{BB}, {W}, {T}, {STAGES}, {DEPTH}")
    BF = 16 * W * T
    if N % BF:
        raise ValueError(f"gluon_pipelined needs N = {N} a multiple of {BF} (16 * W * T)")
    BK = BK or min(64, group_size)
    if BK not in (16, 32, 64) or group_size % BK:
        raise ValueError(f"gluon_pipelined takes BK 16, 32 or 64 dividing the group size {group_size}, got {BK}")
    if PAIR and not pairs_fit(group_size, BK, STAGES):
        raise ValueError(f"gluon_pipelined PAIR needs BK half the group size (group {group_size}, BK {BK}) and an "
                         f"even STAGES of 4 or more (got {STAGES}): the buffers are filled two steps at a time")
    if WS_TAIL:
        _check_ws_tail(W, STAGES, BB, BK, BF, SLOTS, split_k)
    # TMA: 16-byte aligned base and row stride, unit column stride
    if x2.stride(1) != 1 or (x2.stride(0) * 2) % 16 or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # a fresh allocation: aligned, rows K apart
    acc_l, a_l, w_l, o_l = _pipelined_layouts(W, T, BB, BK)
    x_desc = TensorDescriptor.from_tensor(x2, [BB, BK], nvmma_shared((BB, BK), GL_DTYPES[x2.dtype]))
    check_tail("gluon_pipelined", TAIL)
    tiles = N // BF * triton.cdiv(M, BB)
    full, last_split = _last_wave_split(tiles, K // group_size, SLOTS * (sms or num_sms(x2.device))) \
        if SLOTS and split_k == 1 else (tiles, 1)
    ws_tail = WS_TAIL and last_split > 1
    if ws_tail:  # the split tiles first, one CTA each; then the whole tiles alone on the last-wave grid
        y = _launch_ws_tail(x_desc, packed, qzeros, scales, bias, x2, N, out, tiles - full, full, group_size, BK,
                            BB, W, T, STAGES, DEPTH, PAIR, LEAD, acc_l, a_l, w_l, o_l)
        grid, split_k, gps, tail = (full, 1, 1), 2, 1, 2  # (no program past FULL: nothing split runs here)
        ws, cnt = register_tail_ws(0, split_k, BF * BB, x2.device), tile_counters(x2.device, 0)  # (the build's types)
    elif last_split > 1:  # (_split_args keeps 2 or more splits here: last_split <= groups)
        split_k, gps = _split_args(K // group_size, last_split)
        grid = (full + (tiles - full) * split_k, 1, 1)
        tail, ctr_tiles = 2, tiles - full
    else:
        split_k, gps = _split_args(K // group_size, split_k)
        grid = (N // BF, split_k, triton.cdiv(M, BB))
        tail, ctr_tiles = (TAIL if split_k > 1 else 0), tiles
    if not ws_tail:
        if tail == 2:  # (LEAD: the last split takes the rest; the other sums expect even splits)
            gps = _lead_groups(K // group_size, split_k, gps, LEAD)
        y, ws = _out_and_ws(x2, N, out, split_k if tail != 2 else 1)
        if tail == 2:
            ws = register_tail_ws(ctr_tiles, split_k, BF * BB, x2.device)
        cnt = tile_counters(x2.device, ctr_tiles) if tail else y
    _awq_gluon_pipelined_kernel[grid](
        x_desc, packed, qzeros, scales, bias if bias is not None else y, y, ws, cnt, M, N, K, y.stride(0), split_k,
        gps * group_size // BK, full, GROUP=group_size, BK=BK, BB=BB, W=W, T=T, STAGES=STAGES, DEPTH=DEPTH,
        HAS_BIAS=bias is not None, TAIL=tail, LAST_WAVE=last_split > 1, PAIR=bool(PAIR),
        UNEVEN=tail == 2 and LEAD > 0, acc_l=acc_l, a_l=a_l, w_l=w_l, o_l=o_l,
        AFTER_TAIL=ws_tail and PDL, num_warps=W, launch_pdl=ws_tail and PDL)
    return finish_split(ws, y, bias, split_k > 1 and not tail, act)
