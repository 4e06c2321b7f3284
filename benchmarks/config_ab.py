"""Configs of the repacked path side by side under sustained load: the table's choice for each (K, N, M)
against named alternatives and cuBLAS, timed in turns on one GPU.

Usage:
    python3 benchmarks/config_ab.py --out $OUT [--ms 256,1024,4096] [--rounds 40] [--shapes 4096x14336,...] [--bench]
                                    [--dtype float16]

Why: differences of a few percent between configs (the 1024-4096-row cells of issue 3 sit near 0.9x cuBLAS) are
within what the card's clocks drift between two do_bench calls: in one H200 call the same config took 194-202 us
timed right after cuBLAS and 179 us in another script. Here every config and cuBLAS take turns of about a
millisecond (:func:`kernels.timing.time_interleaved`) for ``--rounds`` turns; the medians of the times and of the
per-turn ratios to cuBLAS are kept (two calls agreed within 0.3 %). ``--bench`` times each turn with do_bench
instead (~50 ms a config, the way ``benchmarks/kernels.py`` does). Alternatives: the table's split config with
``LEAD`` 1-2, the one-warpgroup last-wave tile where the table splits a last wave, that wave's tiles split inside
one CTA each (``WS_TAIL``, ``LEAD`` 0-1), for the small-M kernel neighbouring split counts, tiles per warp and split-K sums,
dequantize + cuBLAS from 1024 rows; ``--with K=V``: the table's config with those keys too. Writes
``config_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = ((4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672))


def _with_lead(name: str, cfg: dict) -> dict[str, dict]:
    """``cfg`` and, where it sums split-K partials in the last split (``TAIL = 2`` or ``SLOTS``), with ``LEAD``."""
    out = {name: cfg}
    if cfg.get("kernel") == "pipelined" and (cfg.get("TAIL") == 2 or cfg.get("SLOTS")) and not cfg.get("LEAD"):
        out.update({f"{name}+lead{lead}": {**cfg, "LEAD": lead} for lead in (1, 2)})
    return out


def variants(cfg: dict, M: int, extra: tuple[dict, ...] = ()) -> dict[str, dict]:
    """Named configs to compare with the table's ``cfg`` (see the module doc); ``extra``: the table's config also
    with each of these keys set (``--with``), named by them."""
    out = _with_lead("table", cfg)
    for e in extra:
        out["table+" + "+".join(f"{k}={v}" for k, v in e.items())] = {**cfg, **e}
    if cfg.get("SLOTS"):
        for name, w, stages, slots in (("wg2", 8, 4, 1), ("wg1", 4, 3, 2)):
            alt = {"kernel": "pipelined", "BB": 256, "W": w, "T": 1, "STAGES": stages, "DEPTH": 1, "split_k": 1,
                   "SLOTS": slots}
            if (alt["W"], alt["STAGES"]) != (cfg["W"], cfg["STAGES"]):
                out.update(_with_lead(name, alt))
        one_wg = {k: v for k, v in cfg.items() if k != "LEAD"} if cfg["W"] == 4 else out["wg1"]
        for lead in (0, 1):  # the last wave's tiles split inside one CTA each (WS_TAIL)
            out["ws" + (f"+lead{lead}" if lead else "")] = {**one_wg, "WS_TAIL": True, "LEAD": lead}
    if cfg.get("kernel") == "gluon":  # the small-M kernel: neighbouring split counts and tiles per warp
        split = cfg.get("split_k", 1)
        for s in sorted({max(1, split // 2), max(1, split * 3 // 4), split * 3 // 2, split * 2} - {split}):
            out[f"split{s}"] = {**cfg, "split_k": s}
        for t in sorted({1, 2, 4} - {cfg.get("T", 2)}):
            out[f"T{t}"] = {**cfg, "T": t}
        for tail in sorted({0, 1, 2} - {int(cfg.get("TAIL", True))}):  # the split-K sum: launch, memory, registers
            out[f"tail{tail}"] = {**cfg, "TAIL": tail}
    if M >= 1024:
        out["dequant"] = {"kernel": "dequant"}
    return out


def run(out: Path, ms: list[int], rounds: int, shapes=SHAPES, bench: bool = False,
        group: int = 128, extra: tuple[dict, ...] = (), dtype: str = "bfloat16") -> list[dict]:
    import torch

    dt = getattr(torch, dtype)
    from kernels import dispatch, repacked_dispatch
    from kernels.awq_repack import repack_awq
    from kernels.timing import time_calls, time_interleaved

    rows = []
    for K, N in shapes:
        sets = [dispatch.random_awq(K, N, group, dt, "cuda") for _ in range(4)]
        packed = [repack_awq(s[0]) for s in sets]
        wb = torch.randn(N, K, device="cuda", dtype=dt) * 0.02
        for M in ms:
            cfg = repacked_dispatch.select(M, N, K, group, dt)
            named = variants(cfg, M, extra)
            if len(named) == 1:
                continue
            xs = [torch.randn(M, K, device="cuda", dtype=dt) for _ in range(4)]
            ref = repacked_dispatch.run(cfg, xs[0], packed[0], sets[0][1], sets[0][2], group)
            calls = {"cublas": [lambda x=x: x @ wb.t() for x in xs]}
            for name, c in named.items():
                try:
                    y = repacked_dispatch.run(c, xs[0], packed[0], sets[0][1], sets[0][2], group)
                except (ValueError, TypeError) as e:  # a neighbour the launcher refuses (a tile that does not
                    # divide N), or a --with key this kernel does not take
                    print(f"{K}x{N} M={M} {name}: refused: {e}", flush=True)
                    continue
                assert torch.equal(y, ref) or (y - ref).abs().max() <= 1e-2 * ref.abs().max(), (K, N, M, name)
                calls[name] = [lambda x=x, p=p, s=s, c=c: repacked_dispatch.run(c, x, p, s[1], s[2], group)
                               for x, p, s in zip(xs, packed, sets)]
            if bench:  # do_bench per config (as kernels.py), configs in turn, the first rotating
                times = {k: [] for k in calls}
                names = list(calls)
                for r in range(rounds):
                    for k in names[r % len(names):] + names[:r % len(names)]:
                        times[k].append(time_calls(calls[k]))
            else:
                times = time_interleaved(calls, reps=rounds)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = {k: statistics.median(c / t for c, t in zip(times["cublas"], v)) for k, v in times.items()}
            row = {"K": K, "N": N, "M": M, "cfg": cfg, "variants": named, "us": times, "median_us": med,
                   "median_x_cublas": ratio}
            rows.append(row)
            print(f"{K}x{N} M={M}: " + ", ".join(f"{k} {v:.1f} ({ratio[k]:.3f}x)" for k, v in med.items()),
                  flush=True)
            meta = {"device": torch.cuda.get_device_name(), "rounds": rounds, "commit": os.environ.get("RAYAWQ_COMMIT"),
                    "timing": "do_bench" if bench else "interleaved", "dtype": dtype}
            (out / "config_ab.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/config_ab")
    ap.add_argument("--ms", default="256,1024,4096")
    ap.add_argument("--shapes", default=None, help="K x N list, e.g. 4096x14336,8192x8192 (default the four large)")
    ap.add_argument("--rounds", type=int, default=40, help="turns of every config and cuBLAS, each one graph replay")
    ap.add_argument("--bench", action="store_true", help="each turn a do_bench of ~50 ms per config instead")
    ap.add_argument("--with", dest="extra", default=None,
                    help="the table's config also with these keys, e.g. EVICT_FIRST=1 or A=1+B=2,C=0 (ints)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="activations and cuBLAS")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else SHAPES
    extra = tuple(dict((f.split("=")[0], int(f.split("=")[1])) for f in v.split("+"))
                  for v in a.extra.split(",")) if a.extra else ()
    run(out, [int(m) for m in a.ms.split(",")], a.rounds, shapes, a.bench, extra=extra, dtype=a.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
