"""Probe of the kernels on fragment-repacked weights on one GPU, side by side in one call; source of
``kernels/tuned_repacked_<card>.json`` (h100, h200).

    RAYAWQ_COMMIT=<hash> python3 benchmarks/gluon_probe.py --out $OUT [--ms 1,16,64] [--skip-dot] [--skip-mma]
    python3 benchmarks/gluon_probe.py --report a.json b.json ...   # docs/benchmarks.md section + docs/repacked_probe.png

For each of the issue's four large shapes and M in ``--ms``: correctness of every config against an fp64
reference (fresh inputs, poisoned output), then cold-L2 median µs (``kernels.timing``) of the register-operand
Gluon kernel (M <= 128), the ``tl.dot`` kernel (M >= 32), the warpgroup-MMA Gluon kernel (M >= 16) and dequantize
+ cuBLAS (M >= 128) on the repacked words, the AutoAWQ-layout table's config, PyTorch's int4 kernel and cuBLAS.
Writes ``gluon_probe.json`` under ``--out``.

``read_us`` is the floor the memory system allows in the same harness: the best of a plain streaming-read kernel
(a sweep of programs and block sizes) and ``torch.sum`` over a buffer of the layer's bytes (words, scales,
zeros), cold L2, in a graph like the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

from benchmarks.kernels import int4pack_sets, ref_fp64, rel_err  # noqa: E402
from kernels import dispatch, repacked_dispatch  # noqa: E402
from kernels.awq_gluon_mma import gluon_mma  # noqa: E402
from kernels.awq_gluon_pipelined import gluon_pipelined, pairs_fit  # noqa: E402
from kernels.awq_gluon_wgmma import gluon_wgmma  # noqa: E402
from kernels.awq_repack import repack_awq  # noqa: E402
from kernels.awq_repacked_dot import dequant_matmul_repacked, dequantize_repacked, dot_repacked  # noqa: E402
from kernels.timing import sets_needed, time_calls  # noqa: E402

SHAPES = [(4096, 14336), (8192, 8192), (14336, 4096), (8192, 28672)]
G = 128


@triton.jit
def _stream_read(p, out, n_words, ITERS, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Each program reads ``ITERS`` consecutive blocks of 16-byte-aligned words and xors them (one store).
    ``PDL``: launched early (``launch_pdl``) and releasing the next launch at once, as the small-M kernel is: its
    first block is read before ``griddepcontrol.wait``, the rest after (as the kernel requests only its first
    step's weights before the wait: reading everything before it would let consecutive calls on one buffer
    share its lines in L2)."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    offs = pid * ITERS * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(p + offs, mask=offs < n_words, other=0)
    if PDL:
        gdc_wait()
    for i in range(1, ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(acc, 0))


def int4_bytes(K: int, N: int, group: int = G) -> int:
    """Bytes of a ``K x N`` AWQ weight: 4-bit words, bf16 scales and 4-bit zero points per group."""
    return K * N // 2 + (K // group) * N * 5 // 2


def read_floor(nbytes: int, pdl: bool = False) -> tuple[float, str]:
    """Best cold-L2 µs to read ``nbytes`` once: streaming kernel sweep and ``torch.sum``; (µs, how). ``pdl``: the
    streaming kernel under programmatic dependent launch (each call's first block may be read while the call
    before ends, as the small-M kernel's first step is; no ``torch.sum``)."""
    words = -(-nbytes // 4)
    bufs = [torch.randint(0, 1 << 30, (words,), device="cuda", dtype=torch.int32) for _ in range(sets_needed(nbytes))]
    out = torch.empty(1 << 16, device="cuda", dtype=torch.int32)
    best = (float("inf"), "") if pdl else (time_calls([lambda b=b: b.view(torch.float16).sum() for b in bufs]),
                                           "torch.sum")
    for block, warps in ((1024, 4), (2048, 8), (4096, 8)):
        for programs in (132, 264, 528, 1056, 2112, 4224):
            iters = triton.cdiv(words, block * programs)
            grid = (triton.cdiv(words, block * iters),)
            us = time_calls([lambda b=b: _stream_read[grid](b, out, words, iters, BLOCK=block, PDL=pdl,
                                                            num_warps=warps, launch_pdl=pdl) for b in bufs])
            if us < best[0]:
                best = (us, f"stream {grid[0]} programs x {block} words, {warps} warps" + (", PDL" if pdl else ""))
    return best


def gluon_configs(M: int, N: int) -> list[dict]:
    """The probe's Gluon configs for ``M`` rows (register-lean ones: BM 16 with T 4 spills on sm_90)."""
    if M <= 8:
        cfgs = [dict(T=t, num_warps=w, split_k=s, SCALED=sc, TAIL=tail) for t, w in ((2, 4), (4, 4), (1, 8))
                for s in (8, 16) for sc in (False, True) for tail in (True, False)]
        cfgs += [dict(T=t, num_warps=w, split_k=28, SCALED=sc, TAIL=False) for t, w in ((2, 4), (1, 8))
                 for sc in (False, True)]  # 3-4 groups a split at K = 8192-14336 (the scaled 2 x 4 one: below)
        cfgs += [dict(T=t, num_warps=4, split_k=s, SCALED=True, TAIL=tail) for t, s in ((1, 8), (1, 16), (2, 28))
                 for tail in (True, False)]
    elif M <= 16:
        cfgs = [dict(BM=16, T=t, num_warps=w, split_k=s, SCALED=sc) for t, w in ((2, 4), (1, 8), (2, 8))
                for s in (2, 4, 8, 16) for sc in (False, True)]
        cfgs += [dict(BM=16, T=t, num_warps=w, split_k=s, SCALED=True, TAIL=False) for t, w in ((1, 4), (1, 8))
                 for s in (8, 16)]
    else:  # warps along the rows of x too (WM): at 64 rows one warp cannot hold x's operand and the accumulator
        tiles = ((32, 1, 4, 1), (32, 2, 4, 2), (32, 2, 2, 2)) if M <= 32 else (
            ((64, 1, 4, 2), (64, 1, 4, 4), (64, 2, 2, 4)) if M <= 64 else ((128, 1, 4, 4), (64, 1, 4, 2)))
        cfgs = [dict(BM=bm, T=t, num_warps=w, WM=wm, split_k=s, SCALED=True) for bm, t, w, wm in tiles
                for s in (1, 2, 4)]
    if M <= 16:  # split-K summed in the last split's registers, from fewer splits up
        cfgs += [dict(**({"BM": 16} if M > 8 else {}), T=t, num_warps=4, split_k=s, SCALED=True, TAIL=2)
                 for t in (1, 2) for s in (2, 4, 8, 16, 28)]
    return [c for c in cfgs if N % (16 * c["num_warps"] * c["T"]) == 0]


def gluon_value(cfg: dict, key: str) -> int:
    """``cfg[key]`` as an int, or the Gluon launcher's default where the config leaves it out (``TAIL`` 1, the
    flags 0): what ``--tails`` and ``--where`` filter on."""
    return int(cfg.get(key, 1 if key == "TAIL" else 0))


def pipe_configs(M: int, N: int, splits: tuple[int, ...] | None = None, pair: bool = False,
                 tiles: tuple[tuple[int, int, int, int], ...] | None = None) -> list[dict]:
    """Configs of the pipelined register-A ``wgmma`` kernel (``kernels/awq_gluon_pipelined.py``) for ``M`` rows:
    (BB rows, W warps, T tiles per warp, STAGES) with splits that keep the GPU's SMs busy at small M (``splits``
    instead, if given; ``tiles`` instead of the rule's tiles, if given); ``pair``: each config with an even
    ``STAGES`` of 4 or more also with ``PAIR`` (x's buffers filled two steps at a time; group 128, 64-feature
    steps)."""
    if M <= 64:
        rule = ((64, 4, 1, 4), (64, 8, 1, 4), (64, 4, 2, 4)), (1, 2, 4, 8)
    elif M <= 128:
        rule = ((128, 4, 1, 4), (128, 8, 1, 4), (128, 4, 2, 4)), (1, 2, 4)
    elif M <= 256:  # split 4 too: N = 4096 has only 32-64 feature tiles
        rule = ((256, 8, 1, 4), (128, 8, 1, 4), (128, 4, 2, 4), (256, 4, 1, 3), (128, 4, 1, 4)), (1, 2, 4)
    else:
        rule = ((256, 8, 1, 4), (256, 8, 1, 3), (128, 8, 2, 3), (256, 4, 1, 3), (128, 4, 2, 4)), (1,)
    tiles, splits = tiles or rule[0], splits or rule[1]
    cfgs = [dict(BB=bb, W=w, T=t, STAGES=st, split_k=s, DEPTH=d) for bb, w, t, st in tiles for s in splits
            for d in ((1,) if M >= 256 else (1, 0))]  # DEPTH 0 never won from 256 rows (H100, H200)
    # split-K partials summed by each tile's last program (from memory: 1, in its registers: 2) instead of a
    # second launch
    cfgs += [{**c, "TAIL": t} for c in cfgs if c["split_k"] > 1 for t in (1, 2)]
    if M >= 256:  # the tiles of a partly filled last wave split along K (SLOTS: programs one SM holds)
        cfgs += [{**c, "SLOTS": repacked_dispatch.pipelined_slots(c["BB"], c["W"], c["STAGES"])} for c in cfgs
                 if c["split_k"] == 1]
    if pair:
        cfgs += [{**c, "PAIR": True} for c in cfgs if pairs_fit(G, min(64, G), c["STAGES"])]
    return [c for c in cfgs if N % (16 * c["W"] * c["T"]) == 0]


def dot_configs(M: int) -> list[dict]:
    """Configs of the tensor-core kernel on repacked weights (``kernels/awq_repacked_dot.py``) for ``M`` rows."""
    if M <= 64:
        base = [dict(BM=bm, BN=bn, num_warps=w, num_stages=st, split_k=s) for bm, bn, w, st in
                ((32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 3)) for s in (1, 4)]
    else:
        base = [dict(BM=bm, BN=bn, num_warps=w, num_stages=st, split_k=s)
                for bm, bn, w, st in ((64, 128, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 2))
                for s in (1,)]
    return [{**c, "SCALE_AFTER": sa, "PREFETCH": pf} for c in base for sa, pf in ((True, False), (True, True),
                                                                                   (False, False))]


def dequant_configs() -> list[dict]:
    """Dequantize + cuBLAS variants: the weight written ``[K, N]`` (``x @ W``) or ``[N, K]`` (``NK``: ``x @ W^T``,
    cuBLAS's "TN" operand order, as the bf16 baseline), by tiles of 64-256 columns."""
    return [dict(NK=nk, BN=bn, num_warps=w) for nk in (0, 1) for bn, w in ((64, 4), (128, 4), (128, 8), (256, 8))]


def dequant_parts(cfg: dict, K: int, N: int, xs, packed, sets, wb) -> dict:
    """Where dequantize + cuBLAS spends its time, each part timed alone like the whole: the dequantize kernel
    (with its read + write bandwidth), cuBLAS on the dense weight in the layout ``cfg`` writes, and a plain copy
    of the bf16 weight (the copy ceiling)."""
    dq = {k: v for k, v in cfg.items() if k != "NK"}
    only = time_calls([lambda p=p, s=s: dequantize_repacked(p, s[1], s[2], G, torch.bfloat16, nk=bool(cfg["NK"]), **dq)
                       for p, s in zip(packed, sets)])
    dense = [dequantize_repacked(p, s[1], s[2], G, torch.bfloat16, nk=bool(cfg["NK"]), **dq) for p, s in zip(packed, sets)]
    mm = time_calls([lambda x=x, w=w: x @ (w.t() if cfg["NK"] else w) for x, w in zip(xs, dense)])
    copy = time_calls([lambda w=w: w.clone() for w in wb])
    moved = int4_bytes(K, N) + K * N * 2
    return {"dequant_only_us": only, "dequant_tbs": moved / only / 1e6, "dequant_cublas_us": mm,
            "copy_us": copy, "copy_tbs": 4 * K * N / copy / 1e6}


def variant_fits(cfg: dict, variant: dict) -> bool:
    """Whether an ``--also`` variant applies to a Gluon config: ``XSUM_MMA`` (the sum of x by a ones ``mma``) and
    ``ZSUB`` (zero points off in the fragments) only where the loop is unscaled, not both; ``XREADY`` only with x
    staged (whether the split fits one chunk, the launcher decides: a config it refuses is reported, not timed);
    ``PREFETCH = 2`` (the next group's set) only with ``ZSUB``."""
    merged = {**cfg, **variant}
    if (merged.get("XSUM_MMA") or merged.get("ZSUB")) and merged.get("SCALED"):
        return False
    if merged.get("PREFETCH") == 2 and not merged.get("ZSUB"):
        return False
    return not (merged.get("XSUM_MMA") and merged.get("ZSUB")) and not (merged.get("XREADY")
                                                                         and not merged.get("XGROUPS"))


def best_of(cfgs: list[dict], launch, xs, packed, sets) -> tuple[float, dict | None, dict]:
    """Best cold-L2 µs of ``launch(x, packed, set, cfg)`` over ``cfgs``; (µs, cfg, all)."""
    best, timed = (float("inf"), None), {}
    for c in cfgs:
        us = time_calls([lambda x=x, p=p, s=s, c=c: launch(x, p, s, c) for x, p, s in zip(xs, packed, sets)])
        timed[str(c)] = us
        if us < best[0]:
            best = (us, c)
    return best[0], best[1], timed


# dequantize + cuBLAS allocates a K x N bf16 weight per call (470 MB at 8192 x 28672): the table takes it only
# where it beats the best fused kernel of its row by more than this
DEQUANT_MARGIN = 0.05


def row_choice(r: dict) -> tuple[float | None, dict]:
    """What the table runs for a probe row, and its µs: the row's fastest kernel and config, except that
    dequantize + cuBLAS must beat the pipelined kernel by more than ``DEQUANT_MARGIN`` and that rows whose
    fastest was the warp-specialized kernel (timed on 2026-11-28, since removed) take their pipelined best."""
    best, us = dict(r.get("repacked_best") or {}), r.get("repacked_best_us")
    pipe = (r["pipe_us"], {"kernel": "pipelined", **r["pipe_cfg"]}) if r.get("pipe_cfg") else None
    if best.get("kernel") == "ws" or (best.get("kernel") == "dequant_repacked" and pipe
                                      and pipe[0] <= us * (1 + DEQUANT_MARGIN)):
        return pipe
    return us, best


def _repacked_us(row: dict) -> tuple[float, str]:
    """A row's best kernel on the repacked weights and its name (older rows timed the Gluon kernel only)."""
    if "repacked_best_us" in row:
        us, best = row_choice(row)
        return us, best.get("kernel", "gluon" + (" scaled" if best.get("SCALED") else ""))
    return row["gluon_us"], "gluon"


def latest_rows(paths: list[str]) -> dict[tuple[int, int, int], dict]:
    """Per (K, N, M) the row of the last file that measured it (pass the files oldest first): every cell is one
    call's side-by-side timing of the code of that run, not the best of several runs (cuBLAS alone moved by up
    to ~20 % between the H100s of different calls)."""
    rows = {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        for r in d["rows"]:
            rows[(r["K"], r["N"], r["M"])] = {**r, "device": d["device"]}
    return rows


_TABLE_NAMES = {"dot_repacked": "dot", "gluon_wgmma": "wgmma", "dequant_repacked": "dequant"}


def table_entries(paths: list[str]) -> dict[str, dict]:
    """``kernels/tuned_repacked_<card>.json`` entries (``K{K}/N{N}/M{M}``) from the rows of :func:`latest_rows`:
    each row's :func:`row_choice`, named as ``kernels.repacked_dispatch.run`` takes them."""
    out = {}
    for (K, N, M), r in latest_rows(paths).items():
        us, best = row_choice(r)
        if not best:
            continue
        best["kernel"] = _TABLE_NAMES.get(best.get("kernel"), best.get("kernel", "gluon"))
        out[f"K{K}/N{N}/M{M}"] = {**best, "us": round(us, 1)}
    return out


def report(paths: list[str], commit: str) -> str:
    """Join probe files (per K, N, M the fastest repacked kernel, with the table's kernel, cuBLAS and int4 timed in
    the same call), write ``docs/repacked_probe.png`` and return the markdown section."""
    from benchmarks._report import DOCS, card_suffix

    best: dict[tuple[int, int, int], dict] = {}
    device = "?"
    for key, r in latest_rows(paths).items():
        us, name = _repacked_us(r)
        best[key] = {"us": us, "name": name, "table": r["table_us"], "table_kernel": r["table_kernel"],
                     "cublas": r["cublas_us"], "int4": r["int4_us"]}
        device = r["device"]
    shapes = sorted({(k, n) for k, n, _ in best}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
    tag = card_suffix(device)
    lines = [f"Device: {device} · date: {datetime.date.today().isoformat()} · commit: `{commit}` (probe runs "
             "on that tree's kernels; raw `benchmarks/results/gluon_probe_*.json`; each cell is the latest "
             f"call that measured it, from: {', '.join(f'`{Path(p).stem}`' for p in paths)})", "",
             "The engine's path on sm_90 GPUs (bf16 or fp16; probed in bf16) (`EngineConfig.repack_weights`, on by default): the "
             "weights repacked at load time into the `mma.m16n8k16` fragment order (`kernels/awq_repack.py`, the "
             "only copy kept), read by the register-operand Gluon kernel (`kernels/awq_gluon_mma.py`) at small M, "
             "the warpgroup-MMA Gluon kernel (`kernels/awq_gluon_wgmma.py`) at 32 rows, the pipelined register-operand "
             "`wgmma` kernel (`kernels/awq_gluon_pipelined.py`) from 64 rows, dequantize + cuBLAS "
             "(`kernels/awq_repacked_dot.py`) where it measured faster, as `kernels/tuned_repacked_<card>.json` "
             "(these cells) says. "
             "Each cell is the fastest of those kernels and configs, beside the AutoAWQ-layout table's kernel "
             "(what other GPUs run, and fp16 before commit 90f5b82), cuBLAS and PyTorch's int4 kernel timed in "
             "the same call (cold L2, CUDA graph, median). Notes: `docs/kernels_notes.md`.", "",
             "| K×N | M | cuBLAS µs | int4 µs | table kernel µs | repacked µs | repacked kernel | ×cuBLAS (table) "
             "| ×cuBLAS (repacked) | ×int4 (repacked) |", "|---|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    for K, N in shapes:
        for M in sorted(m for k, n, m in best if (k, n) == (K, N)):
            b = best[(K, N, M)]
            lines.append(f"| {K}×{N} | {M} | {b['cublas']:.1f} | {b['int4']:.1f} | {b['table_kernel']} "
                         f"{b['table']:.1f} | **{b['us']:.1f}** | {b['name']} | {b['cublas'] / b['table']:.2f} | "
                         f"**{b['cublas'] / b['us']:.2f}** | {b['int4'] / b['us']:.2f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), sharey=True)
        for ax, (K, N) in zip(list(axes) if len(shapes) > 1 else [axes], shapes):
            ms = sorted(m for k, n, m in best if (k, n) == (K, N))
            ax.plot(ms, [best[(K, N, m)]["cublas"] / best[(K, N, m)]["table"] for m in ms], "o-",
                    label="table (AutoAWQ layout)")
            ax.plot(ms, [best[(K, N, m)]["cublas"] / best[(K, N, m)]["us"] for m in ms], "s-", label="repacked")
            ax.plot(ms, [best[(K, N, m)]["cublas"] / best[(K, N, m)]["int4"] for m in ms], "^--",
                    label="PyTorch int4")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"K={K}, N={N}")
            ax.set_xlabel("M (rows)")
        (axes[0] if len(shapes) > 1 else axes).set_ylabel("speedup over cuBLAS bf16")
        (axes[0] if len(shapes) > 1 else axes).legend(fontsize=8)
        fig.suptitle(f"W4A16 on repacked weights vs the AutoAWQ-layout kernels, {device}")
        fig.tight_layout()
        tmp = DOCS / f"repacked_probe{tag}.tmp.png"
        fig.savefig(tmp, dpi=110)
        tmp.replace(DOCS / f"repacked_probe{tag}.png")
        lines += ["", f"![speedup over cuBLAS vs M](repacked_probe{tag}.png)"]
    except ImportError:
        pass
    return (f"## W4A16 on fragment-repacked weights (`benchmarks/gluon_probe.py`{', ' + device if tag else ''})\n\n"
            + "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", nargs="+", help="probe JSON files (oldest first) to join into docs/benchmarks.md "
                    "(no GPU)")
    ap.add_argument("--table", nargs="+", help="probe JSON files (oldest first) whose rows' fastest configs go "
                    "into kernels/tuned_repacked_<card>.json, the card named by the last file (no GPU)")
    ap.add_argument("--commit", default=None, help="commit the probe runs measured (default: this checkout's)")
    ap.add_argument("--out", default="/tmp/gluon_probe")
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--skip-dot", action="store_true", help="leave out the tl.dot kernel on repacked weights")
    ap.add_argument("--skip-mma", action="store_true", help="leave out the register-operand Gluon kernel")
    ap.add_argument("--skip-wgmma", action="store_true", help="leave out the unpipelined warpgroup-MMA kernel")
    ap.add_argument("--skip-pipe", action="store_true", help="leave out the pipelined register-A wgmma kernel")
    ap.add_argument("--pipe-tiles", default=None, help="these pipelined tiles instead of the M rule's, e.g. "
                    "256/8/1/4,256/4/1/3 (BB/W/T/STAGES)")
    ap.add_argument("--pipe-splits", default=None, help="pipelined split-K values instead of the M rule, e.g. 1,2")
    ap.add_argument("--pair", action="store_true", help="pipelined configs also with PAIR (x's buffers filled two "
                    "steps at a time)")
    ap.add_argument("--tails", default=None, help="only Gluon and pipelined configs with these TAIL values "
                    "(0: a second launch sums the splits; 1, 2: the last program), e.g. 0,2")
    ap.add_argument("--gluon-splits", default=None, help="every Gluon config at these split-K values instead of "
                    "its own, e.g. 4,6,8")
    ap.add_argument("--xgroups", default=None, help="every Gluon config with x staged in shared memory this many "
                    "groups at a time (the kernel's XGROUPS; 0: not staged), e.g. 0,4,64")
    ap.add_argument("--where", default=None, help="only the Gluon configs with these values (a missing key is the "
                    "launcher's default), e.g. SCALED=0")
    ap.add_argument("--also", default=None, help="every Gluon config also as each of these variants (flags joined "
                    "by +, a bare name set True), e.g. PREFETCH,XGROUPS=64+XSUM_MMA (XSUM_MMA only "
                    "where unscaled)")
    ap.add_argument("--shapes", default=None, help="e.g. 8192x8192,4096x14336 (K x N; default the four large)")
    a = ap.parse_args()
    if a.table:
        device = json.loads(Path(a.table[-1]).read_text())["device"]
        path = repacked_dispatch.table_path(repacked_dispatch.card_of(device))
        table = json.loads(path.read_text()) if path.exists() else {
            "meta": {"device": device, "dtype": "bf16", "group": 128, "source": "benchmarks/gluon_probe.py runs: "
                     "per (K, N, M) the fastest repacked kernel and config (shapes not measured on this card read "
                     "the H100 table)"}, "configs": {}}
        new = table_entries(a.table)
        table["configs"].update(new)
        table["meta"]["source"] += f"; {len(new)} entries from {', '.join(Path(p).name for p in a.table)}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
        print(f"{len(new)} entries into {path}")
        if not a.report:
            return 0
    if a.report:
        from benchmarks._report import card_suffix, git_commit, write_section

        device = json.loads(Path(a.report[-1]).read_text())["device"]
        write_section("repacked" + card_suffix(device), report(a.report, a.commit or git_commit()))
        return 0
    out = Path(a.out)
    tails = {int(v) for v in a.tails.split(",")} if a.tails else None
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in a.shapes.split(",")] if a.shapes else SHAPES
    for K, N in shapes:
        n = sets_needed(K * N // 2)
        sets = [dispatch.random_awq(K, N, G, torch.bfloat16, "cuda") for _ in range(n)]
        packed = [repack_awq(s[0]) for s in sets]
        wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets_needed(K * N * 2))]
        i4 = int4pack_sets(N, K, n)
        for M in [int(m) for m in a.ms.split(",")]:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(n, len(wb)))]
            row = {"K": K, "N": N, "M": M}
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = ref_fp64(x, *sets[0], G)
            errs = {}
            gl_cfgs = gluon_configs(M, N) if M <= 128 and not a.skip_mma else []
            if tails is not None:
                gl_cfgs = [c for c in gl_cfgs if gluon_value(c, "TAIL") in tails]
            for cond in a.where.split(",") if a.where else ():
                k, v = cond.split("=")
                gl_cfgs = [c for c in gl_cfgs if gluon_value(c, k) == int(v)]
            if a.gluon_splits:  # every Gluon config at each of these split-K values instead (duplicates dropped)
                gl_cfgs = list({json.dumps({**c, "split_k": int(v)}, sort_keys=True): {**c, "split_k": int(v)}
                                for c in gl_cfgs for v in a.gluon_splits.split(",")}.values())
            if a.xgroups:
                gl_cfgs = [{**c, **({"XGROUPS": int(v)} if int(v) else {})} for c in gl_cfgs
                           for v in a.xgroups.split(",")]
            variants = [dict((f.split("=")[0], int(f.split("=")[1]) if "=" in f else True) for f in v.split("+"))
                        for v in a.also.split(",")] if a.also else []
            gl_cfgs += [{**c, **v} for v in variants for c in gl_cfgs if variant_fits(c, v)]
            wg_cfgs = [dict(BN=bn, split_k=s) for bn in (64, 128) for s in (1, 2, 4, 8, 16)] \
                if M >= 16 and not a.skip_wgmma else []
            pipe_cfgs = pipe_configs(M, N, a.pipe_splits and tuple(int(v) for v in a.pipe_splits.split(",")),
                                     a.pair, a.pipe_tiles and tuple(tuple(int(v) for v in t.split("/"))
                                                                    for t in a.pipe_tiles.split(","))) \
                if M >= 16 and not a.skip_pipe else []
            if tails is not None:
                pipe_cfgs = [c for c in pipe_cfgs if c.get("TAIL", 0) in tails]
            dot_cfgs = dot_configs(M) if M >= 32 and not a.skip_dot else []
            launches = [(c, lambda x, p, s, c: gluon_mma(x, p, s[1], s[2], G, **c)) for c in gl_cfgs]
            launches += [(c, lambda x, p, s, c: dot_repacked(x, p, s[1], s[2], G, **c)) for c in dot_cfgs]
            launches += [(c, lambda x, p, s, c: gluon_wgmma(x, p, s[1], s[2], G, **c)) for c in wg_cfgs]
            launches += [(c, lambda x, p, s, c: gluon_pipelined(x, p, s[1], s[2], G, **c)) for c in pipe_cfgs]
            dq_cfgs = dequant_configs() if M >= 1024 else []  # 0.5-0.8x of the fused kernels below
            launches += [({"dequant": True, **c}, lambda x, p, s, c: dequant_matmul_repacked(
                x, p, s[1], s[2], G, **{k: v for k, v in c.items() if k != "dequant"})) for c in dq_cfgs]
            for c, f in launches:
                o = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                try:
                    y = f(x, packed[0], sets[0], c) if "dequant" in c else f(x, packed[0], sets[0], {**c, "out": o})
                except Exception as e:  # a config that does not build (shared memory, registers) is reported
                    print(f"  {c}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    errs[str(c)] = float("inf")
                    continue
                errs[str(c)] = rel_err(y, ref) if torch.isfinite(y).all() else float("inf")
            row["rel_err"] = errs
            best = (float("inf"), None)
            if gl_cfgs:
                ok = [c for c in gl_cfgs if errs[str(c)] <= 1e-2]  # a wrong or refused config is reported, not timed
                us, c, row["gluon_all_us"] = best_of(ok, lambda x, p, s, c: gluon_mma(x, p, s[1], s[2], G, **c),
                                                     xs, packed, sets)
                row["gluon_us"], row["gluon_cfg"] = us, c
                best = min(best, (us, c), key=lambda t: t[0])
            if dot_cfgs:
                us, c, row["dot_all_us"] = best_of(dot_cfgs, lambda x, p, s, c: dot_repacked(x, p, s[1], s[2], G, **c),
                                                   xs, packed, sets)
                row["dot_us"], row["dot_cfg"] = us, c
                best = min(best, (us, {"kernel": "dot_repacked", **c}), key=lambda t: t[0])
            if wg_cfgs:
                us, c, row["wgmma_all_us"] = best_of(wg_cfgs, lambda x, p, s, c: gluon_wgmma(x, p, s[1], s[2], G, **c),
                                                     xs, packed, sets)
                row["wgmma_us"], row["wgmma_cfg"] = us, c
                best = min(best, (us, {"kernel": "gluon_wgmma", **c}), key=lambda t: t[0])
            if pipe_cfgs:
                ok = [c for c in pipe_cfgs if errs[str(c)] <= 1e-2]  # a wrong config is reported, not timed
                us, c, row["pipe_all_us"] = best_of(ok, lambda x, p, s, c: gluon_pipelined(x, p, s[1], s[2], G, **c),
                                                    xs, packed, sets)
                row["pipe_us"], row["pipe_cfg"] = us, c
                if c is not None:
                    best = min(best, (us, {"kernel": "pipelined", **c}), key=lambda t: t[0])
            if dq_cfgs:
                us, c, row["dequant_all_us"] = best_of(
                    dq_cfgs, lambda x, p, s, c: dequant_matmul_repacked(x, p, s[1], s[2], G, **c), xs, packed, sets)
                row["dequant_repacked_us"], row["dequant_cfg"] = us, c
                best = min(best, (us, {"kernel": "dequant_repacked", **c}), key=lambda t: t[0])
                row.update(dequant_parts(c, K, N, xs, packed, sets, wb))
            row["repacked_best_us"], row["repacked_best"] = best
            cfg = dispatch.select_config(M, N, K, G, torch.bfloat16, torch.device("cuda"))
            row["table_us"] = time_calls([lambda x=x, s=s: dispatch.run_config(cfg, x, *s, G) for x, s in zip(xs, sets)])
            row["table_kernel"] = cfg["kernel"]
            rcfg = repacked_dispatch.select(M, N, K, G)
            row["repacked_table_us"] = time_calls([lambda x=x, p=p, s=s: repacked_dispatch.run(
                rcfg, x, p, s[1], s[2], G) for x, p, s in zip(xs, packed, sets)])
            row["repacked_table"] = rcfg
            if rcfg["kernel"] == "gluon":  # the table's own config as each --also variant, in the same call
                row["repacked_table_variants_us"] = {}
                for v in (v for v in variants if variant_fits(rcfg, v)):
                    try:
                        row["repacked_table_variants_us"][json.dumps(v, sort_keys=True)] = time_calls(
                            [lambda x=x, p=p, s=s, v=v: repacked_dispatch.run({**rcfg, **v}, x, p, s[1], s[2], G)
                             for x, p, s in zip(xs, packed, sets)])
                    except ValueError as e:  # a variant the launcher refuses for this config
                        print(f"  table config as {v}: {e}", flush=True)
            row["int4_us"] = time_calls([lambda x=x, s=s: torch.ops.aten._weight_int4pack_mm(x, s[0], G, s[1])
                                         for x, s in zip(xs, i4)])
            row["cublas_us"] = time_calls([lambda x=x, w=w: x @ w.t() for x, w in zip(xs, wb)])
            if M == 1:
                row["read_us"], row["read_how"] = read_floor(int4_bytes(K, N))
                row["read_pdl_us"], row["read_pdl_how"] = read_floor(int4_bytes(K, N), pdl=True)
            rows.append(row)
            read = (f"read {row['read_us']:.1f} ({row['read_how']}), {row['read_pdl_us']:.1f} "
                    f"({row['read_pdl_how']}) " if M == 1 else "")
            if "dequant_only_us" in row:
                read += (f"[dequant alone {row['dequant_only_us']:.1f} ({row['dequant_tbs']:.2f} TB/s, copy "
                         f"{row['copy_tbs']:.2f}) + cublas {row['dequant_cublas_us']:.1f} {row['dequant_cfg']}] ")
            fam = " ".join(f"{k[:-3]} {row[k]:.1f}" for k in ("gluon_us", "dot_us", "wgmma_us", "pipe_us",
                                                                 "dequant_repacked_us") if k in row)
            errs = {k: v for k, v in errs.items() if v != float("inf")} or {"none": float("inf")}
            print(f"K={K} N={N} M={M} [{fam}] {read}cublas {row['cublas_us']:.1f} int4 {row['int4_us']:.1f} "
                  f"table({row['table_kernel']}) {row['table_us']:.1f} repacked table {row['repacked_table_us']:.1f} "
                  + "".join(f"[{v} {us:.1f}] " for v, us in row.get("repacked_table_variants_us", {}).items()) +
                  f"best {best[0]:.1f} {best[1]} "
                  f"x{row['cublas_us'] / best[0]:.2f} cuBLAS x{row['int4_us'] / best[0]:.2f} int4 "
                  f"err {max(errs.values()):.1e}", flush=True)
            (out / "gluon_probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                             indent=1))
        del sets, packed, wb, i4
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
