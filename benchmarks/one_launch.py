"""Launch one repacked-weights kernel config a few times on random data, for a profiler (``ncu``) to read.

Why: Nsight Compute profiles one launch at a time; the probe and the benchmark launch hundreds. Run as
``ncu --clock-control none -k regex:<kernel> --launch-skip 2 --launch-count 1 python3 benchmarks/one_launch.py
--shape 8192x28672 --m 1024 --cfg '{"kernel": "pipelined", "BB": 256, "W": 8, "T": 1, "STAGES": 4, "DEPTH": 1}'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import dispatch, repacked_dispatch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x28672", help="K x N")
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--cfg", default=None, help="a repacked_dispatch config (JSON); default: select()'s")
    ap.add_argument("--launches", type=int, default=3)
    a = ap.parse_args()
    K, N = (int(v) for v in a.shape.split("x"))
    qw, qz, sc = dispatch.random_awq(K, N, a.group, torch.bfloat16, "cuda")
    packed = repacked_dispatch.repack(qw)
    x = torch.randn(a.m, K, device="cuda", dtype=torch.bfloat16)
    cfg = json.loads(a.cfg) if a.cfg else repacked_dispatch.select(a.m, N, K, a.group)
    for _ in range(a.launches):
        repacked_dispatch.run(cfg, x, packed, qz, sc, a.group)
    torch.cuda.synchronize()
    print("launched", a.launches, "x", cfg, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
