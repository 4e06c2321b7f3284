"""What one all-reduce costs between tensor-parallel ranks on Ray, by size and by path (nccl-tests style).

    python benchmarks/tp_allreduce.py --out DIR       # 2+ GPUs: DIR/tp_allreduce.json
    python benchmarks/tp_allreduce.py --device cpu    # gloo, small sizes: checks the script
    python benchmarks/tp_allreduce.py --report DIR/tp_allreduce.json   # docs/benchmarks.md section + plot

Why: at tp = 2 a batch-1 decode step makes 64 all-reduces of 8 KB (Llama-3-8B shape) and a 2048-token prefill 64
of 16 MB; docs/benchmarks.md's tensor-parallel section finds batch 1 slower on two GPUs than on one and the first
token 1.45x as long. This times, per size, one all-reduce as the engine makes it: eagerly (prefill) and inside a
CUDA graph of 64 (decode), on each path the engine can take:

* ``nccl``: NCCL, each rank seeing only its own GPU (what Ray gives an actor; the default),
* ``nccl-shared``: NCCL, each rank seeing the group's GPUs in rank order (``tp_group._see_group_gpus``),
* ``symm``: torch's symmetric-memory one-shot all-reduce (``SymmetricAllReduce``) up to its buffer, as with
  ``EngineConfig(tp_symmetric_memory=True)``.

Ranks are Ray actors in a STRICT_PACK placement group, rank 0 picking the port, as ``serving.tp_group`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_SIZES = [8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
CPU_SIZES = [8 << 10, 64 << 10]


class Rank:
    def address(self) -> str:
        import ray

        from serving.tp_group import _free_port

        return f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"

    def gpus(self) -> list[str]:
        import ray

        return [str(i) for i in ray.get_gpu_ids()]

    def run(self, rank: int, world: int, init: str, mode: str, visible: str | None, sizes: list[int]) -> dict:
        import torch

        from serving.layers.parallel import TPContext
        from serving.tp_group import _see_group_gpus

        cuda = mode != "gloo"
        device = torch.device(_see_group_gpus(visible, rank) if visible else "cuda") if cuda else torch.device("cpu")
        if cuda:
            device = device if device.index is not None else torch.device("cuda", 0)  # the one GPU Ray shows it
            torch.cuda.set_device(device)
        tp = TPContext.init(rank, world, init, "nccl" if cuda else "gloo", timeout_s=300)
        if mode == "symm":
            tp = tp.with_symmetric_memory(device, max(sizes))
        dtype = torch.bfloat16 if cuda else torch.float32
        out = {"mode": mode, "path": "symmetric memory" if tp.fast is not None else ("NCCL" if cuda else "gloo"),
               "eager_us": {}, "graph_us": {}}
        for size in sizes:
            x = torch.ones(size // torch.empty(0, dtype=dtype).element_size(), dtype=dtype, device=device)
            y = tp.all_reduce(x.clone())
            if float(y[0]) != world:
                raise RuntimeError(f"{mode}: the sum of {size} bytes is {float(y[0])}, not {world}")
            x.zero_()  # timed on zeros: in-place sums stay finite however often they run
            out["eager_us"][size] = _time(lambda: tp.all_reduce(x), cuda)
            if cuda:
                out["graph_us"][size] = _graph_time(tp, x)
        tp.destroy()
        return out


def _time(fn, cuda: bool, reps: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def _graph_time(tp, x, per_graph: int = 64, reps: int = 20) -> float:
    """Per all-reduce inside a CUDA graph of ``per_graph`` chained ones (a decode step's count at 32 layers)."""
    import torch

    def chain():
        y = x
        for _ in range(per_graph):
            y = tp.all_reduce(y)  # NCCL in place, symmetric memory into a new tensor: as the engine's linears
        return y

    from benchmarks.engine import _replay_ms

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    return _replay_ms(graph, reps) * 1e3 / per_graph


def measure(args) -> dict:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cuda = args.device == "cuda"
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}}
    ray.init(num_cpus=max(2, args.world + 1), num_gpus=args.world if cuda else 0, include_dashboard=False,
             runtime_env=env)
    unit = {"GPU": 1.0, "CPU": 1.0} if cuda else {"CPU": 1.0}
    import datetime

    import torch

    from benchmarks._report import git_commit

    res = {"world": args.world, "device": args.device, "commit": git_commit(), "modes": [],
           "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "date": datetime.date.today().isoformat()}
    for mode in (["nccl", "nccl-shared", "symm"] if cuda else ["gloo"]):
        pg = placement_group([dict(unit) for _ in range(args.world)], strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=120)
        ranks = [ray.remote(Rank).options(num_cpus=1, num_gpus=unit.get("GPU", 0), scheduling_strategy=(
            PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r))).remote() for r in range(args.world)]
        init = ray.get(ranks[0].address.remote())
        visible = None
        if mode != "nccl" and cuda:
            visible = ",".join(g[0] for g in ray.get([r.gpus.remote() for r in ranks]))
        outs = ray.get([r.run.remote(i, args.world, init, mode, visible, GPU_SIZES if cuda else CPU_SIZES)
                        for i, r in enumerate(ranks)])
        res["modes"].append(outs[0])
        print(json.dumps(outs[0]), flush=True)
        for r in ranks:
            ray.kill(r)
        remove_placement_group(pg)
    ray.shutdown()
    return res


