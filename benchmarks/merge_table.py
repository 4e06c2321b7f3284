"""Join one M bucket of a partial kernel run (``kernels.py --ms 1``) into a full config table.

A run limited to some M values writes a table whose other buckets copy those rows; this takes only the
measured buckets' configs from it and keeps the full table's others, so the engine can run on the result.

    python benchmarks/merge_table.py FULL.json PARTIAL.json --ms 1 --out MERGED.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(full: dict, partial: dict, buckets: set[int]) -> dict:
    out = json.loads(json.dumps(full))
    taken = {k: v for k, v in partial["configs"].items() if int(k.rsplit("/M", 1)[1]) in buckets}
    out["configs"].update(taken)
    out["meta"]["merged_buckets"] = {"M": sorted(buckets), "commit": partial.get("meta", {}).get("commit"),
                                     "keys": len(taken)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("full")
    ap.add_argument("partial")
    ap.add_argument("--ms", required=True, help="M buckets to take from the partial table, e.g. 1")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    merged = merge(json.loads(Path(a.full).read_text()), json.loads(Path(a.partial).read_text()),
                   {int(m) for m in a.ms.split(",")})
    Path(a.out).write_text(json.dumps(merged, indent=1, sort_keys=True))
    print(f"merged {merged['meta']['merged_buckets']['keys']} configs into {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
