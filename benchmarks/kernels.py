"""W4A16 kernel benchmark and tuner (one H100, one call).

    RAYAWQ_COMMIT=<hash> python3 benchmarks/kernels.py --out $OUT [--quick]

For every shape (K, N) and M it times, side by side, on fresh random inputs with cold L2 (several input sets
captured in one CUDA graph, median of ``triton.testing.do_bench``; see ``kernels/timing.py``):

* cuBLAS ``x @ w.T`` (bf16),
* PyTorch's built-in int4 kernel ``torch.ops.aten._weight_int4pack_mm`` (tinygemm),
* every candidate config of ours (``kernels.dispatch.candidates``: the pruned space), keeping the best per
  kernel variant and overall, and checking the overall best against an fp64 reference,
* on sm_90 with bf16 also the path the engine runs there: the weights repacked into the fragment order and every
  candidate of ``kernels.repacked_dispatch.candidates`` (Gluon MMA / warpgroup MMA / dequantize + cuBLAS), best
  checked against fp64 (``--no-repacked`` skips it). The targets are checked on the engine's path.

It writes under ``--out``: ``kernels_results.json`` (every number), ``tuned_h100.json`` (the config table and
the per-M-bucket kernel choice the dispatcher reads; copy it to ``kernels/``), ``kernels_section.md`` (the
docs/benchmarks.md section; also written through ``write_section`` when ``--write-docs``) and
``kernels_speedup.png``, and ``tuned_repacked_<card>.json`` (the repacked path's table of this card; copy to
``kernels/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._report import card_suffix, git_commit, stamp, write_section  # noqa: E402
from kernels import dispatch, repacked_dispatch  # noqa: E402
from kernels.awq_layout import unpack_int4  # noqa: E402
from kernels import timing  # noqa: E402
from kernels.timing import sets_needed, time_calls, time_interleaved  # noqa: E402

# issue #3's shapes, plus 4096x28672: Llama-3-8B's fused gate/up projection, so the engine benchmark finds a
# measured config for every linear it runs (its qkv, o and down are 4096x6144, 4096x4096, 14336x4096)
ISSUE_SHAPES = [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]
SHAPES = ISSUE_SHAPES + [(4096, 28672)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
GROUP = 128
DTYPE = torch.bfloat16  # ``--dtype float16``: fp16 activations, what most AutoAWQ checkpoints hold
BW = 3.0e12  # measured copy bandwidth of the H100 here (DESIGN.md), bytes/s
TARGETS = {1: 2.8, 16: 2.2, 64: 1.4}


def suffix(meta: dict) -> str:
    """The card's suffix of the section and plot names, plus ``_fp16`` for an fp16 run (its own section)."""
    return card_suffix(meta["device"]) + ("_fp16" if meta.get("dtype") == "fp16" else "")


def log(*a):
    print(*a, flush=True)


def awq_bytes(M, N, K, g=GROUP):
    return K * N // 2 + (K // g) * N * 2 + (K // g) * N // 2 + M * K * 2 + M * N * 2


def ref_fp64(x, qw, qz, sc, g):
    w = unpack_int4(qw).double()
    z = unpack_int4(qz).double().repeat_interleave(g, 0)
    s = sc.double().repeat_interleave(g, 0)
    return x.double() @ ((w - z) * s)


def rel_err(y, r):
    return ((y.double() - r).norm() / r.norm()).item()


def copy_bandwidth():
    import triton

    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * 2**30 / (ms * 1e-3)


