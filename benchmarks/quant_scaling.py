"""Distributed AWQ scaling: wall time of the Ray job on 1, 2, 4 GPUs for a Llama-2-7B-shape model.

Random weights in the real shapes are written once to local disk (speed does not depend on the values);
calibration is 128 x 512 tokens, group 128, scale search + clip. Each GPU count runs as a fresh job on the
same local Ray cluster. Peak GPU memory is read from every task; peak host RAM from the driver.

    source .devbundle/setup.sh && python3 benchmarks/quant_scaling.py --gpus 1,2,4 --out $OUT/scaling
    python benchmarks/quant_scaling.py --report quant_scaling.json   # writes the docs section from that run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import threading
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=4096),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=32000),
}


def make_random_model(out: Path, shape: str, layers: int, calib_text: Path) -> Path:
    """A random-weight Llama of the given shape as safetensors shards, one block at a time (bounded RAM)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, torch_dtype="bfloat16",
                      architectures=["LlamaForCausalLM"], **SHAPES[shape])
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s):
        return (torch.randn(*s, generator=g, device=dev, dtype=torch.bfloat16) * 0.02).cpu()

    weight_map = {}
    for n in range(layers):
        p = f"model.layers.{n}."
        t = {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
             p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
             p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
             p + "mlp.down_proj.weight": rnd(h, i),
             p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        name = f"model-{n + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(t, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
    t = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
         "lm_head.weight": rnd(cfg.vocab_size, h)}
    name = f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors"
    save_file(t, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in t})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(out)
    from tests.tiny_models import train_tokenizer  # a small BPE: ids stay below the vocabulary

    train_tokenizer(out, vocab_size=4096)
    return out


