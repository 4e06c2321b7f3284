"""The pipelined register-A ``wgmma`` kernel, warp-specialized: two consumer warpgroups that never wait for each
other, sharing one ring of x tiles (Gluon, Hopper).

Why: :mod:`kernels.awq_gluon_pipelined` with two warpgroups (``W = 8``, 128 features per program) halves the L2
traffic of x against one warpgroup, but its warpgroups meet at a CTA barrier every step before a buffer is refilled.
Here each warpgroup is its own partition (``gl.warp_specialize``): it waits only for its x tiles to land (a "full"
mbarrier per ring slot, completed by TMA) and releases a slot with one arrive on that slot's "empty" mbarrier
(count 2: one per consumer) once its ``wgmma`` on it has retired; consumer 0 refills a slot once both released
it, ``SLACK`` iterations later (a third, loader partition would cap the launch at 168 registers a thread, see
``_CONSUMER_REGS``). A slot holds two steps' tiles, so the waits, releases and refills (each a barrier across the
warpgroup in Gluon) come once per two steps: in the one-warpgroup kernel they were ~12 % of the warps' stall
samples (Nsight Compute, H200, 8192 x 8192 at 256 rows).

Each consumer unpacks its own ``64 T`` features as the one-warpgroup kernel does (words, zero points and scales
loaded a step pair ahead and shared by the two steps of a 128-group; fragments unpacked into two alternating
register variables while the previous ``wgmma`` runs, see :mod:`kernels.awq_gluon_pipelined` for the register
hazard this avoids). A program covers ``128 T`` features by ``BB`` rows; split-K partials are summed by
``reduce_partials``. bf16 only; Gluon has no CPU interpreter, so this runs only on the GPU (``tests/gpu``) and is
compiled for sm_90 on the CPU (``tests/test_gluon_pipelined_build.py``).
"""

from __future__ import annotations

import torch
import triton

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .awq_gluon_mma import _word_offsets
from .awq_gluon_pipelined import _odd_step_operands, _pipelined_layouts, _step_a, _step_operands, _tma_load
from .awq_triton import _out_and_ws, _split_args, reduce_partials

# Registers per thread of the second consumer's partition. Two warpgroups of 8 warps can hold 255 each; a third
# (a loader warp, padded to a warpgroup) would cap the launch at 168, and ptxas then serializes every wgmma
# (C7512) even with ``setmaxnreg`` raising the consumers' count, so consumer 0 issues the refills instead.
_CONSUMER_REGS = 232