def int4pack_sets(N, K, n):
    sets = []
    for _ in range(n):
        w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
        wp = torch.ops.aten._convert_weight_to_int4pack(w, 8)
        sz = (torch.rand(K // GROUP, N, 2, device="cuda") * 0.02).to(DTYPE)
        sets.append((wp, sz))
    return sets


def engine_us(r: dict) -> float:
    """µs of the path the engine runs for this row: the repacked one where measured (sm_90, bf16), else ours."""
    return r.get("repacked_us", r["ours_us"])


def bench_repacked(row, M, N, K, xs, awq_sets, packed_sets, table_only=False):
    """Time every repacked candidate for this row (``table_only``: the table's choice alone); keep the best
    (checked against fp64) and the best per kernel."""
    best, row["repacked_variants"] = (float("inf"), None), {}
    cands = [repacked_dispatch.select(M, N, K, GROUP, DTYPE)] if table_only else repacked_dispatch.candidates(M, N, K, GROUP)
    for cfg in cands:
        try:
            us = time_calls([lambda x=x, p=p, w=w, cfg=cfg: repacked_dispatch.run(cfg, x, p, w[1], w[2], GROUP)
                             for x, p, w in zip(xs, packed_sets, awq_sets)])
        except Exception as e:  # noqa: BLE001
            log("  repacked config failed", cfg, repr(e)[:300])
            us = float("inf")
        v = cfg["kernel"]
        if us < row["repacked_variants"].get(v, (float("inf"),))[0]:
            row["repacked_variants"][v] = (us, cfg)
        if us < best[0]:
            best = (us, cfg)
    if best[1] is None:
        return
    row["repacked_us"], row["repacked_best"] = best
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    y = repacked_dispatch.run(best[1], x, packed_sets[0], awq_sets[0][1], awq_sets[0][2], GROUP)
    row["repacked_rel_err"] = rel_err(y, ref_fp64(x, *awq_sets[0], GROUP))


def paired_retime(row, xs, w_sets, awq_sets, packed_sets, rounds: int) -> None:
    """Time cuBLAS and the row's repacked choice again, alternately, ``rounds`` times each, and report the median
    of each's timings (the first pass's included); then both under sustained load (:func:`sustained_retime`). Why:
    the card's clocks drift between the row's first cuBLAS timing and its repacked timing seconds later (two calls of
    one session put 8192x28672 M = 4096 cuBLAS at 2761 and 2382 us; at M = 1, memory-bound, six calls of another put
    it at 113.9-118.7 us); in alternation both see the same drift."""
    cfg = row["repacked_best"]
    calls = {"cublas_us": [lambda x=x, w=w: torch.matmul(x, w.t()) for x, w in zip(xs, w_sets)],
             "repacked_us": [lambda x=x, p=p, w=w: repacked_dispatch.run(cfg, x, p, w[1], w[2], GROUP)
                             for x, p, w in zip(xs, packed_sets, awq_sets)]}
    timed = {k: [row[k]] for k in calls}
    for _ in range(rounds):
        for k, fns in calls.items():
            timed[k].append(time_calls(fns))
    row["paired"] = {"rounds": rounds, **timed}
    for k, v in timed.items():
        row[k] = statistics.median(v)
    sustained_retime(row, calls)


def sustained_retime(row, calls: dict, turns: int = 30) -> None:
    """cuBLAS and the row's repacked choice (``calls``, as :func:`paired_retime` builds them) under sustained load
    (:func:`kernels.timing.time_interleaved`: turns of one graph replay each, back to back), kept beside the do_bench
    figures as ``row["sustained"]``: medians of the times and of the per-turn ratio. Why: the do_bench ratios of the
    256-4096-row cells moved by up to 8 % between calls, the turns' by 0.3-1.6 % (benchmarks/config_ab.py), and a
    busy server runs its kernels back to back."""
    t = time_interleaved(calls, reps=turns)
    row["sustained"] = {"turns": turns, "cublas_us": statistics.median(t["cublas_us"]),
                        "repacked_us": statistics.median(t["repacked_us"]),
                        "x_cublas": statistics.median(c / r for c, r in zip(t["cublas_us"], t["repacked_us"]))}


def bench_shape(K, N, ms, sms, results, deadline, on_row=lambda: None, repacked=True, table_only=False,
                paired: int = 0):
    log(f"== shape K={K} N={N}")
    n_int4 = sets_needed(awq_bytes(1, N, K))
    awq_sets = [dispatch.random_awq(K, N, GROUP, DTYPE, "cuda") for _ in range(n_int4)]
    packed_sets = None
    if repacked and repacked_dispatch.supported(K, N, GROUP, DTYPE, "cuda"):
        packed_sets = [repacked_dispatch.repack(w[0]) for w in awq_sets]
    n_bf16 = sets_needed(K * N * 2)
    w_sets = [torch.randn(N, K, device="cuda", dtype=DTYPE) * 0.02 for _ in range(n_bf16)]
    try:
        i4_sets = int4pack_sets(N, K, n_int4)
    except Exception as e:  # noqa: BLE001
        log("int4pack unavailable:", repr(e)[:200])
        i4_sets = None
    for M in ms:
        if time.time() > deadline:
            log("deadline reached, skipping the rest")
            return
        row = {"K": K, "N": N, "M": M, "variants": {}, "configs": []}
        xs = [torch.randn(M, K, device="cuda", dtype=DTYPE) for _ in range(max(n_int4, n_bf16))]
        row["cublas_us"] = time_calls([lambda x=x, w=w: torch.matmul(x, w.t()) for x, w in zip(xs, w_sets)])
        if i4_sets is not None:
            try:
                row["int4pack_us"] = time_calls([lambda x=x, s=s: torch.ops.aten._weight_int4pack_mm(x, s[0], GROUP, s[1])
                                                 for x, s in zip(xs, i4_sets)])
            except Exception as e:  # noqa: BLE001
                log("int4pack failed:", repr(e)[:200])
                row["int4pack_us"] = float("nan")
        best = (float("inf"), None)
        cands = [dispatch.select_config(M, N, K, GROUP, DTYPE, torch.device("cuda"))] if table_only else \
            dispatch.candidates(M, N, K, GROUP, sms)
        for cfg in cands:
            try:
                us = time_calls([lambda x=x, w=w, cfg=cfg: dispatch.run_config(cfg, x, *w, GROUP)
                                 for x, w in zip(xs, awq_sets)])
            except Exception as e:  # noqa: BLE001
                log("  config failed", cfg, repr(e)[:300])
                us = float("inf")
            row["configs"].append((us, cfg))
            v = cfg["kernel"]
            if us < row["variants"].get(v, (float("inf"),))[0]:
                row["variants"][v] = (us, cfg)
            if us < best[0]:
                best = (us, cfg)
        row["ours_us"], row["best"] = best
        # correctness of the chosen config, fresh inputs, fp64 reference
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        qw, qz, sc = awq_sets[0]
        out = torch.full((M, N), float("nan"), device="cuda", dtype=DTYPE)
        y = dispatch.run_config(best[1], x, qw, qz, sc, GROUP, out=out)
        row["rel_err"] = rel_err(y, ref_fp64(x, qw, qz, sc, GROUP))
        row["all_written"] = bool(torch.isfinite(y).all())
        row["roofline_us"] = awq_bytes(M, N, K) / BW * 1e6
        if packed_sets is not None:
            bench_repacked(row, M, N, K, xs, awq_sets, packed_sets, table_only)
            if paired and "repacked_us" in row:
                paired_retime(row, xs, w_sets, awq_sets, packed_sets, paired)
        results.append(row)
        on_row()  # every row on disk at once: a cut-off run keeps what it measured
        i4 = row.get("int4pack_us", float("nan"))
        log(f"K={K:5d} N={N:5d} M={M:4d} cublas {row['cublas_us']:8.1f} int4 {i4:8.1f} ours {best[0]:8.1f} "
            f"x{row['cublas_us'] / best[0]:.2f} {best[1]['kernel']:7s} err {row['rel_err']:.1e} "
            + " ".join(f"{k}={v[0]:.1f}" for k, v in row["variants"].items())
            + (f" | repacked {row['repacked_us']:.1f} x{row['cublas_us'] / row['repacked_us']:.2f} "
               f"{row['repacked_best']['kernel']} err {row['repacked_rel_err']:.1e}" if "repacked_us" in row else ""))
    del awq_sets, w_sets, i4_sets, packed_sets
    torch.cuda.empty_cache()


def keep_unmeasured(table: dict, older: dict) -> dict:
    """Keep an earlier table's configs for the shapes this run did not reach (a run cut by its budget), so
    the serving shapes never fall back to untuned defaults; ``meta`` says which shapes and from which run."""
    shape = lambda key: key.rsplit("/M", 1)[0]  # noqa: E731
    measured = {shape(k) for k in table["configs"]}
    kept = {k: v for k, v in older.get("configs", {}).items() if shape(k) not in measured}
    if kept:
        table["configs"].update(kept)
        table["meta"]["kept_from_earlier"] = {"commit": older.get("meta", {}).get("commit"),
                                              "shapes": sorted({shape(k) for k in kept})}
    return table


def tuned_table(results, meta):
    """Per-shape best config for every M bucket (unmeasured buckets take the lower measured one's), and the
    per-bucket kernel choice (majority over shapes) that defaults use for shapes not in the table."""
    best = {(r["K"], r["N"], dispatch.m_bucket(r["M"])): r["best"] for r in results if r["best"] is not None}
    configs, winners = {}, {}
    for K, N in sorted({(k, n) for k, n, _ in best}):
        measured = sorted(b for k, n, b in best if (k, n) == (K, N))
        for b in dispatch.M_BUCKETS:
            src = max([m for m in measured if m <= b], default=measured[0])
            configs[dispatch.key_str((b, N, K, GROUP, "bf16"))] = best[(K, N, src)]
            winners.setdefault(b, []).append(best[(K, N, src)]["kernel"])
    buckets = {str(b): Counter(v).most_common(1)[0][0] for b, v in winners.items()}
    return {"meta": meta, "bucket_kernels": buckets, "configs": configs}


def tuned_repacked_table(results, meta, older: dict) -> dict:
    """The repacked path's table (``kernels/tuned_repacked_<card>.json``): the best config per measured (K, N, M),
    ``older``'s entries kept for what this run did not measure."""
    configs = dict(older.get("configs", {}))
    for r in results:
        if r.get("repacked_best") is not None:
            configs[f"K{r['K']}/N{r['N']}/M{r['M']}"] = {**r["repacked_best"], "us": round(r["repacked_us"], 1)}
    return {"meta": {**meta, "source": "benchmarks/kernels.py (rows with repacked_us)"}, "configs": configs}


def markdown(results, meta):
    tag = suffix(meta)
    dt = meta.get("dtype", "bf16")
    sustained = any("sustained" in r for r in results)
    chosen = ("the config the repo's tables choose (`--table-only`: what `awq_linear` runs, no tuning in this run)"
              if meta.get("table_only") else "the best of `repacked_dispatch.candidates`")
    lines = [
        "## W4A16 kernels (`benchmarks/kernels.py`" + (f", {meta['device']}" if tag else "")
        + (", fp16 activations)" if dt == "fp16" else ")"), "",
        stamp(meta["device"], meta.get("commit"), meta.get("date")) + f" · torch {meta['torch']} · triton {meta['triton']}", "",
        f"{dt} activations (cuBLAS in {dt} too), group {GROUP}, AutoAWQ layout read directly. Median µs per call (`triton.testing.do_bench`), "
        + (f"every graph {meta['calls_per_graph']} calls (each contender's fresh random input sets, together 4x L2, "
           "repeated in turn: every call starts with cold L2, and every contender pays the graph's launch over the "
           "same number of calls). " if meta.get("calls_per_graph") else
           "several fresh random input sets per graph so every call starts with cold L2. ")
        + "Speedups are over cuBLAS "
        "(`x @ w.T`). Roofline = bytes moved / 3.0 TB/s (measured copy bandwidth "
        f"{meta['copy_tbps']:.2f} TB/s this run). Relative error of our output vs an fp64 reference in the last column. "
        "On sm_90 (bf16 or fp16) the engine runs the repacked path (weights in the tensor cores' fragment order, "
        f"`kernels/repacked_dispatch.py`): its columns are {chosen}, and the targets below are checked on the "
        "path the engine runs." + (" The AutoAWQ-layout columns are likewise the table's choice." if
                                  meta.get("table_only") else "")
        + ((f" From {meta.get('paired_from', 256)} rows" if meta.get("paired_from", 256) > 1 else " On every row")
           + f" cuBLAS and the repacked kernel are timed {meta['paired_rounds']} more times each in alternation (the "
           f"card's clocks drift between calls and within a row), and each of their cells is the median of its "
           f"{meta['paired_rounds'] + 1} timings." if meta.get("paired_rounds") else "")
        + (" The last column times the two again under sustained load: one graph replay of each in turn, back to "
           "back, 30 turns, the median of the per-turn ratio (`kernels.timing.time_interleaved`; it repeated within "
           "0.3-1.6 % between calls where do_bench ratios moved by up to 8 %)." if sustained else "")
        + (" fp16 runs the repacked table measured in bf16 (the same kernels but for the unpacking constant and the "
           "MMA's input type: same MMAs and loads, registers equal or fewer; a `K../N../M../fp16` entry where fp16 "
           "measured another winner); PyTorch's int4 kernel takes bf16 only, so its columns are empty (nan) here."
           if dt == "fp16" else ""),
        "",
    ]
    if meta.get("rows_from"):
        rf = meta["rows_from"]
        lines += [f"Measured in two device calls of one session: the rows of {', '.join(rf['shapes'])} come from the "
                  f"first ({rf['device']}, commit `{rf['commit']}`).", ""]
    lines += [
        "| K×N | M | cuBLAS µs | int4 (tinygemm) µs | ×cuBLAS | ours µs | ×cuBLAS | ×int4 | kernel | % roofline | rel err "
        "| repacked µs | ×cuBLAS | ×int4 | kernel | rel err |" + (" sustained ×cuBLAS |" if sustained else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"
        + ("---:|" if sustained else ""),
    ]
    for r in results:
        i4 = r.get("int4pack_us", float("nan"))
        rp = (f"{r['repacked_us']:.1f} | **{r['cublas_us'] / r['repacked_us']:.2f}** | {i4 / r['repacked_us']:.2f} | "
              f"{r['repacked_best']['kernel']} | {r['repacked_rel_err']:.1e}") if "repacked_us" in r else "– | – | – | – | –"
        if sustained:
            rp += f" | {r['sustained']['x_cublas']:.2f}" if "sustained" in r else " | –"
        lines.append(
            f"| {r['K']}×{r['N']} | {r['M']} | {r['cublas_us']:.1f} | {i4:.1f} | {r['cublas_us'] / i4:.2f} | "
            f"{r['ours_us']:.1f} | **{r['cublas_us'] / r['ours_us']:.2f}** | {i4 / r['ours_us']:.2f} | "
            f"{r['best']['kernel']} | {100 * r['roofline_us'] / r['ours_us']:.0f}% | {r['rel_err']:.1e} | {rp} |")
    lines += ["", "Targets on shapes with K·N ≥ 32M (issue #3), on the path the engine runs"
              + (" (do_bench, as the issue measures; then the sustained turns):" if sustained else ":"), "",
              "| target | shapes met | worst |" + (" met, sustained | worst, sustained |" if sustained else ""),
              "|---|---|---|" + ("---|---|" if sustained else "")]
    big = [r for r in results if r["K"] * r["N"] >= 32 * 2**20 and (r["K"], r["N"]) in ISSUE_SHAPES]
    checks = [("M=1 ≥ 2.8× cuBLAS", lambda r: r["M"] == 1, lambda r: r["cublas_us"] / engine_us(r), 2.8),
              ("M=1 ≥ 1.2× int4", lambda r: r["M"] == 1, lambda r: r.get("int4pack_us", float("nan")) / engine_us(r), 1.2),
              ("M=16 ≥ 2.2×", lambda r: r["M"] == 16, lambda r: r["cublas_us"] / engine_us(r), 2.2),
              ("M=64 ≥ 1.4×", lambda r: r["M"] == 64, lambda r: r["cublas_us"] / engine_us(r), 1.4),
              ("M≥256 ≥ 0.9×", lambda r: r["M"] >= 256, lambda r: r["cublas_us"] / engine_us(r), 0.9)]
    for name, sel, val, thr in checks:
        rs = [r for r in big if sel(r)]
        if not rs:
            continue
        vals = [val(r) for r in rs]
        if all(math.isnan(v) for v in vals):  # (PyTorch's int4 kernel on fp16: not measurable)
            continue
        met = sum(v >= thr for v in vals)
        worst = min(zip(vals, rs), key=lambda t: t[0])
        line = f"| {name} | {met}/{len(rs)} | {worst[0]:.2f} ({worst[1]['K']}×{worst[1]['N']}, M={worst[1]['M']}) |"
        if sustained and name != "M=1 ≥ 1.2× int4":  # (int4 is not in the turns)
            sv = [(r["sustained"]["x_cublas"], r) for r in rs if "sustained" in r]
            sw = min(sv, key=lambda t: t[0]) if sv else None
            line += (f" {sum(v >= thr for v, _ in sv)}/{len(sv)} | {sw[0]:.2f} ({sw[1]['K']}×{sw[1]['N']}, "
                     f"M={sw[1]['M']}) |" if sw else " – | – |")
        elif sustained:
            line += " – | – |"
        lines.append(line)
    lines += ["", f"![speedup vs M](kernels_speedup{tag}.png)", ""]
    return "\n".join(lines)


def plot(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["K"], r["N"]) for r in results}, key=lambda s: s[0] * s[1])
    cols = 3
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (K, N) in zip(axes.flat, shapes):
        rs = sorted([r for r in results if (r["K"], r["N"]) == (K, N)], key=lambda r: r["M"])
        Ms = [r["M"] for r in rs]
        ax.plot(Ms, [r["cublas_us"] / r.get("int4pack_us", float("nan")) for r in rs], "k--", label="torch int4 (tinygemm)")
        for v, st in (("decode", "o-"), ("swap", "D-"), ("splitk", "s-"), ("gemm", "^-"), ("dequant", "v-")):
            pts = [(r["M"], r["cublas_us"] / r["variants"][v][0]) for r in rs if v in r["variants"]]
            if pts:
                ax.plot(*zip(*pts), st, label=f"ours: {v}", alpha=0.8)
        ax.plot(Ms, [r["cublas_us"] / r["ours_us"] for r in rs], "r-", lw=2.5, alpha=0.5, label="ours (dispatched)")
        rp = [(r["M"], r["cublas_us"] / r["repacked_us"]) for r in rs if "repacked_us" in r]
        if rp:
            ax.plot(*zip(*rp), "b-", lw=2.5, alpha=0.6, label="ours, repacked (the engine on sm_90)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={K}, N={N}")
        ax.set_xlabel("M")
        ax.set_ylabel(f"speedup over cuBLAS {meta.get('dtype', 'bf16')}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"W4A16 g{GROUP} {meta.get('dtype', 'bf16')} on {meta['device']} · {meta['date']} · commit {meta['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(results, meta, out: Path, md: str, write_docs: bool) -> None:
    """Section, plot and (unless the run only timed the tables' choices) the tables under ``out``; with
    ``write_docs`` also docs/benchmarks.md and the repo's tables. The repacked table is the card's own
    (``tuned_repacked_<card>.json``); the AutoAWQ-layout table is the H100's, installed only from an H100 run."""
    card = repacked_dispatch.card_of(meta["device"])
    tables = []  # (file under out, repo path it is installed to or None, table)
    if not meta.get("table_only"):
        tables.append(("tuned_h100.json", Path(dispatch.TABLE_PATH) if card == "h100" else None,
                       keep_unmeasured(tuned_table(results, meta), dispatch.load_table())))
        rpath = repacked_dispatch.table_path(card)
        older = json.loads(rpath.read_text()) if rpath.exists() else {}
        tables.append((rpath.name, rpath, tuned_repacked_table(results, meta, older)))
    for name, _, table in tables:
        (out / name).write_text(json.dumps(table, indent=1, sort_keys=True))
    (out / "kernels_section.md").write_text(md)
    plot(results, out / f"kernels_speedup{suffix(meta)}.png", meta)
    if write_docs:
        write_section(f"kernels{suffix(meta)}", md)
        for _, repo_path, table in tables:
            if repo_path is not None:
                repo_path.write_text(json.dumps(table, indent=1, sort_keys=True))


def join_runs(files: list[Path], out: Path, write_docs: bool) -> int:
    """One table, section and plot from partial runs (rows keyed by shape and M; a later file wins)."""
    runs = [json.loads(f.read_text()) for f in files]
    metas = [r["meta"] for r in runs]
    if len({(m["commit"], m["device"]) for m in metas}) != 1:
        raise SystemExit(f"--join needs runs of one commit on one card, got {[(m['commit'], m['device']) for m in metas]}")
    rows = {(r["K"], r["N"], r["M"]): r for run in runs for r in run["results"]}
    shapes = [s for s in SHAPES if any(k[:2] == s for k in rows)]
    results = sorted(rows.values(), key=lambda r: (shapes.index((r["K"], r["N"])), r["M"]))
    meta = dict(metas[0])
    meta["joined_runs"] = [{"date": m["date"], "copy_tbps": m["copy_tbps"]} for m in metas]
    (out / "kernels_results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = markdown(results, meta)
    if len(files) > 1:
        md = md.replace("\n\n| K×N |", f"\n\nJoined from {len(files)} device calls of one session on one machine."
                        "\n\n| K×N |", 1)
    write_outputs(results, meta, out, md, write_docs)
    print(md)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"))
    ap.add_argument("--quick", action="store_true", help="two shapes, four M values")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x8192 (K x N)")
    ap.add_argument("--ms", default=None, help="e.g. 1,16,64")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this many seconds")
    ap.add_argument("--write-docs", action="store_true", help="also write docs/benchmarks.md and the repo tables")
    ap.add_argument("--no-repacked", action="store_true", help="leave out the repacked path (sm_90)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                    help="activations (and cuBLAS's weights): float16 times the bf16-tuned tables on fp16 inputs "
                         "(with --table-only; its own section in docs/benchmarks.md)")
    ap.add_argument("--calls", type=int, default=timing.GRAPH_CALLS,
                    help="calls in every timed graph, each contender's input sets repeated in turn (0: one call "
                         "per set, as runs before 2026-11-29's twenty-third session did)")
    ap.add_argument("--table-only", action="store_true",
                    help="time only the configs the repo's tables choose (what awq_linear runs), no tuning; "
                         "writes no tables")
    ap.add_argument("--paired", type=int, default=3,
                    help="on every row, time cuBLAS and the repacked choice again in alternation "
                         "this many rounds each and report each's median (0: off)")
    ap.add_argument("--also", default=None,
                    help="kernels_results.json of an earlier part of this session (same card): its rows for shapes "
                         "this run does not measure join this run's table, section and plot")
    ap.add_argument("--join", nargs="+", default=None,
                    help="kernels_results.json files of one commit on one card, measured in several device calls "
                         "(e.g. --ms 1,2 / 4-64 / 128-4096): write their joint table, section and plot, no GPU needed")
    args = ap.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    dtype_name = dispatch._dtype_name(DTYPE)  # (the tables' short names: bf16, fp16)
    if DTYPE != torch.bfloat16 and not (args.table_only or args.join):
        raise SystemExit("--dtype float16 times the tables' choices (tuned in bf16, shared by fp16): add --table-only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.join:
        return join_runs([Path(f) for f in args.join], out, args.write_docs)
    shapes = SHAPES
    ms = MS
    if args.quick:
        shapes, ms = [(4096, 4096), (8192, 8192)], [1, 16, 64, 1024]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    import triton

    dev = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = {"device": dev, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "commit": git_commit(), "group": GROUP,
            "dtype": dtype_name}
    meta["copy_tbps"] = copy_bandwidth() / 1e12
    meta["table_only"] = args.table_only
    timing.GRAPH_CALLS = meta["calls_per_graph"] = args.calls
    meta["paired_rounds"], meta["paired_from"] = args.paired, 1  # (earlier results: from 256 rows)
    log(json.dumps(meta))
    t0 = time.time()
    results = []
    torch.manual_seed(int(time.time()))
    def dump():
        results.sort(key=lambda r: (shapes.index((r["K"], r["N"])), r["M"]))
        (out / "kernels_results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    for K, N in sorted(shapes, key=lambda s: -s[0] * s[1]):  # target shapes first, in case the budget runs out
        bench_shape(K, N, ms, sms, results, t0 + args.budget_s, on_row=dump, repacked=not args.no_repacked,
                    table_only=args.table_only, paired=args.paired)
    if args.also and Path(args.also).exists():  # one benchmark split over two device calls
        done = {(r["K"], r["N"]) for r in results}
        earlier = json.loads(Path(args.also).read_text())
        extra = [r for r in earlier["results"] if (r["K"], r["N"]) not in done]
        meta["rows_from"] = {"commit": earlier["meta"].get("commit"), "date": earlier["meta"].get("date"),
                             "device": earlier["meta"].get("device"),
                             "shapes": sorted({f"{r['K']}x{r['N']}" for r in extra})}
        shapes = list(dict.fromkeys(shapes + [(r["K"], r["N"]) for r in extra]))
        results.extend(extra)
        dump()
    md = markdown(results, meta)
    write_outputs(results, meta, out, md, args.write_docs)
    log(md)
    log(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