def _size(b: int) -> str:
    return f"{b >> 20} MB" if b >= 1 << 20 else f"{b >> 10} KB"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for m in res["modes"]:
        for kind, style in (("graph_us", "-o"), ("eager_us", "--x")):
            pts = sorted((int(k), v) for k, v in m[kind].items())
            if pts:
                ax.plot([k for k, _ in pts], [v for _, v in pts], style,
                        label=f"{m['mode']} ({'in a CUDA graph' if kind == 'graph_us' else 'eager'})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({int(k) for m in res["modes"] for k in m["eager_us"]})
    ax.set_xticks(sizes, [_size(b) for b in sizes])
    ax.set_xlabel("all-reduce size (bf16)")
    ax.set_ylabel("us per all-reduce")
    ax.set_title(f"{res['world']} x {res['gpu']}: one all-reduce between Ray actors", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(res: dict) -> str:
    from benchmarks._report import stamp

    sizes = sorted({int(k) for m in res["modes"] for k in m["eager_us"]})
    lines = [f"## Tensor-parallel all-reduce (`benchmarks/tp_allreduce.py`, {res['world']} x {res['gpu']})", "",
             stamp(f"{res['world']} x {res['gpu']}", res["commit"], res.get("date")), "",
             "Microseconds per all-reduce of a bf16 tensor between two ranks that are Ray actors (as `serving.tp_group` "
             "places them): eager (a prefill's sums) and inside a CUDA graph of 64 chained ones (a decode step's).", "",
             "| path | " + " | ".join(_size(b) for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for m in res["modes"]:
        for kind, name in (("eager_us", "eager"), ("graph_us", "graph")):
            if m[kind]:
                lines.append(f"| {m['mode']} ({m['path']}), {name} | "
                             + " | ".join(f"{m[kind][str(b)]:.1f}" if str(b) in m[kind] else "-" for b in sizes)
                             + " |")
    lines += ["", "![all-reduce by size](tp_allreduce" + _tag(res) + ".png)"]
    if res.get("note"):
        lines += ["", res["note"]]
    lines += ["", "Raw numbers: `benchmarks/results/tp_allreduce" + _tag(res) + ".json`. Reproduce: "
              "`python benchmarks/tp_allreduce.py --out /tmp/ar` on 2 GPUs, then `--report /tmp/ar/tp_allreduce.json`."]
    return "\n".join(lines)


def _tag(res: dict) -> str:
    from benchmarks._report import card_suffix

    return card_suffix(res["gpu"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--report", default=None, help="results JSON: write the docs section and plot from it")
    p.add_argument("--note", default=None, help="with --report: a paragraph added to the section")
    args = p.parse_args(argv)
    from benchmarks._report import measure_or_report

    return measure_or_report(args, "tp_allreduce", "tp_allreduce.json", lambda r: r["gpu"], measure, report, plot)


if __name__ == "__main__":
    raise SystemExit(main())
