"""How much of an M = 1 decode GEMV is its split-K sum, and which way of summing is fastest (one H100).

For each shape, the best decode configs of an earlier kernel run (``--from``, its per-config timings) are timed
again with the partials summed by the last program of each column tile in rounds of 4, 8 or 16 splits
(``TAIL``) or by a second launch (``TAIL=0``, ``reduce_partials``); the second launch is also timed alone
on the same workspace, so ``TAIL=0`` minus it is the GEMV without any sum. Cold L2, CUDA graphs
(``kernels.timing``). Writes ``decode_tail.json`` to ``--out``.

    python benchmarks/decode_tail.py --from benchmarks/results/kernels_results_h100_038a857_m12.json --out /tmp/t
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kernels import dispatch  # noqa: E402
from kernels.awq_triton import reduce_partials  # noqa: E402
from kernels.timing import sets_needed, time_calls  # noqa: E402

GROUP = 128
DT = torch.bfloat16


def best_decode_configs(results: dict, K: int, N: int, top: int) -> list[dict]:
    """The ``top`` fastest decode configs (ROWS or KW, one per structure) of an earlier run's M = 1 row."""
    row = next((r for r in results["results"] if (r["K"], r["N"], r["M"]) == (K, N, 1)), None)
    if row is None:
        return []
    out, seen = [], set()
    for _us, cfg in sorted(row["configs"], key=lambda c: c[0]):
        if cfg["kernel"] != "decode" or not (cfg.get("ROWS") or cfg.get("KW")):
            continue
        shape = (cfg.get("KW", 0), cfg.get("BLOCK_J"), cfg.get("num_warps"))
        if shape not in seen:
            seen.add(shape)
            out.append(cfg)
        if len(out) == top:
            break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", required=True, help="kernels_results.json with per-config timings")
    ap.add_argument("--out", required=True)
    ap.add_argument("--top", type=int, default=3)
    a = ap.parse_args()
    src = json.loads(Path(a.src).read_text())
    shapes = sorted({(r["K"], r["N"]) for r in src["results"] if r["M"] == 1}, key=lambda s: s[0] * s[1])
    rows = []
    for K, N in shapes:
        per = K * N // 2 + (K // GROUP) * N * 5 // 2
        n = sets_needed(per)
        sets = [(torch.randn(1, K, dtype=DT, device="cuda"), dispatch.random_awq(K, N, GROUP, DT, "cuda"))
                for _ in range(n)]
        for cfg in best_decode_configs(src, K, N, a.top):
            row = {"K": K, "N": N, "config": cfg, "us": {}}
            for tail in (4, 8, 16, 0):
                c = {**cfg, "TAIL": tail}
                row["us"][str(tail)] = time_calls([lambda x=x, w=w, c=c: dispatch.run_config(c, x, *w, GROUP)
                                                   for x, w in sets])
            split = max(1, min(cfg["split_k"], K // GROUP))
            wss = [torch.randn(split, 1, N, device="cuda") for _ in range(n)]
            ys = [torch.empty(1, N, dtype=DT, device="cuda") for _ in range(n)]
            row["reduce_alone_us"] = time_calls([lambda ws=ws, y=y: reduce_partials(ws, y, None)
                                                 for ws, y in zip(wss, ys)])
            row["no_sum_us"] = row["us"]["0"] - row["reduce_alone_us"]
            rows.append(row)
            u = row["us"]
            print(f"{K}x{N} {cfg}: tail4 {u['4']:.1f} tail8 {u['8']:.1f} tail16 {u['16']:.1f} "
                  f"two-launch {u['0']:.1f} (reduce alone {row['reduce_alone_us']:.1f}, "
                  f"no sum ~{row['no_sum_us']:.1f}) us", flush=True)
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "decode_tail.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name(), "from": a.src, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
