"""One kernel for a row-parallel linear's finish (split-K sum, sum over ranks, residual add, RMSNorm:
``serving/layers/reduce_norm.py``) against the launches it replaces, on one GPU and on ``--world`` (2).

    python benchmarks/tp_reduce_norm.py --out DIR [--world 4]   # checks, then DIR/tp_reduce_norm.json
    python benchmarks/tp_reduce_norm.py --report A.json [B.json]   # docs/benchmarks.md section + plot

Each case is a decode-sized output of a Llama-3-8B row layer (N = 4096) as the engine's W4A16 kernels leave it at
tp 2 (the same cases at other GPU counts): fp32 split-K partials up to 32 rows, the bf16 output itself above
(those kernels sum their splits in registers). Before timing, every case is checked on every rank against a
float64 reference built from all ranks' inputs, the ranks' results must be equal bit for bit, and a CUDA graph's
replay must give the eager result.
Timed: 64 chained calls in one CUDA graph (a batch-1 step's count at 32 layers), per call:

* ``unfused``: the split-K sum (``kernels.awq_triton.reduce_partials``), the symmetric-memory all-reduce
  (``SymmetricAllReduce``, what the engine ran before) and the Triton RMSNorm;
* ``fused``: ``reduce_add_rms_norm``.

The one-GPU rows time rank 0 alone (no all-reduce). Processes, not Ray actors: this needs no Ray.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N = 4096
# (rows, splits): the engine's W4A16 kernels at tp 2 on the 8B shape (splits 1: the bf16 output, no partials)
CASES = [(1, 16), (2, 16), (4, 16), (8, 16), (16, 8), (32, 8), (64, 1), (128, 1)]
ONE_GPU_CASES = [(1, 28), (4, 28), (16, 8), (32, 8)]  # tp 1: K 4096 at 1-8 rows splits 28
EPS = 1e-5
# (columns per program, warps) of the fused kernel, timed beside its default: RAYAWQ_RN_VARIANTS="128x1,256x2"
VARIANTS = [tuple(int(v) for v in x.split("x")) for x in os.environ.get("RAYAWQ_RN_VARIANTS", "").split(",") if x]


def _inputs(rows: int, split: int, rank: int, seed: int, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)
    shared = torch.Generator(device="cpu").manual_seed(seed)
    if split == 1:
        parts = torch.randn(1, rows, N, generator=g).to(device, torch.bfloat16)
    else:
        parts = torch.randn(split, rows, N, generator=g).to(device)
    res = torch.randn(rows, N, generator=shared).to(device, torch.bfloat16)
    w = (1 + 0.1 * torch.randn(N, generator=shared)).to(device, torch.bfloat16)
    return parts, res, w


def _unfused(parts, res, w, tp):
    import torch

    from kernels.awq_triton import reduce_partials
    from serving.layers.norm import rms_norm

    y = parts[0] if parts.shape[0] == 1 else reduce_partials(
        parts, torch.empty(parts.shape[1:], dtype=res.dtype, device=res.device), None)
    if tp is not None:
        y = tp.all_reduce(y)
    return rms_norm(y, w, EPS, res)


def _fused(parts, res, w, tp, slot=0, **variant):
    from serving.layers.reduce_norm import reduce_add_rms_norm

    return reduce_add_rms_norm(parts, res, w, EPS, tp.fast if tp is not None else None, slot, **variant)


def check(rows: int, split: int, tp, device, seed: int = 0) -> dict:
    """Fused against a float64 reference from every rank's inputs, against the unfused launches, across ranks
    (bit for bit) and graph against eager; raises on a mismatch, returns the errors."""
    import torch
    import torch.distributed as dist

    world = tp.world_size if tp is not None else 1
    parts, res, w = _inputs(rows, split, tp.rank if tp is not None else 0, seed, device)
    local = parts.double().sum(0).to(torch.bfloat16)
    if world > 1:
        every = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(every, local, group=tp.group)
        total = sum(t.double() for t in every).to(torch.bfloat16)
    else:
        total = local
    h = (total.double() + res.double()).to(torch.bfloat16).double()
    ref = w.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16).double()
    y, r = _fused(parts, res.clone(), w, tp)
    yu, ru = _unfused(parts, res.clone(), w, tp)
    torch.cuda.synchronize()
    err = {"rows": rows, "split": split, "world": world,
           "residual_vs_ref": float((r.double() - h).abs().max()), "y_vs_ref": float((y.double() - ref).abs().max()),
           "y_vs_unfused": float((y.double() - yu.double()).abs().max())}
    scale = float(ref.abs().max())
    if err["residual_vs_ref"] > 0.02 * float(h.abs().max()) or err["y_vs_ref"] > 0.02 * scale:
        raise AssertionError(f"fused result off the reference: {err}")
    if world > 1:
        for t in (y, r):
            every = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(every, t, group=tp.group)
            if not all(torch.equal(every[0], e) for e in every[1:]):
                raise AssertionError(f"ranks disagree at rows={rows} split={split}")
    # a graph of four chained calls (data slots alternating, as the engine's norms do), replayed twice on fresh
    # residuals: each replay as eager
    r_graph = res.clone()
    graph = torch.cuda.CUDAGraph()
    _fused(parts, r_graph, w, tp, 1)  # warm
    with torch.cuda.graph(graph):
        outs = [_fused(parts, r_graph, w, tp, i % 2)[0] for i in range(4)]
    for _ in range(2):
        r_graph.copy_(res)
        graph.replay()
        r_eager = res.clone()
        eager = [_fused(parts, r_eager, w, tp, i % 2)[0] for i in range(4)]
        torch.cuda.synchronize()
        if not all(torch.equal(a, b) for a, b in zip(outs, eager)) or not torch.equal(r_graph, r_eager):
            raise AssertionError(f"graph replay differs from eager at rows={rows} split={split}")
    return err


def time_case(rows: int, split: int, tp, device, per_graph: int = 64, reps: int = 50) -> dict:
    import torch

    from benchmarks.engine import _replay_ms

    parts, res, w = _inputs(rows, split, tp.rank if tp is not None else 0, 1, device)
    out: dict = {"variants": {}}
    runs = [("unfused", _unfused, {}), ("fused", _fused, {})]
    runs += [(f"{bn}x{nw}", _fused, {"block_n": bn, "num_warps": nw}) for bn, nw in VARIANTS]
    for name, fn, kw in runs:
        r = res.clone()

        def chain():
            for i in range(per_graph):
                fn(parts, r, w, tp, **({"slot": i % 2, **kw} if fn is _fused else kw))

        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        times = []
        for _ in range(5):
            r.copy_(res)
            times.append(_replay_ms(graph, reps) * 1e3 / per_graph)
        (out if name in ("unfused", "fused") else out["variants"])[name] = sorted(times)[len(times) // 2]
    return {"rows": rows, "split": split, "world": tp.world_size if tp is not None else 1, **out}


def _rank(rank: int, world: int, port: int, queue, timed: bool) -> None:
    import torch

    from serving.layers.parallel import TPContext

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    result = {"checks": [], "times": []}
    try:
        tp = TPContext.init(rank, world, f"tcp://127.0.0.1:{port}", "nccl", timeout_s=120)
        tp = tp.with_symmetric_memory(device, 128 * N * 4)  # what the engine sets up at max_num_seqs 128
        if tp.fast is None:
            raise RuntimeError("symmetric memory unavailable")
        for rows, split in CASES:
            result["checks"].append(check(rows, split, tp, device))
        for rows, split in CASES if timed else []:
            result["times"].append(time_case(rows, split, tp, device))
            if rank == 0:
                print(json.dumps(result["times"][-1]), flush=True)
        tp.min_int(0)  # rank 0 works alone below: the peer waits here, on the host
        if rank == 0:
            for rows, split in ONE_GPU_CASES:
                result["checks"].append(check(rows, split, None, device))
                if timed:
                    result["times"].append(time_case(rows, split, None, device))
                    print(json.dumps(result["times"][-1]), flush=True)
        tp.min_int(0)
        tp.destroy()
    except Exception as e:  # reported by the parent
        result["error"] = f"rank {rank}: {type(e).__name__}: {e}"
    queue.put((rank, result))


def measure(world: int, timeout_s: float = 300.0, timed: bool = True) -> dict:
    """Every case checked on ``world`` GPUs (and on rank 0 alone), then, if ``timed``, timed; raises on a
    mismatch or a rank's error."""
    import torch
    import torch.multiprocessing as mp

    from benchmarks._report import git_commit

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, queue, timed)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    try:
        while len(results) < world:  # the first error ends the run (a peer may be waiting on its rank for ever)
            rank, result = queue.get(timeout=timeout_s)
            if "error" in result:
                raise RuntimeError(result["error"])
            results[rank] = result
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return {"gpu": torch.cuda.get_device_name(0), "world": world, "commit": git_commit(),
            "date": datetime.date.today().isoformat(), "n": N, "checks": results[0]["checks"],
            "times": results[0]["times"]}


