"""What the split-K sum costs the small-M kernel per call, against the read floor (one H200 / H100).

Usage:
    python3 benchmarks/split_sum_cost.py --out $OUT          # GPU: split_sum_cost.json

Why: at 1-16 rows the table's Gluon configs split K over programs and sum the fp32 partials in a second launch
(``reduce_partials``, under programmatic dependent launch). Its time is a chain of latencies after the main grid's
last program (read the partials from L2, add, store) while DRAM idles, paid once per call. This times, per shape
and row count, in graphs of :data:`kernels.timing.GRAPH_CALLS` calls on cold weights: the table's config as the
engine runs it; the same main launch with the sum left out (its output is wrong: a timing of the parts only); the
sum launch alone on partials of that shape; the table config with the sum in the kernel (``TAIL`` 1: the last
program of a tile from memory, 2: in the last split's registers), also under register caps (``--caps``: the sums
take registers, 72 -> 80 / 128 at M = 1 on sm_90, which drops the programs an SM holds from 7 to 6 / 4); and the
read floor of the weights' bytes, plain and under programmatic dependent launch
(:func:`benchmarks.gluon_probe.read_floor`). Branches ``exp/csum-cluster-sum`` (the splits as one cluster summing
through its shared memory) and ``exp/poll-sum`` (a sum launch polling the partials) add their variants to this
script; both measured slower or equal (docs/kernels_notes.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gluon_probe import SHAPES, int4_bytes, read_floor  # noqa: E402
from benchmarks.kernels import ref_fp64, rel_err  # noqa: E402
from kernels import awq_gluon_mma, dispatch, repacked_dispatch  # noqa: E402
from kernels.awq_repack import repack_awq  # noqa: E402
from kernels.awq_triton import reduce_partials  # noqa: E402
from kernels.timing import sets_needed, time_calls  # noqa: E402

G = 128


def time_without_sum(calls: list) -> float:
    """µs per call of ``calls`` with ``reduce_partials`` in the Gluon launcher made a no-op (while capturing)."""
    saved = awq_gluon_mma.reduce_partials
    awq_gluon_mma.reduce_partials = lambda ws, y, bias: y
    try:
        return time_calls(calls)
    finally:
        awq_gluon_mma.reduce_partials = saved


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/split_sum_cost")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--caps", default="64,72", help="the in-kernel sums (TAIL 1, 2) also under these register caps "
                    "(MAXNREG): uncapped they take more registers than the table's config, fewer programs fit an SM")
    a = ap.parse_args()
    a.caps = [int(v) for v in a.caps.split(",") if v]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for K, N in SHAPES:
        sets = [dispatch.random_awq(K, N, G, torch.bfloat16, "cuda") for _ in range(sets_needed(K * N // 2))]
        packed = [repack_awq(s[0]) for s in sets]
        floor, floor_pdl = read_floor(int4_bytes(K, N)), read_floor(int4_bytes(K, N), pdl=True)
        for M in [int(m) for m in a.ms.split(",")]:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in sets]
            cfg = repacked_dispatch.select(M, N, K, G)
            row = {"K": K, "N": N, "M": M, "cfg": cfg, "read_us": floor[0], "read_how": floor[1],
                   "read_pdl_us": floor_pdl[0], "read_pdl_how": floor_pdl[1]}

            def calls(c):
                return [lambda x=x, p=p, s=s: repacked_dispatch.run(c, x, p, s[1], s[2], G)
                        for x, p, s in zip(xs, packed, sets)]

            row["table_us"] = time_calls(calls(cfg))
            if cfg["kernel"] == "gluon" and cfg.get("split_k", 1) > 1 and not cfg.get("TAIL", True):
                row["main_only_us"] = time_without_sum(calls(cfg))
                parts = [torch.randn(cfg["split_k"], M, N, device="cuda", dtype=torch.float32)
                         for _ in range(4)]
                ys = [torch.empty(M, N, device="cuda", dtype=torch.bfloat16) for _ in parts]
                row["sum_alone_us"] = time_calls([lambda w=w, y=y: reduce_partials(w, y, None)
                                                  for w, y in zip(parts, ys)])
                ref = ref_fp64(xs[0], *sets[0], G)
                for tail in (1, 2):
                    for cap in sorted({cfg.get("MAXNREG", 0), *a.caps}):
                        c = {**cfg, "TAIL": tail, "MAXNREG": cap}
                        key = f"tail{tail}" + (f"_maxnreg{cap}_us" if cap else "_us")
                        try:
                            err = rel_err(repacked_dispatch.run(c, xs[0], packed[0], sets[0][1], sets[0][2], G), ref)
                        except ValueError as e:  # a tail the launcher refuses for this config
                            row[key] = str(e)[:120]
                            continue
                        row[key] = time_calls(calls(c)) if err <= 1e-2 else f"rel. error {err:.1e}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "split_sum_cost.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
        del sets, packed
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
