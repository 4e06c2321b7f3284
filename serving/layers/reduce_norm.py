"""A row-parallel linear's output finished in one kernel: its split-K partials summed, the ranks' sums added
(read over NVLink from symmetric memory), the residual added and RMSNorm applied.

Why: at decode, each decoder layer's ``o_proj`` and ``down_proj`` were followed by up to three small launches
(the W4A16 kernel's split-K sum, the all-reduce, the norm), each mostly latency: on two H200s the 64 all-reduces
of a batch-1 step cost 462 us of its 1.95 ms. Here they are one launch. The engine takes it with several ranks
only: on one GPU the split-K sum and the norm, both launched early, overlap and measured faster together (2.5-3.6
against 3.4-4.7 us a call on an H200; ``benchmarks/tp_reduce_norm.py``), since this kernel's row tail cannot.

A program owns ``BLOCK_N`` columns of one row. With several ranks it writes its sum into this rank's symmetric
buffer, signals the same program on every peer, waits for theirs, and adds all ranks' columns in rank order (so
every rank holds the same bits). The norm needs the whole row: each program leaves its sum of squares, and the
last program of the row to finish (an atomic ticket) normalises it.

Between ranks, the flags are per-program counters (``epoch``) in the symmetric buffer; they only grow, so they
need no reset. The data goes through one of two slots, named by the caller: the norms after attention take slot
0 and those after the MLP slot 1, so consecutive launches alternate whatever their shapes. A rank that runs one
launch ahead writes the other slot; to write this slot again it must finish the next launch, whose flags the slow
rank only raises after this launch has ended there (stream order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .triton_utils import HAS_TRITON, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.pdl import PDL_LAUNCH, pdl_enter

    @triton.jit
    def _reduce_add_norm_kernel(P, stride_ps, stride_pm, SPLIT, R, stride_r, W, Y, stride_y, SUMSQ, TICKET,
                                PEERS, EPOCH, FLAG_OFF, SLOT_ELEMS, SLOT, rank, N, eps,
                                WORLD: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                                CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, ROW_BLOCK: tl.constexpr):
        pdl_enter()  # launched early; the W4A16 kernel before it has finished once this returns
        pid = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs < N
        dtype = Y.dtype.element_ty
        rp = R + m * stride_r + offs
        res = tl.load(rp, mask=nmask, other=0.0)  # issued first: its latency overlaps the partials'
        # 1. this rank's output: the split-K partials summed down the splits (a fixed tree), in the model's dtype
        offs_s = tl.arange(0, SPLIT_BLOCK)
        acc = tl.zeros((SPLIT_BLOCK, BLOCK_N), dtype=tl.float32)
        for s0 in range(0, SPLIT, SPLIT_BLOCK):
            s = s0 + offs_s
            ptrs = P + s[:, None] * stride_ps + m * stride_pm + offs[None, :]
            acc += tl.load(ptrs, mask=(s[:, None] < SPLIT) & nmask[None, :], other=0.0,
                           cache_modifier=".cg").to(tl.float32)
        x = tl.sum(acc, axis=0).to(dtype)
        # 2. the sum over ranks, through every rank's symmetric buffer
        if WORLD > 1:
            bid = m * CHUNKS + pid
            epoch = tl.load(EPOCH + bid) + 1  # int32, wraps; flags are compared by difference
            at = SLOT * SLOT_ELEMS + m * N + offs
            mine = tl.load(PEERS + rank)
            tl.store(mine.to(tl.pointer_type(dtype)) + at, x, mask=nmask)
            tl.debug_barrier()  # every thread's store before the signal that publishes them
            for r in tl.static_range(WORLD):
                if r != rank:
                    flags = (tl.load(PEERS + r) + FLAG_OFF).to(tl.pointer_type(tl.int32))
                    tl.atomic_xchg(flags + bid * WORLD + rank, epoch, sem="release", scope="sys")
            my_flags = (mine + FLAG_OFF).to(tl.pointer_type(tl.int32))
            for r in tl.static_range(WORLD):
                if r != rank:
                    seen = tl.atomic_add(my_flags + bid * WORLD + r, 0, sem="acquire", scope="sys")
                    while seen - epoch < 0:
                        seen = tl.atomic_add(my_flags + bid * WORLD + r, 0, sem="acquire", scope="sys")
            tl.debug_barrier()
            tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for r in tl.static_range(WORLD):  # rank order: the same sum, bit for bit, on every rank
                buf = tl.load(PEERS + r).to(tl.pointer_type(dtype))
                tot += tl.load(buf + at, mask=nmask, other=0.0, cache_modifier=".cv").to(tl.float32)
            x = tot.to(dtype)
            tl.store(EPOCH + bid, epoch)
        # 3. the residual add (the new residual stored), this program's share of the row's sum of squares
        h = (x.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(rp, h, mask=nmask)
        hf = h.to(tl.float32)
        tl.store(SUMSQ + m * CHUNKS + pid, tl.sum(hf * hf, axis=0))
        # 4. the row's last program normalises it (it sees every program's stores: each program's threads meet
        # before its ticket, which is acq_rel)
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKET + m, 1, sem="acq_rel", scope="gpu")
        if ticket == CHUNKS - 1:
            cs = tl.arange(0, CHUNKS_P2)
            sq = tl.load(SUMSQ + m * CHUNKS + cs, mask=cs < CHUNKS, other=0.0, cache_modifier=".cg")
            rstd = tl.rsqrt(tl.sum(sq, axis=0) / N + eps)
            for c0 in range(0, N, ROW_BLOCK):
                cols = c0 + tl.arange(0, ROW_BLOCK)
                cm = cols < N
                hr = tl.load(R + m * stride_r + cols, mask=cm, other=0.0, cache_modifier=".cg").to(tl.float32)
                w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
                y = (hr * rstd).to(dtype).to(tl.float32)
                tl.store(Y + m * stride_y + cols, (w * y).to(dtype), mask=cm)
            tl.atomic_xchg(TICKET + m, 0)  # ready for the next launch (and the next graph replay)


@dataclass(frozen=True)
class RowOutput:
    """A row-parallel linear's output not yet finished: ``parts [split, M, N]`` (fp32 split-K partials, or the
    output itself as ``[1, M, N]``), to be summed over the ranks of ``peers`` (``None``: one rank) by the
    ``RMSNorm`` it is handed to."""

    parts: torch.Tensor
    peers: Any = None


MAX_ROWS = 512  # rows one launch takes (the row tickets are sized for it); more: the unfused path
BLOCK_N = 128   # the fewest columns per program (the flags' count is sized for it)
MANY_RANKS_MAX_ROWS = 8  # more than two ranks: the rows up to which the fused kernel is the faster (see can_fuse)


_one_rank_scratch: dict = {}


def _scratch(device: torch.device, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of squares and row tickets for one rank's calls (several ranks use their ``SymmetricAllReduce``'s,
    made with it before any graph is captured)."""
    have = _one_rank_scratch.get(device)
    if have is None or have[0].numel() < programs:
        have = _one_rank_scratch[device] = (torch.empty(programs, dtype=torch.float32, device=device),
                                            torch.zeros(MAX_ROWS, dtype=torch.int32, device=device))
    return have