def report(results: list[dict]) -> str:
    """One section for the runs in ``results`` (one per GPU count), with the plot's link."""
    from benchmarks._report import stamp

    first = results[0]
    lines = [f"## A row layer's finish in one kernel (`benchmarks/tp_reduce_norm.py`, {first['gpu']})", ""]
    for res in results:
        lines.append(stamp(f"{res['world']} x {res['gpu']}", res["commit"], res.get("date")) + "  ")
    lines += ["", "Microseconds per call, 64 chained in a CUDA graph, N = 4096 (a Llama-3-8B row layer's output). "
              "*Unfused*: the split-K sum, the symmetric-memory all-reduce (several GPUs) and the RMSNorm: up to "
              "three launches (the split-K sum only where the W4A16 kernel leaves partials). *Fused*: "
              "`serving/layers/reduce_norm.py`, one launch. Every case was first checked against a float64 "
              "reference, across ranks bit for bit, and graph replay against eager.", "",
              "| GPUs | rows | split-K partials | unfused | fused | fused / unfused |", "|---|---|---|---|---|---|"]
    seen = set()
    for res in results:
        for t in sorted(res["times"], key=lambda t: (t["world"], t["rows"])):
            if (t["world"], t["rows"]) in seen:  # the one-GPU rows of each run: the first run's
                continue
            seen.add((t["world"], t["rows"]))
            lines.append(f"| {t['world']} | {t['rows']} | {t['split'] if t['split'] > 1 else '- (bf16 output)'} | "
                         f"{t['unfused']:.1f} | {t['fused']:.1f} | {t['fused'] / t['unfused']:.2f} |")
    if first.get("note"):
        lines += ["", first["note"]]
    raws = ", ".join(f"`benchmarks/results/{_raw_name(r)}`" for r in results)
    lines += ["", f"![fused against unfused](tp_reduce_norm{_tag(first)}.png)", "",
              f"Raw numbers: {raws}. Reproduce on 2 (4) GPUs: `python benchmarks/tp_reduce_norm.py --out /tmp/rn "
              "[--world 4]`, then `--report /tmp/rn/tp_reduce_norm.json [...]`."]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    worlds = sorted({t["world"] for r in results for t in r["times"]})
    for world, color in zip(worlds, ("tab:gray", "tab:blue", "tab:orange", "tab:green")):
        ts = sorted({t["rows"]: t for r in results for t in r["times"] if t["world"] == world}.values(),
                    key=lambda t: t["rows"])
        rows = [t["rows"] for t in ts]
        ax.plot(rows, [t["unfused"] for t in ts], "--x", color=color, label=f"{world} GPU(s), unfused")
        ax.plot(rows, [t["fused"] for t in ts], "-o", color=color, label=f"{world} GPU(s), fused")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (decode batch)")
    ax.set_ylabel("us per call (CUDA graph)")
    ax.set_title(f"{results[0]['gpu']}: split-K sum + all-reduce + residual + RMSNorm, N = 4096", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _tag(res: dict) -> str:
    return "_" + res["gpu"].split()[-1].lower()


def _raw_name(res: dict) -> str:
    return f"tp_reduce_norm{_tag(res)}_x{res['world']}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="directory for tp_reduce_norm.json")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--report", type=Path, nargs="+", help="tp_reduce_norm.json files (one per GPU count): write "
                    "the docs/benchmarks.md section and plot")
    ap.add_argument("--note", default=None, help="with --report: a paragraph added to the section")
    args = ap.parse_args()
    if args.report:
        from benchmarks._report import DOCS, write_section

        results = sorted((json.loads(p.read_text()) for p in args.report), key=lambda r: r["world"])
        if args.note:
            results[0]["note"] = args.note
        plot(results, DOCS / f"tp_reduce_norm{_tag(results[0])}.png")
        write_section(f"tp_reduce_norm{_tag(results[0])}", report(results))
        return
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    res = measure(args.world)
    print(report([res]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tp_reduce_norm.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
