"""Where a tensor-parallel step's time goes: torch.profiler traces of every rank, side by side with one GPU.

    python benchmarks/tp_profile.py --out DIR [--tp 2]     # on N GPUs: DIR/<config>/<phase>/rank<r>.trace.json.gz
    python benchmarks/tp_profile.py --analyze DIR          # per rank: GPU busy share, step times, top kernels

The checkpoint and the Ray layout are ``benchmarks/tp.py``'s (rank 0 in an actor on bundle 0 of a STRICT_PACK
placement group). Traced per configuration after a warm-up: batch-1 decode (128-token prompt,
``--decode-tokens`` new tokens) and the prefill of one 2048-token prompt (at tp > 1 once more with Python
calls). The analysis reads the traces only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import prompt_ids  # noqa: E402
from benchmarks.tp import checkpoint_and_ray  # noqa: E402


class ProfileHost:
    """Rank 0 in a Ray actor: builds the engine, warms it up, traces decode and prefill on every rank."""

    def run(self, path: str, tp: int, device: str, out: str, decode_tokens: int, symm: bool) -> dict:
        from serving import EngineConfig, GenerationConfig, LLMEngine
        from serving.tp_group import start_tp_engine

        cfg = EngineConfig(dtype="bfloat16" if device == "cuda" else "float32", device=device, session_len=4096,
                           max_num_seqs=32, max_num_batched_tokens=8192, enable_prefix_caching=False,
                           cache_max_entry_count=0.5, progress=False, tp=tp, tp_symmetric_memory=symm)
        eng = LLMEngine(path, cfg) if tp == 1 else start_tp_engine(path, cfg)
        v = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        try:
            g = GenerationConfig(max_new_tokens=decode_tokens, ignore_eos=True)
            eng.generate(prompt_ids(1, 128, v, 5), g)  # warm-up
            eng.generate(prompt_ids(1, 2048, v, 6), GenerationConfig(max_new_tokens=2, ignore_eos=True))
            eng.start_profile(Path(out) / "decode")
            eng.generate(prompt_ids(1, 128, v, 7), g)
            eng.stop_profile()
            for phase, stack in [("prefill", False)] + ([("prefill_stack", True)] if tp > 1 else []):
                eng.start_profile(Path(out) / phase, with_stack=stack)
                eng.generate(prompt_ids(1, 2048, v, 8), GenerationConfig(max_new_tokens=1, ignore_eos=True))
                eng.stop_profile()
        finally:
            eng.close()
        return {"tp": tp, "symm": symm, "out": out}


def measure(args) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from serving.tp_group import packed_group, rank_bundle

    _, path, _ = checkpoint_and_ray(args)
    unit = rank_bundle(args.device)
    for tp, symm in [(1, False), (args.tp, args.device == "cuda")]:
        name = f"tp{tp}" + ("_symm" if symm else "")
        pg = packed_group(tp, unit, 300)
        try:
            host = ray.remote(ProfileHost).options(
                num_cpus=1, num_gpus=unit.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)).remote()
            ray.get(host.run.remote(str(path), tp, args.device, str(Path(args.out) / name), args.decode_tokens,
                                    symm))
            ray.kill(host)
        finally:
            remove_placement_group(pg)
        print(f"traced {name}", flush=True)
    ray.shutdown()
    flat = Path(args.out) / "traces"  # one level, so that a device run can bring them back
    flat.mkdir(exist_ok=True)
    for t in Path(args.out).glob("*/*/rank*.trace.json.gz"):
        shutil.copyfile(t, flat / "_".join(t.relative_to(args.out).parts))


# -- analysis ---------------------------------------------------------------------------------------------
def _busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(trace_path: Path, top: int = 12) -> dict:
    """GPU busy share, per-step launch interval (graph launches) and the kernels that take the most time."""
    events = json.loads(gzip.open(trace_path).read())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"trace": str(trace_path), "kernels": 0}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    busy = _busy_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e["name"][:90]].append(e["dur"])
    launches = sorted(e["ts"] for e in events if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch")
    gaps = [b - a for a, b in zip(launches, launches[1:])]
    cpu_ops, py = defaultdict(float), defaultdict(float)  # inclusive host time by op / by Python function
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            cpu_ops[e["name"][:60]] += e["dur"]
        elif e.get("cat") == "python_function" and "dur" in e:
            py[e["name"][:80]] += e["dur"]
    steps = max(len(launches), 1)
    comm = sorted(e["dur"] for e in kernels if "AllReduce" in e["name"] or "all_reduce" in e["name"])
    ordered = sorted(kernels, key=lambda e: e["ts"])
    idle = sorted(((b["ts"] - a["ts"] - a["dur"], a["ts"] + a["dur"] - start) for a, b in zip(ordered, ordered[1:])),
                  reverse=True)
    return {
        "trace": str(trace_path), "kernels": len(kernels), "gpu_span_ms": (end - start) / 1e3,
        "gpu_busy_ms": busy / 1e3, "gpu_busy_share": busy / (end - start), "graph_launches": len(launches),
        "launch_interval_us_median": sorted(gaps)[len(gaps) // 2] if gaps else None,
        "per_step_busy_us": busy / steps, "graph_launch_ts": launches,
        "top_kernels": [(n, len(d), sum(d) / 1e3, sum(d) / len(d)) for n, d in
                        sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]],
        "all_reduce_us_quantiles": [comm[int(q * (len(comm) - 1))] for q in (0, .1, .5, .9, 1)] if comm else [],
        "longest_gpu_idle_us_at": idle[:6],
        "top_python_ms": [(n, t / 1e3) for n, t in sorted(py.items(), key=lambda kv: -kv[1])[:40]],
        "top_cpu_ops_ms_per_step": [(n, t / 1e3 / steps) for n, t in
                                    sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:top]],
    }


def analyze(root: Path) -> dict:
    out = {}
    for trace in sorted(root.glob("*/*/rank*.trace.json.gz")):  # <config>/<phase>/rank<r>
        key = "/".join(trace.relative_to(root).parts)
        out[key] = s = summarize(trace)
        if not s["kernels"]:
            print(f"{key}: no kernels")
            continue
        print(f"\n== {key}: GPU span {s['gpu_span_ms']:.2f} ms, busy {s['gpu_busy_ms']:.2f} ms "
              f"({100 * s['gpu_busy_share']:.0f} %), {s['graph_launches']} graph launches, launch interval "
              f"{s['launch_interval_us_median']} us, busy/step {s['per_step_busy_us']:.0f} us")
        for n, cnt, ms, avg in s["top_kernels"]:
            print(f"   {ms:8.2f} ms {cnt:6d}x {avg:8.1f} us  {n}")
        for n, ms in s["top_cpu_ops_ms_per_step"][:8]:
            print(f"   cpu {ms * 1e3:8.1f} us/step  {n}")
        if s["all_reduce_us_quantiles"]:
            print("   all-reduce us (min p10 p50 p90 max):", " ".join(f"{x:.0f}" for x in s["all_reduce_us_quantiles"]))
        print("   longest GPU idle (us, at us):", ", ".join(f"{d:.0f}@{t:.0f}" for d, t in s["longest_gpu_idle_us_at"]))
        for n, ms in s["top_python_ms"][:25]:
            print(f"   py {ms:9.2f} ms  {n}")
    for key, s in out.items():  # a follower's graph launch against rank 0's of the same step
        if "/rank0." in key or not s.get("graph_launch_ts"):
            continue
        lead = out.get(key.replace(key.rsplit("/", 1)[1], "rank0.trace.json.gz"), {}).get("graph_launch_ts") or []
        pairs = [b - a for a, b in zip(lead, s["graph_launch_ts"])]
        if pairs and len(lead) == len(s["graph_launch_ts"]):
            pairs.sort()
            print(f"\n{key}: graph launched {pairs[len(pairs) // 2]:.0f} us after rank 0's (median; "
                  f"p10 {pairs[len(pairs) // 10]:.0f}, p90 {pairs[9 * len(pairs) // 10]:.0f})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="where the traces go")
    p.add_argument("--analyze", default=None, help="a --out directory: print each trace's summary")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny config (checks the script, not speed)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--decode-tokens", type=int, default=32)
    args = p.parse_args(argv)
    if args.analyze:
        summary = analyze(Path(args.analyze))
        (Path(args.analyze) / "summary.json").write_text(json.dumps(summary, indent=1))
        return 0
    if not args.out:
        p.error("--out or --analyze")
    measure(args)
    analyze(Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
