"""Tensor parallelism on Ray: the same AWQ checkpoint served by 1 GPU and by N, side by side in one run.

    python benchmarks/tp.py --out DIR [--tp 2]        # on a machine with N GPUs: DIR/tp_results.json
    python benchmarks/tp.py --report FILE.json        # the "tp" section of docs/benchmarks.md + docs/tp_<card>.png
    python benchmarks/tp.py --small --device cpu      # a tiny config over gloo, to check the script itself

A random-weight Llama-3-8B-shaped AWQ g128 checkpoint is written to disk once (the ranks load it the way a served
model is loaded). Each configuration runs as it would under Serve: rank 0 in a Ray actor holding bundle 0 of a
STRICT_PACK placement group, ranks 1..N-1 as ``serving.tp_group`` workers in the other bundles. Measured per
configuration with ``benchmarks/engine.py``'s harness: batch-1 decode tokens/s, batch 32 / 128 output tokens/s,
TTFT of a 2048-token prompt, weights per GPU, KV-cache blocks; and the agreement of N ranks with 1 (mean
log-likelihood of fixed sequences, greedy tokens).
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

from benchmarks.engine import LLAMA3_8B, SMALL, awq_weights, bench_engine, prompt_ids  # noqa: E402


def write_checkpoint(c: dict, path: Path, group: int = 128, shard_layers: int = 4) -> Path:
    """Random AWQ weights as safetensors shards plus config.json (written to a temp name, then renamed)."""
    import torch
    from safetensors.torch import save_file

    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shard: dict = {}
    n = 0

    def flush():
        nonlocal shard, n
        if shard:
            save_file(shard, str(tmp / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            shard, n = {}, n + 1

    for name, t in awq_weights(c, group, dev):
        if ".layers." in name and name.endswith("input_layernorm.weight"):
            layer = int(name.split(".")[2])
            if layer and layer % shard_layers == 0:
                flush()
        shard[name] = t.contiguous().cpu()
    flush()
    cfg = {**c, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                   "version": "gemm"}}
    (tmp / "config.json").write_text(json.dumps(cfg))
    tmp.rename(path)
    return path


class Host:
    """Rank 0 of one configuration, in a Ray actor like a Serve replica: builds the engine, measures it."""

    def run(self, path: str, tp: int, device: str, new_tokens: int, batches: list[int], ref: dict | None,
            symm: bool = False) -> dict:
        import torch

        from serving import EngineConfig, GenerationConfig, LLMEngine
        from serving.tp_group import start_tp_engine

        cfg = EngineConfig(dtype="bfloat16" if device == "cuda" else "float32", device=device, session_len=4096,
                           max_num_seqs=max(batches), max_num_batched_tokens=8192, enable_prefix_caching=False,
                           cache_max_entry_count=0.6, progress=False, tp=tp, tp_symmetric_memory=symm)
        t = time.perf_counter()
        eng = LLMEngine(path, cfg) if tp == 1 else start_tp_engine(path, cfg)
        res = {"tp": tp, "load_s": time.perf_counter() - t, "kv_blocks": eng.runner.num_blocks,
               "all_reduce": "symmetric memory" if eng.runner.tp.fast is not None else
               ("NCCL" if device == "cuda" else "gloo") if tp > 1 else "-"}
        try:
            c = json.loads((Path(path) / "config.json").read_text())
            res.update(bench_engine(eng, c, torch.device(device), new_tokens, batches, 128, 2048, diagnose=False))
            seqs = prompt_ids(4, 512, c["vocab_size"], seed=1234)
            res["nll"] = eng.get_ppl(seqs)
            g = GenerationConfig(max_new_tokens=32, ignore_eos=True)
            res["greedy"] = [o.token_ids for o in eng.generate(prompt_ids(4, 64, c["vocab_size"], 77), g)]
        finally:
            eng.close()
        if ref:
            res["nll_max_abs_diff"] = max(abs(a - b) for a, b in zip(res["nll"], ref["nll"]))
            same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                    for x, y in zip(res["greedy"], ref["greedy"])]
            res["greedy_same_prefix"] = same
        return res


def run_config(path: Path, tp: int, device: str, new_tokens: int, batches: list[int], ref: dict | None,
               symm: bool = False) -> dict:
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from serving.tp_group import packed_group, rank_bundle

    unit = rank_bundle(device)
    pg = packed_group(tp, unit, 300)
    try:
        host = ray.remote(Host).options(
            num_cpus=1, num_gpus=unit.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)).remote()
        res = ray.get(host.run.remote(str(path), tp, device, new_tokens, batches, ref, symm))
        ray.kill(host)
        return res
    finally:
        remove_placement_group(pg)


def checkpoint_and_ray(args) -> tuple[dict, Path, int]:
    """The random checkpoint (``--small``: a tiny config; written once to ``--checkpoint``) and a local Ray with
    ``--tp`` ranks' worth of CPUs whose workers import this repository; returns (config, path, GPUs)."""
    import ray
    import torch

    c = SMALL if args.small else LLAMA3_8B
    path = write_checkpoint(c, Path(args.checkpoint or f"/tmp/rayawq_tp_{'small' if args.small else 'llama3_8b'}"))
    n_gpu = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and n_gpu < args.tp:
        raise SystemExit(f"--tp {args.tp} needs {args.tp} GPUs; this machine has {n_gpu}")
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}}
    ray.init(num_cpus=max(2, args.tp + 1), num_gpus=n_gpu, include_dashboard=False, runtime_env=env)
    return c, path, n_gpu


