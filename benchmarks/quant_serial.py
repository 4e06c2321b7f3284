"""Where the distributed quantizer's time goes around the search: per-block driver and task steps.

Runs ``cluster.quantize_job.run_distributed`` once on a local Ray cluster and prints the summary's timing
table (driver: fp, put, wait_slot, get; task: submit_to_start, x_to_device, rebuild, search_pack, to_array;
writer thread: save). A mid-size random Llama shows the host-side costs (object store, hashing, fsync) on a
CPU machine; on GPUs use the real shape:

    RAY_AUTH_MODE=disabled python benchmarks/quant_serial.py --shape mid --layers 6 --method rtn
    python benchmarks/quant_serial.py --shape llama2-7b --layers 32 --gpus 1 --calib-samples 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import quant_scaling  # noqa: E402

# Big enough for the object store, hashing and fsync to show; small enough for a 2-core CPU.
quant_scaling.SHAPES.setdefault("mid", dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                                            num_key_value_heads=8, vocab_size=4096))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="mid", choices=list(quant_scaling.SHAPES))
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--method", default="awq", choices=["awq", "rtn"])
    p.add_argument("--calib", default=str(ROOT / "quant" / "data" / "calib.txt"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--work-dir", default="/tmp/rayawq-serial-out")
    p.add_argument("--json", default=None, help="also write the timings here")
    args = p.parse_args()

    import ray

    from quant.config import QuantConfig

    model_dir = Path(args.model_dir or f"/tmp/rayawq-serial-model-{args.shape}-{args.layers}")
    model = quant_scaling.make_random_model(model_dir, args.shape, args.layers, Path(args.calib))
    ray.init(address="local", include_dashboard=False, num_gpus=args.gpus or None)
    from cluster.quantize_job import run_distributed

    cfg = QuantConfig(group_size=128, calib_dataset=args.calib, calib_samples=args.calib_samples,
                      calib_seqlen=args.calib_seqlen, batch_size=16, dtype="bfloat16", method=args.method)
    t0 = time.perf_counter()
    summary = run_distributed(str(model), args.work_dir, cfg, num_gpus=args.gpus, workers=args.workers,
                              overwrite=True)
    wall = time.perf_counter() - t0
    print(f"wall {wall:.1f} s for {len(summary.blocks)} blocks ({args.shape}, {args.layers} layers, "
          f"{args.calib_samples}x{args.calib_seqlen} tokens, {args.method}, gpus={args.gpus})")
    if hasattr(summary, "timing_table"):
        print(summary.timing_table())
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": wall, "timings": getattr(summary, "timings", {}),
                                               "job": getattr(summary, "job_timings", {})}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