@gluon.jit
def _refill(x_desc, x_smem, full, empty, m0, s0, t, ni, BK: gl.constexpr, STAGES: gl.constexpr,
            SLACK: gl.constexpr):
    """Consumer 0, at iteration ``t``: refill the slot iteration ``t - SLACK`` read with iteration
    ``t - SLACK + STAGES`` (two steps: two TMA boxes) once both consumers released it. It waits for consumer 1
    only when that one is ``SLACK`` or more iterations behind."""
    r = t - SLACK
    ok = (r >= 0) & (r + STAGES < ni)
    rs = (t + STAGES - SLACK) % STAGES
    mbarrier.wait(empty.index(rs), (r // STAGES) & 1, pred=ok)
    mbarrier.expect(full.index(rs), 2 * x_desc.block_type.nbytes, pred=ok)
    k = (s0 + 2 * (r + STAGES)) * BK
    _tma_load(x_desc, [m0, k], full.index(rs), x_smem.index(2 * rs), pred=ok)
    _tma_load(x_desc, [m0, k + BK], full.index(rs), x_smem.index(2 * rs + 1), pred=ok)


@gluon.jit
def _consumer(x_desc, x_smem, full, empty, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_ym, SPLIT_K,
              pid_n, pid_k, m0, s0, nst, C: gl.constexpr, GROUP: gl.constexpr, BK: gl.constexpr,
              BB: gl.constexpr, T: gl.constexpr, STAGES: gl.constexpr, SLACK: gl.constexpr,
              HAS_BIAS: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr, w_l: gl.constexpr,
              o_l: gl.constexpr):
    """Consumer ``C`` (0 or 1): features ``(2 pid_n + C) 64 T`` onward, all ``nst`` steps, then its output.

    Iteration ``t`` runs steps ``2 t`` and ``2 t + 1`` on ring slot ``t % STAGES`` (two x tiles): one wait for
    the slot, one release and at most one refill per two steps. Each step unpacks its A fragments (into the
    variable the step before did not use) while the previous step's ``wgmma`` runs, issues its own and waits
    until only it is in flight; the words, zero points and scales of steps ``2 t + 2``, ``2 t + 3`` load
    meanwhile."""
    KH: gl.constexpr = BK // 16
    BF: gl.constexpr = 64 * T
    blk = 2 * pid_n + C
    woff = _word_offsets(blk, K, w_l, 4, T, KH)
    on_a = blk * BF + gl.arange(0, BF, layout=gl.SliceLayout(1, a_l))
    ni = (nst + 1) // 2
    w0, z0, sc0 = _step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, s0 * BK, GROUP, BK)
    w1, z1, sc1 = _odd_step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, (s0 + 1) * BK, z0, sc0, GROUP, BK)
    acc = gl.zeros([BF, BB], gl.float32, layout=acc_l)
    a1 = gl.zeros([BF, BK], gl.bfloat16, layout=a_l)
    for t in range(0, nst // 2):
        slot = t % STAGES
        j = 2 * t
        mbarrier.wait(full.index(slot), (t // STAGES) & 1)
        w2, z2, sc2 = _step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, (s0 + j + 2) * BK, GROUP, BK)
        a0 = _step_a(w0, z0, sc0, on_a, a_l, 4, T, BK)
        acc = warpgroup_mma(a0, x_smem.index(2 * slot).permute((1, 0)), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))
        # step j - 1 retired: the previous iteration's slot is free
        mbarrier.arrive(empty.index((t + STAGES - 1) % STAGES), pred=t >= 1)
        if C == 0:
            _refill(x_desc, x_smem, full, empty, m0, s0, t, ni, BK, STAGES, SLACK)
        w3, z3, sc3 = _odd_step_operands(pw_ptr, qz_ptr, s_ptr, woff, on_a, N, K, (s0 + j + 3) * BK, z2, sc2,
                                         GROUP, BK)
        a1 = _step_a(w1, z1, sc1, on_a, a_l, 4, T, BK)
        acc = warpgroup_mma(a1, x_smem.index(2 * slot + 1).permute((1, 0)), acc, is_async=True)
        acc, a0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0))
        w0, z0, sc0 = w2, z2, sc2
        w1, z1, sc1 = w3, z3, sc3
    if nst % 2 == 1:  # an odd step count (a split of an odd number of groups at BK = GROUP): the last step
        t = nst // 2
        slot = t % STAGES
        mbarrier.wait(full.index(slot), (t // STAGES) & 1)
        a0 = _step_a(w0, z0, sc0, on_a, a_l, 4, T, BK)
        acc = warpgroup_mma(a0, x_smem.index(2 * slot).permute((1, 0)), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    on = blk * BF + gl.arange(0, BF, layout=gl.SliceLayout(1, o_l))
    om = m0 + gl.arange(0, BB, layout=gl.SliceLayout(0, o_l))
    omask = (om < M)[None, :] & (on < N)[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += gl.load(b_ptr + blk * BF + gl.arange(0, BF, layout=gl.SliceLayout(1, acc_l))
                           ).to(gl.float32)[:, None]
        gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], gl.convert_layout(acc.to(gl.bfloat16), o_l),
                 mask=omask)
    else:
        gl.store(ws_ptr + pid_k * M * N + om[None, :] * N + on[:, None], gl.convert_layout(acc, o_l), mask=omask)


@gluon.jit(do_not_specialize=["M"])  # one build serves every row count
def _awq_gluon_ws_kernel(x_desc, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_ym, SPLIT_K,
                         steps_per_split, GROUP: gl.constexpr, BK: gl.constexpr, BB: gl.constexpr, T: gl.constexpr,
                         STAGES: gl.constexpr, SLACK: gl.constexpr, REGS: gl.constexpr, HAS_BIAS: gl.constexpr,
                         acc_l: gl.constexpr, a_l: gl.constexpr, w_l: gl.constexpr, o_l: gl.constexpr):
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    m0 = gl.program_id(2) * BB
    s0 = pid_k * steps_per_split
    nst = gl.minimum(s0 + steps_per_split, K // BK) - s0
    ni = (nst + 1) // 2

    # STAGES slots of two x tiles each (steps 2 t and 2 t + 1), one full and one empty barrier per slot
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2 * STAGES, BB, BK], x_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(STAGES):  # the first STAGES iterations; consumer 0 refills from then on
        mbarrier.expect(full.index(i), 2 * x_desc.block_type.nbytes, pred=i < ni)
        _tma_load(x_desc, [m0, (s0 + 2 * i) * BK], full.index(i), x_smem.index(2 * i), pred=i < ni)
        _tma_load(x_desc, [m0, (s0 + 2 * i + 1) * BK], full.index(i), x_smem.index(2 * i + 1), pred=i < ni)
    # the partitions' argument tuples written out in full: a tuple built with ``+`` loses its constexprs
    gl.warp_specialize([
        (_consumer, (x_desc, x_smem, full, empty, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_ym,
                     SPLIT_K, pid_n, pid_k, m0, s0, nst, 0, GROUP, BK, BB, T, STAGES, SLACK, HAS_BIAS, acc_l, a_l,
                     w_l, o_l)),
        (_consumer, (x_desc, x_smem, full, empty, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_ym,
                     SPLIT_K, pid_n, pid_k, m0, s0, nst, 1, GROUP, BK, BB, T, STAGES, SLACK, HAS_BIAS, acc_l, a_l,
                     w_l, o_l))],
        [4], [REGS])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))