def measure(args) -> dict:
    import ray
    import torch

    c, path, n_gpu = checkpoint_and_ray(args)
    batches = [int(b) for b in args.batches.split(",")]
    res = {"device": torch.cuda.get_device_name(0) if n_gpu else "cpu", "torch": torch.__version__,
           "ray": ray.__version__, "batches": batches, "new_tokens": args.new_tokens, "prompt_len": 128,
           "commit": os.environ.get("RAYAWQ_COMMIT"), "runs": []}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    ref = None
    for tp, symm in [(1, False), (args.tp, False)] + ([(args.tp, True)] if args.device == "cuda" else []):
        r = run_config(path, tp, args.device, args.new_tokens, batches, ref, symm)
        ref = ref or r
        res["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("greedy", "nll")}), flush=True)
        if args.out:  # each configuration's row kept, should a later one be cut off
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "tp_results.json").write_text(json.dumps(res, indent=1))
    ray.shutdown()
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    keys = [("b1_tok_s", "batch 1\ntok/s")] + [(f"b{b}_out_tok_s", f"batch {b}\nout tok/s") for b in res["batches"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(runs)
    for i, (r, label) in enumerate(zip(runs, _labels(runs))):
        vals = [r[k] / runs[0][k] for k, _ in keys]
        bars = ax.bar([j + i * width for j in range(len(keys))], vals, width, label=label)
        for b, (k, _) in zip(bars, keys):
            ax.annotate(f"{r[k]:,.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(keys))], [t for _, t in keys])
    ax.set_ylabel("throughput / 1 GPU")
    ax.set_ylim(0, 1.2 * max(r[k] / runs[0][k] for r in runs for k, _ in keys))
    ax.set_title(f"AWQ Llama-3-8B shape, tensor parallel on Ray ({res['device']})", fontsize=10)
    ax.legend(loc="upper center", ncol=len(runs), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _label(r: dict) -> str:
    if r["tp"] == 1:
        return "1 GPU"
    return f"{r['tp']} GPUs, {r.get('all_reduce', 'NCCL')}"


def _labels(runs: list[dict]) -> list[str]:
    return [_label(r) + (" (again)" if _label(r) in map(_label, runs[:i]) else "") for i, r in enumerate(runs)]


def report(res: dict) -> str:
    from benchmarks._report import card_suffix, stamp

    if res.get("commit"):
        os.environ["RAYAWQ_COMMIT"] = res["commit"]
    tag = card_suffix(res["device"])
    card = tag[1:] or "h100"
    runs, bs = res["runs"], res["batches"]
    head = ("| GPUs | batch 1 tok/s | ms/token | " + " | ".join(f"batch {b} out tok/s" for b in bs)
            + " | TTFT 2048 (ms) | weights GiB / GPU | KV blocks / GPU | load s |")
    lines = [f"## Tensor parallelism on Ray (`benchmarks/tp.py`, {res['device']})", "", stamp(res["device"]), "",
             f"The same random-weight Llama-3-8B-shaped AWQ g128 checkpoint (bf16 activations) served by 1 GPU and "
             f"by {runs[-1]['tp']}: rank 0 in a Ray actor on bundle 0 of a STRICT_PACK placement group (as a Serve "
             "replica), the other ranks `serving.tp_group` workers; NCCL all-reduces, inside the decode CUDA graphs. "
             "In a row marked symmetric memory, decode-sized sums go through symmetric memory instead: each row "
             "layer's split-K sum, sum over ranks, residual add and RMSNorm are one kernel "
             "(`serving/layers/reduce_norm.py`; at more than two ranks up to 8 rows, torch's one-shot all-reduce "
             "above). "
             f"Prompt {res['prompt_len']} tokens, {res['new_tokens']} new per request; torch {res['torch']}, "
             f"triton {res.get('triton', '-')}, ray {res['ray']}.", "", head, "|" + "---|" * (7 + len(bs))]
    labels = _labels(runs)
    for r, label in zip(runs, labels):
        cells = [label, f"{r['b1_tok_s']:.0f}", f"{r['b1_ms_tok']:.2f}"]
        cells += [f"{r.get(f'b{b}_out_tok_s', 0):,.0f}" for b in bs]
        cells += [f"{r['ttft_ms']:.0f}", f"{r['weights_gib']:.2f}", f"{r['kv_blocks']:,}", f"{r['load_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    one = runs[0]
    for many, label in zip(runs[1:], labels[1:]):
        lines += ["", f"{label} against 1 GPU: batch 1 {many['b1_tok_s'] / one['b1_tok_s']:.2f}×, "
                  + ", ".join(f"batch {b} {many[f'b{b}_out_tok_s'] / one[f'b{b}_out_tok_s']:.2f}×" for b in bs)
                  + f" the throughput; TTFT {many['ttft_ms'] / one['ttft_ms']:.2f}× as long."]
        if "nll_max_abs_diff" in many:
            lines[-1] += (f" Agreement with 1 GPU: mean log-likelihood of 4 fixed 512-token sequences within "
                          f"{many['nll_max_abs_diff']:.4f} nats; greedy outputs (4 prompts, 32 tokens) identical for "
                          f"the first {min(many['greedy_same_prefix'])}-{max(many['greedy_same_prefix'])} tokens "
                          "(bf16 all-reduces add in another order, so near-ties of random weights flip).")
    if res.get("note"):
        lines += ["", res["note"]]
    name = section_name(runs[-1]["tp"])
    lines += ["", f"![tensor parallel]({name}{tag}.png)", "",
              f"Raw numbers: `benchmarks/results/{name}_results_{card}.json`. Reproduce: "
              "`python benchmarks/tp.py --out "
              f"/tmp/tp --tp {many['tp']}` on {many['tp']} {card.upper()}s, then `python benchmarks/tp.py --report "
              "/tmp/tp/tp_results.json`."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--report", default=None, help="results JSON: write the docs section and plot from it")
    p.add_argument("--note", default=None, help="with --report: a paragraph added to the section")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny config (checks the script, not speed)")
    p.add_argument("--checkpoint", default=None, help="where the random checkpoint is written (reused if there)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="32,128")
    args = p.parse_args(argv)
    from benchmarks._report import measure_or_report

    world = json.loads(Path(args.report).read_text())["runs"][-1]["tp"] if args.report else args.tp
    return measure_or_report(args, section_name(world), "tp_results.json", lambda r: r["device"], measure, report,
                             plot)


def section_name(world: int) -> str:
    """Docs section, plot and raw-file stem of a run on ``world`` GPUs (``tp`` for two, as before; ``tp4``...)."""
    return "tp" if world == 2 else f"tp{world}"


if __name__ == "__main__":
    raise SystemExit(main())
