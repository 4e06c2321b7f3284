"""Per-call time against calls per graph: cuBLAS and the repacked path's table config, the same input sets repeated
in turn to 1x, 2x, 4x and 8x the sets each contender needs, three timings each, on the
four large shapes at M = 1 and 16.

Usage (GPU):  OUT=/tmp/cpg python3 benchmarks/calls_per_graph.py [M,M,...]   (default 1,16)

Why: before the twenty-third session ``benchmarks/kernels.py`` gave each contender a graph of as many calls as it
has input sets (``sets_needed``: 2 for cuBLAS's bf16 weights on these shapes, 7 for our int4 ones on three of
them), and a graph's replay costs a few microseconds beyond its kernels, charged per call by 1 / calls.
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from kernels import dispatch, repacked_dispatch
from kernels.awq_repack import repack_awq
from kernels.timing import sets_needed, time_calls
G = 128
MS = [int(m) for m in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 16]
out = {}
for K, N in ((8192, 28672), (4096, 14336), (8192, 8192), (14336, 4096)):
    n4 = sets_needed(K * N // 2 + (K // G) * N * 2 + (K // G) * N // 2)
    nb = sets_needed(K * N * 2)
    aw = [dispatch.random_awq(K, N, G, torch.bfloat16, "cuda") for _ in range(n4)]
    pk = [repack_awq(a[0]) for a in aw]
    wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(nb)]
    for M in MS:
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(n4, nb))]
        cfg = repacked_dispatch.select(M, N, K, G)
        ours = [lambda x=x, p=p, a=a: repacked_dispatch.run(cfg, x, p, a[1], a[2], G) for x, p, a in zip(xs, pk, aw)]
        cub = [lambda x=x, w=w: x @ w.t() for x, w in zip(xs, wb)]
        row = {}
        for rep in (1, 2, 4, 8):
            for r in range(3):
                for name, calls in (("cublas", cub), ("ours", ours)):
                    row.setdefault(f"{name}_x{rep}", []).append(time_calls(calls * rep, n_calls=0))
        med = {k: statistics.median(v) for k, v in row.items()}
        out[f"{K}x{N}/M{M}"] = {"sets": [n4, nb], "us": row, "median": med}
        print(K, N, M, "sets", n4, nb, " ".join(f"x{rep}: {med[f'cublas_x{rep}']:.1f}/{med[f'ours_x{rep}']:.1f}={med[f'cublas_x{rep}']/med[f'ours_x{rep}']:.2f}" for rep in (1, 2, 4, 8)), flush=True)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "calls_per_graph.json"), "w"), indent=1)
