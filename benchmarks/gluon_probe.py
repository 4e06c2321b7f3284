"""Probe of the fragment-repacked Gluon kernel (``kernels/awq_gluon_mma.py``) on one GPU, side by side in one call.

    RAYAWQ_COMMIT=<hash> python3 benchmarks/gluon_probe.py --out $OUT

For each of the issue's four large shapes and M in ``--ms``: correctness of ``gluon_mma`` against an fp64
reference (fresh inputs, poisoned output), then cold-L2 median µs (``kernels.timing``) of a few ``gluon_mma``
configs, the dispatcher's measured config for the AutoAWQ layout (the product path), PyTorch's int4 kernel and
cuBLAS. Writes ``gluon_probe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.kernels import int4pack_sets, ref_fp64, rel_err  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.awq_gluon_mma import gluon_mma  # noqa: E402
from kernels.awq_repack import repack_awq  # noqa: E402
from kernels.timing import sets_needed, time_calls  # noqa: E402

SHAPES = [(4096, 14336), (8192, 8192), (14336, 4096), (8192, 28672)]
G = 128


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gluon_probe")
    ap.add_argument("--ms", default="1,16")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for K, N in SHAPES:
        n = sets_needed(K * N // 2)
        sets = [dispatch.random_awq(K, N, G, torch.bfloat16, "cuda") for _ in range(n)]
        packed = [repack_awq(s[0]) for s in sets]
        wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets_needed(K * N * 2))]
        i4 = int4pack_sets(N, K, n)
        for M in [int(m) for m in a.ms.split(",")]:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(n, len(wb)))]
            row = {"K": K, "N": N, "M": M}
            cfgs = [dict(T=t, num_warps=w, split_k=s) for t in (2, 4) for w in (4,) for s in (1, 4, 8, 16)
                    if N % (16 * w * t) == 0]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = ref_fp64(x, *sets[0], G)
            errs = {}
            for c in cfgs[:2] + cfgs[-1:]:
                o = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                y = gluon_mma(x, packed[0], sets[0][1], sets[0][2], G, out=o if c["split_k"] == 1 else None, **c)
                errs[str(c)] = rel_err(y, ref) if torch.isfinite(y).all() else float("inf")
            row["rel_err"] = errs
            best = (float("inf"), None)
            for c in cfgs:
                us = time_calls([lambda x=x, p=p, s=s, c=c: gluon_mma(x, p, s[1], s[2], G, **c)
                                 for x, p, s in zip(xs, packed, sets)])
                if us < best[0]:
                    best = (us, c)
            row["gluon_us"], row["gluon_cfg"] = best
            cfg = dispatch.select_config(M, N, K, G, torch.bfloat16, torch.device("cuda"))
            row["table_us"] = time_calls([lambda x=x, s=s: dispatch.run_config(cfg, x, *s, G) for x, s in zip(xs, sets)])
            row["table_kernel"] = cfg["kernel"]
            row["int4_us"] = time_calls([lambda x=x, s=s: torch.ops.aten._weight_int4pack_mm(x, s[0], G, s[1])
                                         for x, s in zip(xs, i4)])
            row["cublas_us"] = time_calls([lambda x=x, w=w: x @ w.t() for x, w in zip(xs, wb)])
            rows.append(row)
            print(f"K={K} N={N} M={M} cublas {row['cublas_us']:.1f} int4 {row['int4_us']:.1f} "
                  f"table({row['table_kernel']}) {row['table_us']:.1f} gluon {best[0]:.1f} {best[1]} "
                  f"x{row['cublas_us'] / best[0]:.2f} cuBLAS x{row['int4_us'] / best[0]:.2f} int4 "
                  f"err {max(errs.values()):.1e}", flush=True)
            (out / "gluon_probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                             indent=1))
        del sets, packed, wb, i4
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