class HostMemory:
    """Peak resident memory of this process during a ``with`` block, split as /proc/self/status does: anonymous
    (what the driver allocated) and file-backed (pages of mmap'd files it touched: safetensors weights read
    through ``safe_open`` count here, though they are the page cache). ``ru_maxrss`` is the process lifetime's
    peak of the sum, so a later GPU count would inherit an earlier one's."""

    def __init__(self, every_s: float = 0.1):
        self.every_s, self.peak = every_s, {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()

    @staticmethod
    def sample() -> dict[str, float]:
        got = {}
        try:
            for line in open("/proc/self/status"):
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    got[key] = int(rest.split()[0]) / 1024**2  # kB -> GB
        except OSError:
            return {}
        got["RssFile"] = got.get("RssFile", 0.0) + got.pop("RssShmem", 0.0)
        return got

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for k, v in self.sample().items():
                self.peak[k] = max(self.peak[k], v)

    def __enter__(self) -> "HostMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(model: Path, work: Path, gpus: int, calib: Path, samples: int, seqlen: int) -> dict:
    from cluster.quantize_job import run_distributed
    from quant.config import QuantConfig

    cfg = QuantConfig(group_size=128, calib_dataset=str(calib), calib_samples=samples, calib_seqlen=seqlen, batch_size=16,
                      dtype="bfloat16")
    shutil.rmtree(work, ignore_errors=True)  # the previous count's checkpoint: deleting it is not this run's work
    t0 = time.perf_counter()
    with HostMemory() as mem:
        summary = run_distributed(str(model), str(work), cfg, num_gpus=gpus, workers=max(gpus, 1), overwrite=True)
    wall = time.perf_counter() - t0
    return {"gpus": gpus, "wall_s": wall, "weights_sha1": weights_digest(work), "blocks": len(summary.blocks),
            "mean_block_s": sum(b.seconds for b in summary.blocks) / max(1, len(summary.blocks)),
            "peak_host_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "peak_host_anon_gb": mem.peak["RssAnon"], "peak_host_file_gb": mem.peak["RssFile"],
            "peak_gpu_gb_tasks": max(b.peak_gpu_gb for b in summary.blocks),
            "job_s": dict(summary.job_timings), "mean_step_s": summary.mean_timings(),
            "block_steps": {i: {k: round(v, 3) for k, v in t.items()} for i, t in sorted(summary.timings.items())}}


def weights_digest(ckpt: Path) -> str:
    """One hash over the checkpoint's safetensors files: the same on every GPU count if the job is exact."""
    h = hashlib.sha1()
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def plot(rows: list, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["gpus"])
    g = [r["gpus"] for r in rows]
    g0 = max(g[0], 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.4))
    bars = a.bar([str(n) for n in g], [r["wall_s"] for r in rows], color="#4c72b0")
    a.bar_label(bars, fmt="%.0f s", fontsize=8)
    a.set(xlabel="GPUs", ylabel="wall time (s)", title="quantization wall time")
    b.plot(g, [rows[0]["wall_s"] / r["wall_s"] for r in rows], "o-", label="measured")
    b.plot(g, [n / g0 for n in g], "--", color="#999999", label="ideal linear")
    b.set(xlabel="GPUs", ylabel=f"speedup vs {g[0]} GPU", title="speedup", xticks=g)
    b.legend(fontsize=8)
    fig.suptitle(f"{meta['shape']} shape, {meta['layers']} layers, AWQ search + clip, {meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list, meta: dict, note: str | None = None) -> str:
    """The docs section (``meta``: device, gpus, commit, date and the run's settings, as main() stores them)."""
    rows = sorted(rows, key=lambda r: r["gpus"])
    base = rows[0]["wall_s"] if rows else float("nan")
    md = ["## Distributed quantization scaling (`benchmarks/quant_scaling.py`)", "",
          f"Device: {meta['device']} x{meta['gpus']} · date: {meta['date']} · commit: `{meta['commit']}`", "",
          f"{meta['shape']} shape, {meta['layers']} layers, random weights; {meta['calib_samples']} × "
          f"{meta['calib_seqlen']} calibration tokens, group 128, scale search (20 ratios + duo) + clip. "
          "Speedup is against the smallest GPU count measured.", "",
          "| GPUs | wall time (s) | speedup | mean block (s) | peak GPU memory per task (GB) | peak host RAM, driver (GB) |",
          "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        split = (f" (this job: {r['peak_host_anon_gb']:.1f} allocated + {r['peak_host_file_gb']:.1f} mapped files)"
                 if "peak_host_anon_gb" in r else "")
        md.append(f"| {r['gpus']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}× | {r['mean_block_s']:.1f} | "
                  f"{r['peak_gpu_gb_tasks']:.1f} | {r['peak_host_gb']:.1f}{split} |")
    by = {r["gpus"]: r["wall_s"] for r in rows}
    if 1 in by:
        t4 = f"{by[1] / by[4]:.2f}× ({'met' if by[1] / by[4] >= 3 else '**not met**'})" if 4 in by else "not measured"
        md += ["", f"Targets: 1 GPU ≤ 180 s: {by[1]:.0f} s ({'met' if by[1] <= 180 else '**not met**'}); "
                   f"4 GPUs ≥ 3× faster than 1: {t4}."]
    digests = {r["weights_sha1"] for r in rows if r.get("weights_sha1")}
    if len(rows) > 1 and digests:
        md += ["", "Checkpoint files of every GPU count byte-identical: "
                   + ("yes" if len(digests) == 1 and all(r.get("weights_sha1") for r in rows) else "**no**") + "."]
    paced = [r for r in rows if r.get("mean_step_s")]
    if paced:
        md += ["", "Where a block's time goes (mean s per block; driver: FP forward, sending the inputs, waiting "
                   "for a free worker; task: search + pack; once per job: set-up, merge and publish):", ""]
        for r in paced:
            st, job = r["mean_step_s"], r.get("job_s", {})
            how = "CUDA IPC handles" if job.get("cuda_ipc_inputs") else "object store"
            md.append(f"- {r['gpus']} GPU(s), inputs by {how}: fp {st.get('fp', 0):.2f}, send "
                      f"{st.get('send', st.get('put', 0)):.2f}, wait {st.get('wait_slot', 0):.2f}; task "
                      f"{st.get('search_pack', 0):.2f} (+ {st.get('x_to_device', 0):.2f} inputs to GPU); "
                      f"set-up {job.get('setup', 0):.1f}, finish {job.get('finish', 0):.1f}"
                      + (f"; workers ready {job[ready]:.1f} s after start (imported "
                         f"{job.get('worker_imported', 0):.1f}, CUDA {job.get('worker_cuda', 0):.1f})"
                         if (ready := next((k for k in ("worker_ready", "worker_skeleton") if k in job), None))
                         else "") + ".")
    md += (["", note] if note else []) + ["", "![scaling](quant_scaling.png)", "",
           "Raw numbers: `benchmarks/results/quant_scaling.json`. Reproduce: `bash benchmarks/gpu_session.sh x4 <commit>` "
           "on 4 GPUs, then `python benchmarks/quant_scaling.py --report quant_scaling.json`."]
    return "\n".join(md) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--calib", default=str(ROOT / "quant" / "data" / "calib.txt"))
    p.add_argument("--model-dir", default="/tmp/rayawq-scaling-model")
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--report", default=None, help="write the docs section from this quant_scaling.json and exit")
    p.add_argument("--note", default=None, help="with --report: a paragraph added to the section")
    args = p.parse_args()
    if args.report:
        from benchmarks._report import write_section

        res = json.loads(Path(args.report).read_text())
        write_section("quant_scaling", report(res["rows"], res["meta"], args.note))
        return 0

    import datetime

    import ray
    import torch

    from benchmarks._report import git_commit

    ray.init(include_dashboard=False)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "gpus": int(ray.cluster_resources().get("GPU", 0)), "commit": git_commit(),
            "date": datetime.date.today().isoformat(), "shape": args.shape, "layers": args.layers,
            "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen}
    t0 = time.perf_counter()
    model = make_random_model(Path(args.model_dir), args.shape, args.layers, Path(args.calib))
    print(f"model written in {time.perf_counter() - t0:.0f}s", flush=True)
    out = Path(args.out)
    rows = []
    for n in [int(x) for x in args.gpus.split(",")]:
        if n > meta["gpus"] and n > 0:
            print(f"skip {n} GPUs: only {meta['gpus']} here", flush=True)
            continue
        rows.append(run_one(model, Path("/tmp/rayawq-scaling-out"), n, Path(args.calib), args.calib_samples,
                            args.calib_seqlen))
        print({k: rows[-1][k] for k in ("gpus", "wall_s", "job_s", "mean_step_s")}, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quant_scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # survives a cut-off run
        try:
            plot(rows, meta, out / "quant_scaling.png")
        except Exception as e:  # matplotlib only where it is installed; never lose the numbers to the figure
            print(f"no plot: {e!r}", flush=True)
    md = report(rows, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_scaling_section.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
