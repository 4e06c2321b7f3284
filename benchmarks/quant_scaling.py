"""Distributed AWQ scaling: wall time of the Ray job on 1, 2, 4 GPUs for a Llama-2-7B-shape model.

Random weights in the real shapes are written once to local disk (speed does not depend on the values);
calibration is 128 x 512 tokens, group 128, scale search + clip. Each GPU count runs as a fresh job on the
same local Ray cluster. Peak GPU memory is read from every task; peak host RAM from the driver.

    source .devbundle/setup.sh && python3 benchmarks/quant_scaling.py --gpus 1,2,4 --out $OUT/scaling
"""

from __future__ import annotations

import argparse
import json
import resource
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


def run_one(model: Path, work: Path, gpus: int, calib: Path, samples: int, seqlen: int) -> dict:
    from cluster.quantize_job import run_distributed
    from quant.config import QuantConfig

    cfg = QuantConfig(group_size=128, calib_dataset=str(calib), calib_samples=samples, calib_seqlen=seqlen, batch_size=16,
                      dtype="bfloat16")
    t0 = time.perf_counter()
    summary = run_distributed(str(model), str(work), cfg, num_gpus=gpus, workers=max(gpus, 1), overwrite=True)
    wall = time.perf_counter() - t0
    return {"gpus": gpus, "wall_s": wall, "blocks": len(summary.blocks),
            "mean_block_s": sum(b.seconds for b in summary.blocks) / max(1, len(summary.blocks)),
            "peak_host_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "peak_gpu_gb_tasks": max(b.peak_gpu_gb for b in summary.blocks)}


def main() -> int:
    import ray

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--calib", default=str(ROOT / "quant" / "data" / "calib.txt"))
    p.add_argument("--model-dir", default="/tmp/rayawq-scaling-model")
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    args = p.parse_args()

    ray.init(include_dashboard=False)
    t0 = time.perf_counter()
    model = make_random_model(Path(args.model_dir), args.shape, args.layers, Path(args.calib))
    print(f"model written in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for n in [int(x) for x in args.gpus.split(",")]:
        if n > ray.cluster_resources().get("GPU", 0) and n > 0:
            print(f"skip {n} GPUs: only {ray.cluster_resources().get('GPU', 0)} here", flush=True)
            continue
        rows.append(run_one(model, Path("/tmp/rayawq-scaling-out"), n, Path(args.calib), args.calib_samples,
                            args.calib_seqlen))
        print(rows[-1], flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "quant_scaling.json").write_text(json.dumps(rows, indent=1))  # survives a cut-off run
    from benchmarks._report import stamp

    import torch

    rows.sort(key=lambda r: r["gpus"])
    base = rows[0]["wall_s"] if rows else float("nan")
    md = ["## Distributed quantization scaling (`benchmarks/quant_scaling.py`)", "",
          stamp(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'} "
                f"x{int(ray.cluster_resources().get('GPU', 0))}"), "",
          f"{args.shape} shape, {args.layers} layers, random weights; {args.calib_samples} × {args.calib_seqlen} "
          "calibration tokens, group 128, "
          "scale search (20 ratios + duo) + clip.", "",
          "| GPUs | wall time (s) | speedup | mean block (s) | peak GPU memory per task (GB) | peak host RAM, driver (GB) |",
          "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['gpus']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}× | {r['mean_block_s']:.1f} | "
                  f"{r['peak_gpu_gb_tasks']:.1f} | {r['peak_host_gb']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_scaling_section.md").write_text("\n".join(md))
    (out / "quant_scaling.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
