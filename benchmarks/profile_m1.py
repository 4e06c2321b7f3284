"""Launch the table's M = 1 kernel and PyTorch's int4 kernel once per shape inside an NVTX range "prof", for
Nsight Compute to compare (stall reasons, achieved bandwidth, occupancy):

    ncu --clock-control none --nvtx --nvtx-include "prof/" --section SpeedOfLight --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section SchedulerStats \
        python benchmarks/profile_m1.py --shapes 4096x14336,4096x4096

Without the profiler it prints each shape's config and both kernels' times (CUDA events, warm L2, back to back).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.dispatch import random_awq, run_config, select_config  # noqa: E402


def _time_us(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(calls):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / calls * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x14336,4096x4096,14336x4096")
    ap.add_argument("--group", type=int, default=128)
    a = ap.parse_args()
    dev, g = torch.device("cuda"), a.group
    cases = []
    for s in a.shapes.split(","):
        K, N = (int(v) for v in s.split("x"))
        qw, qz, sc = random_awq(K, N, g, torch.bfloat16, dev)
        x = torch.randn(1, K, dtype=torch.bfloat16, device=dev)
        cfg = select_config(1, N, K, g, torch.bfloat16, dev)
        ours = (lambda x=x, qw=qw, qz=qz, sc=sc: kernels.awq_linear(x, qw, qz, sc, g))
        w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
        wp = torch.ops.aten._convert_weight_to_int4pack(w, 8)
        sz = (torch.rand(K // g, N, 2, device=dev) * 0.02).to(torch.bfloat16)
        int4 = (lambda x=x, wp=wp, sz=sz: torch.ops.aten._weight_int4pack_mm(x, wp, g, sz))
        run_config(cfg, x, qw, qz, sc, g)
        cases.append((K, N, cfg, ours, int4))
    for K, N, cfg, ours, int4 in cases:  # compiled and timed before the profiled range
        print(f"{K}x{N} M=1 ours {_time_us(ours):.1f} us, int4 {_time_us(int4):.1f} us; {cfg}", flush=True)
    torch.cuda.synchronize()
    for K, N, _cfg, ours, int4 in cases:
        torch.cuda.nvtx.range_push("prof")
        ours()
        int4()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
