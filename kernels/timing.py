"""Timing with cold L2 and no launch gaps: several input sets captured in one CUDA graph, median replay.

A decode GEMV takes ~10 µs, less than one Python launch, so eager timing would measure the host. We
capture ``n`` calls (input sets together larger than L2, repeated in turn, so no call finds its weights
in cache) in one graph, time replays with ``triton.testing.do_bench`` (median; it also flushes L2 before each
replay) and divide by ``n``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

L2_BYTES = 50 * 2**20
# calls in every timed graph: each contender's input sets repeated in turn (:func:`cycle`); benchmarks/kernels.py
# sets it from --calls
GRAPH_CALLS = 16


def sets_needed(bytes_per_set: int, min_sets: int = 2, max_sets: int = 16) -> int:
    """Enough input sets that they don't fit in L2 together (4x its size)."""
    return max(min_sets, min(max_sets, -(-4 * L2_BYTES // max(1, bytes_per_set))))


def cycle(calls: Sequence[Callable[[], object]], n: int | None = None) -> list[Callable[[], object]]:
    """``calls`` repeated in turn to ``n`` calls (default :data:`GRAPH_CALLS`; never fewer than the list holds).
    Why: a graph's replay costs a few microseconds beyond its kernels (its launch, the first kernel's ramp, the
    last's tail), charged to each call by ``1 / len(calls)``; contenders compared side by side get graphs of the
    same length. The sets stay cold: :func:`sets_needed` makes them 4x L2 together, so 2x L2 or more of other sets
    pass between two uses of one (on the benchmark's shapes)."""
    calls = list(calls)
    return [calls[i % len(calls)] for i in range(max(GRAPH_CALLS if n is None else n, len(calls)))]


def capture(calls: Sequence[Callable[[], object]]) -> "torch.cuda.CUDAGraph":
    """``calls`` run once on a side stream (compile, create handles outside the capture), then captured in order
    as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return g


def time_calls(calls: Sequence[Callable[[], object]], warmup_ms: int = 10, rep_ms: int = 40,
               n_calls: int | None = None) -> float:
    """Median µs per call of ``calls`` (each already compiled), replayed as one CUDA graph of ``n_calls`` calls
    (default :data:`GRAPH_CALLS`; :func:`cycle`)."""
    import triton

    calls = cycle(calls, n_calls)
    g = capture(calls)
    ms = triton.testing.do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    del g
    return 1000.0 * ms / len(calls)


def time_op(fn: Callable[[torch.Tensor, tuple], torch.Tensor], M: int, N: int, K: int, group: int,
            dtype: torch.dtype, device: torch.device, sets: list | None = None) -> float:
    """µs per call of ``fn(x, (qweight, qzeros, scales))`` on fresh random AWQ weights, one call per set: what
    calls it (autotune, PDL on/off) ranks variants of one op on the same sets, whose graphs are then of one length
    anyway, and a server's tuning warm-up stays short (16 calls of a 3 ms prefill are 48 ms a replay)."""
    from .dispatch import random_awq

    if sets is None:
        per = K * N // 2 + (K // group) * N * 2 + (K // group) * N // 2 + M * K * 2
        sets = [(torch.randn(M, K, dtype=dtype, device=device), random_awq(K, N, group, dtype, device))
                for _ in range(sets_needed(per))]
    return time_calls([lambda x=x, w=w: fn(x, w) for x, w in sets], n_calls=0)


def time_interleaved(calls: dict[str, Sequence[Callable[[], object]]], reps: int = 40, warm: int = 3,
                     flush_bytes: int = 2 * L2_BYTES, n_calls: int | None = None) -> dict[str, list[float]]:
    """µs per call of each named list of calls (each list one CUDA graph), the graphs replayed in turn ``reps``
    times (the first in each turn rotating), L2 flushed before each replay; returns every replay's time per name.

    Why: the card's clocks follow its power draw within milliseconds, so timing one kernel for 50 ms and then
    another (:func:`time_calls`) lets whichever ran before bias the next: in one H200 call the same config took
    194-202 us timed right after cuBLAS and 179 us in another script. Turns of ~1 ms give every contender the
    same power state; the replays run back to back, as a busy server's would. ``n_calls``: as :func:`time_calls`."""
    calls = {name: cycle(fns, n_calls) for name, fns in calls.items()}
    graphs = {name: capture(fns) for name, fns in calls.items()}
    flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device="cuda")
    names = list(calls)
    marks: dict[str, list] = {n: [] for n in names}
    for r in range(warm + reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[n].replay()
            end.record()
            if r >= warm:
                marks[n].append((start, end))
    torch.cuda.synchronize()
    return {n: [1000.0 * a.elapsed_time(b) / len(calls[n]) for a, b in marks[n]] for n in names}