def gluon_ws(x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None, BB: int = 256, T: int = 1,
             STAGES: int = 2, SLACK: int = 1, split_k: int = 1, BK: int | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W`` (bf16) on repacked weights by two warp-specialized consumers (see the module doc).
    ``BB``: rows of x per program (64, 128 or 256); ``T``: 16-feature tiles per warp (a program covers ``128 T``
    features); ``STAGES``: ring slots of two x tiles (two steps) each; ``SLACK``: iterations consumer 1 may fall
    behind before consumer 0 waits for it to refill a slot (1 to ``STAGES - 1``; a refill lands
    ``STAGES - SLACK`` iterations before its use)."""
    from .awq_repack import check_repackable

    M, K = x2.shape
    N = scales.shape[1]
    check_repackable(K, N)
    if x2.dtype != torch.bfloat16:
        raise ValueError("gluon_ws takes bf16 x")
    if BB not in (64, 128, 256) or T not in (1, 2) or STAGES < 2 or not 1 <= SLACK < STAGES:
        raise ValueError(f"gluon_ws takes BB 64/128/256, T 1/2, STAGES >= 2, 1 <= SLACK < STAGES; got BB {BB}, "
                         f"T {T}, STAGES {STAGES}, SLACK {SLACK}")
    if N % (128 * T):
        raise ValueError(f"gluon_ws needs N = {N} a multiple of {128 * T} (128 * T)")
    BK = BK or min(64, group_size)
    if BK not in (16, 32, 64) or group_size % BK:
        raise ValueError(f"gluon_ws takes BK 16, 32 or 64 dividing the group size {group_size}, got {BK}")
    if x2.stride(1) != 1 or (x2.stride(0) * 2) % 16 or x2.data_ptr() % 16:  # TMA: aligned base and row stride
        x2 = x2.clone(memory_format=torch.contiguous_format)
    acc_l, a_l, w_l, o_l = _pipelined_layouts(4, T, BB, BK)
    x_desc = TensorDescriptor.from_tensor(x2, [BB, BK], gl.NVMMASharedLayout.get_default_for([BB, BK], gl.bfloat16))
    split_k, gps = _split_args(K // group_size, split_k)
    y, ws = _out_and_ws(x2, N, out, split_k)
    grid = (N // (128 * T), split_k, triton.cdiv(M, BB))
    _awq_gluon_ws_kernel[grid](
        x_desc, packed, qzeros, scales, bias if bias is not None else y, y, ws, M, N, K, y.stride(0), split_k,
        gps * group_size // BK, GROUP=group_size, BK=BK, BB=BB, T=T, STAGES=STAGES, SLACK=SLACK,
        REGS=_CONSUMER_REGS, HAS_BIAS=bias is not None, acc_l=acc_l, a_l=a_l, w_l=w_l, o_l=o_l, num_warps=4)
    if split_k > 1:
        return reduce_partials(ws, y, bias)
    return y
