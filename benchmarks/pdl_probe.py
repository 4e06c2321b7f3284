"""Programmatic dependent launch for the split-K sum: the table's config per shape and M, timed as the op runs.

Run once with ``RAYAWQ_PDL=0`` and once without (the flag is read at import), same machine:

    RAYAWQ_PDL=0 python3 benchmarks/pdl_probe.py --out off.json && python3 benchmarks/pdl_probe.py --out on.json
    python3 benchmarks/pdl_probe.py --compare off.json on.json

Times ``kernels.awq_linear`` (GEMV + its split-K sum launch) with the same cold-L2, several-input-sets CUDA-graph
method as ``benchmarks/kernels.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.kernels import GROUP, SHAPES  # noqa: E402


def measure(ms: list[int]) -> dict:
    import kernels
    from kernels import awq_triton, dispatch
    from kernels.timing import time_op

    out = {"pdl": awq_triton.PDL, "device": torch.cuda.get_device_name(), "rows": []}
    dev = torch.device("cuda")
    for K, N in SHAPES:
        for M in ms:
            cfg = dispatch.select_config(M, N, K, GROUP, torch.bfloat16, dev)
            us = time_op(lambda x, w: kernels.awq_linear(x, *w, GROUP), M, N, K, GROUP, torch.bfloat16, dev)
            out["rows"].append({"K": K, "N": N, "M": M, "us": us, "kernel": cfg["kernel"],
                                "split_k": cfg.get("split_k", 1), "tail": cfg.get("TAIL")})
            print(f"K={K} N={N} M={M} {us:7.2f} us {cfg['kernel']} split {cfg.get('split_k', 1)}", flush=True)
    return out


def compare(off: dict, on: dict) -> str:
    lines = ["| K×N | M | kernel | split | PDL off µs | PDL on µs | saved µs |", "|---|---:|---|---:|---:|---:|---:|"]
    for a, b in zip(off["rows"], on["rows"]):
        lines.append(f"| {a['K']}×{a['N']} | {a['M']} | {a['kernel']} | {a['split_k']} | {a['us']:.1f} | "
                     f"{b['us']:.1f} | {a['us'] - b['us']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,2,4,16,64")
    ap.add_argument("--compare", nargs=2, default=None)
    a = ap.parse_args()
    if a.compare:
        print(compare(*(json.loads(Path(p).read_text()) for p in a.compare)))
        return 0
    res = measure([int(m) for m in a.ms.split(",")])
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
