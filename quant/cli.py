"""``rayawq quantize``: flags and the single-process entry (the Ray job shares the flags)."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import QuantError


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """The quantization flags, shared with the Ray job entrypoint."""
    p.add_argument("model", help="model directory or Hugging Face hub id")
    p.add_argument("--work-dir", required=True, help="where the AWQ checkpoint is written")
    p.add_argument("--calib-dataset", default="builtin",
                   help="wikitext2, c4, pileval, ptb (from the hub), builtin (shipped WikiText-2 excerpt), "
                        "or a local .txt/.jsonl/.parquet file")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--w-group-size", type=int, default=128)
    p.add_argument("--search-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="grid-search the scale ratio (off: fixed ratio 0.5, as LMDeploy's default)")
    p.add_argument("--duo-scaling", action=argparse.BooleanOptionalAction, default=True,
                   help="also try weight-aware scales and keep the lower loss")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True, help="weight clipping search")
    p.add_argument("--method", choices=["awq", "rtn"], default="awq", help="rtn: plain round-to-nearest baseline")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --work-dir")


def config_from_args(args: argparse.Namespace):
    from .config import QuantConfig

    return QuantConfig(
        w_bits=args.w_bits, group_size=args.w_group_size, method=args.method, search_scale=args.search_scale,
        duo_scaling=args.duo_scaling, clip=args.clip, calib_dataset=args.calib_dataset,
        calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, batch_size=args.batch_size,
        seed=args.seed, dtype=args.dtype,
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from .pipeline import quantize_model

    if getattr(args, "ray_address", None):
        from cluster.quantize_job import run_job

        return run_job(args)
    summary = quantize_model(args.model, args.work_dir, config_from_args(args), device=args.device,
                             overwrite=args.overwrite)
    print(summary.table())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="AWQ-quantize a model into an AutoAWQ-layout checkpoint")
    add_quant_args(q)
    q.add_argument("--ray-address", default=None,
                   help="search blocks as Ray tasks on this cluster (auto: the running one, else a local one)")
    q.add_argument("--num-gpus", type=int, default=None, help="with --ray-address: GPUs, one per block task")
    q.add_argument("--workers", type=int, default=None, help="with --ray-address: blocks searched at once")
    q.set_defaults(func=cmd_quantize)



def run(func, args) -> int:
    """Run a command; a QuantError prints its message (no traceback) and exits 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return func(args)
    except QuantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
