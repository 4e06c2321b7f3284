"""CPU checks of kernels.timing's graph make-up (the timing itself needs a GPU: tests/gpu, benchmarks)."""

from __future__ import annotations

from kernels.timing import GRAPH_CALLS, L2_BYTES, cycle, sets_needed


def test_cycle_repeats_the_sets_in_turn_to_the_graph_length():
    """Contenders compared side by side get graphs of the same length; each set's calls are spread evenly."""
    calls = [lambda i=i: i for i in range(3)]
    assert [c() for c in cycle(calls, 7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [c() for c in cycle(calls, 0)] == [0, 1, 2]  # never fewer calls than sets
    assert [c() for c in cycle(calls, 2)] == [0, 1, 2]
    assert len(cycle(calls)) == GRAPH_CALLS  # the default: every contender's graph of one length


def test_repeated_sets_stay_cold():
    """Between two uses of one set at least 2x L2 of the other sets pass, for the set sizes of the benchmark's
    shapes (4096x4096's 8.4 MB of int4 weights up to 8192x28672's 470 MB of bf16)."""
    for set_bytes in (8_400_000, 33 * 2**20, 117 * 2**20, 470 * 2**20):
        n = sets_needed(set_bytes)
        assert (n - 1) * set_bytes >= 2 * L2_BYTES, (set_bytes, n)