def can_fuse(rows: int, n: int, dtype: torch.dtype, peers) -> bool:
    """Whether :func:`reduce_add_rms_norm` takes ``rows x n`` outputs of ``dtype`` through the symmetric buffer
    of ``peers``, and is the faster path there: on two H200s at every row count measured (1-128: 0.68-0.83x the
    time of the three launches), on four only up to 8 rows (0.95-0.98x; from 16 rows 1.2-1.9x: every program
    waits on three peers)."""
    limit = MAX_ROWS if peers.world == 2 else MANY_RANKS_MAX_ROWS
    return HAS_TRITON and 0 < rows <= limit and dtype in (torch.float16, torch.bfloat16) and \
        peers.fused_fits(rows, n)


def launch_shape(rows: int) -> tuple[int, int]:
    """(columns per program, warps): on two H200s, 256 x 4 warps at 1-2 rows (6.4 us a call at tp 2, N = 4096),
    1024 x 8 from 4 rows (within 0.2 us of the best of five shapes on every row count measured, 4-128)."""
    return (256, 4) if rows <= 2 else (1024, 8)


def reduce_add_rms_norm(parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        peers=None, slot: int = 0, block_n: int | None = None,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(y + residual), y + residual)`` where ``y`` is the sum of ``parts [split, M, N]`` over its
    first axis (fp32 split-K partials, or ``[1, M, N]`` an output as it is), rounded to the residual's dtype,
    then summed over the tensor-parallel ranks of ``peers`` (a :class:`~.parallel.SymmetricAllReduce`; ``None``:
    one rank) through data slot ``slot`` of their buffer (0 or 1; consecutive calls must alternate: see the module
    doc). ``residual [M, N]`` is updated in place and returned. One launch."""
    split, M, N = parts.shape
    if residual.shape != (M, N) or residual.stride(-1) != 1 or parts.stride(-1) != 1:
        raise ValueError(f"reduce_add_rms_norm: parts {tuple(parts.shape)} and residual {tuple(residual.shape)} "
                         "must agree on [M, N] and be contiguous along N")
    if slot not in (0, 1):
        raise ValueError(f"reduce_add_rms_norm: slot must be 0 or 1, got {slot!r}")
    if block_n is None or num_warps is None:
        block_n, num_warps = launch_shape(M)
    if block_n < BLOCK_N or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two of at least {BLOCK_N}, got {block_n}")
    chunks = triton.cdiv(N, block_n)
    y = torch.empty_like(residual)
    world = 1 if peers is None else peers.world
    if world > 1:
        if not peers.fused_fits(M, N):
            raise ValueError(f"reduce_add_rms_norm: {M} x {N} outputs exceed the symmetric buffer's slot "
                             f"({peers.slot_elems} elements; see can_fuse)")
        sumsq, ticket = peers.sumsq, peers.ticket
        args = (peers.ptrs, peers.epoch, peers.flag_off, peers.slot_elems, slot, peers.rank)
    else:
        sumsq, ticket = _scratch(residual.device, M * chunks)
        args = (ticket, ticket, 0, 0, 0, 0)  # unused
    # up to 64 fp32 partials per thread at once; the row's tail in one pass where 32 elements a thread cover it
    sb = min(next_pow2(split), 2048 * num_warps // block_n)
    _reduce_add_norm_kernel[(chunks, M)](
        parts, parts.stride(0), parts.stride(1), split, residual, residual.stride(0), weight, y, y.stride(0),
        sumsq, ticket, *args, N, eps, WORLD=world, SPLIT_BLOCK=max(1, sb), BLOCK_N=block_n, CHUNKS=chunks,
        CHUNKS_P2=next_pow2(chunks), ROW_BLOCK=min(1024 * num_warps, next_pow2(N)), num_warps=num_warps,
        **PDL_LAUNCH)
    return y, residual
