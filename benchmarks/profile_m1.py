"""Launch the table's M = 1 kernel for a few shapes, for a profiler (Nsight Compute) to look at.

    ncu --kernel-name regex:awq --launch-skip 3 --launch-count 1 --section WarpStateStats \
        --section MemoryWorkloadAnalysis python benchmarks/profile_m1.py --shapes 4096x4096

Prints each shape's config and its time without the profiler (CUDA events, 200 calls).
"""

from __future__ import annotations

import argparse

import torch

import kernels
from kernels.dispatch import random_awq, run_config, select_config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,8192x8192")
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args()
    dev = torch.device("cuda")
    for s in a.shapes.split(","):
        K, N = (int(v) for v in s.split("x"))
        qw, qz, sc = random_awq(K, N, 128, torch.bfloat16, dev)
        x = torch.randn(1, K, dtype=torch.bfloat16, device=dev)
        cfg = select_config(1, N, K, 128, torch.bfloat16, dev)
        for _ in range(a.calls):
            run_config(cfg, x, qw, qz, sc, 128)
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(200):
            kernels.awq_linear(x, qw, qz, sc, 128)
        t1.record()
        torch.cuda.synchronize()
        print(f"{K}x{N} M=1 {cfg} {t0.elapsed_time(t1) / 200 * 1000:.1f} us/call (warm L2, back to back)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
