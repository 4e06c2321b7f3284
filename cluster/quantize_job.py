"""Distributed AWQ: the FP pass walks the blocks here; each block's search runs as a Ray task.

    ray job submit --working-dir . -- python -m cluster.quantize_job MODEL --work-dir OUT [--num-gpus N]

Block *i*'s inputs are block *i-1*'s full-precision outputs, so as soon as the driver has them, block *i*
goes to a task (``num_gpus=1``, or CPU) while the driver moves on to block *i+1*. Tasks read their block from
the model's safetensors themselves, return the packed tensors through the object store, and the driver saves
each as a part with a manifest entry: a resubmitted job skips what is done. The result is the checkpoint
the single-process quantizer writes for the same inputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import ray

from cluster.block_task import search_block
from quant.cli import add_quant_args, config_from_args
from quant.config import QuantConfig
from quant.errors import QuantError
from quant.pipeline import QuantPlan, QuantSummary

log = logging.getLogger("rayawq.job")

# Failures worth another try on another worker; a QuantError is deterministic and is not retried.
RETRYABLE = [RuntimeError, OSError, ConnectionError]


def resources(num_gpus: int) -> dict:
    return {"num_gpus": 1, "num_cpus": 1} if num_gpus > 0 else {"num_cpus": 1}


def run_distributed(model: str, work_dir: str, cfg: QuantConfig, num_gpus: int = 0, workers: int | None = None,
                    overwrite: bool = False, act_budget_gb: float = 8.0, max_retries: int = 3) -> QuantSummary:
    """Quantize with one Ray task per block; ``num_gpus`` > 0 gives each task a GPU."""
    compute = "cuda" if num_gpus > 0 else "cpu"
    plan = QuantPlan(model, work_dir, cfg, device="auto" if num_gpus > 0 else "cpu", overwrite=overwrite,
                     act_budget_gb=act_budget_gb, compute_device=compute)
    workers = workers or max(1, num_gpus or int(ray.available_resources().get("CPU", 1)))
    task = ray.remote(search_block).options(max_retries=max_retries, retry_exceptions=RETRYABLE,
                                            **resources(num_gpus))
    in_flight: dict[ray.ObjectRef, int] = {}
    total, done = plan.num_blocks, 0
    t0 = time.perf_counter()

    def collect(block: bool) -> None:
        nonlocal done
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=None if block else 0)
        for ref in ready:
            in_flight.pop(ref)
            tensors, report = ray.get(ref)
            plan.save_block(tensors, report)
            done += 1
            print(f"[rayawq] block {report.index + 1}/{total} done in {report.seconds:.1f}s "
                  f"(mse rtn {report.mse_rtn:.3e} -> awq {report.mse_awq:.3e}); "
                  f"{len(plan.summary.blocks) + len(plan.summary.skipped)}/{total} finished, "
                  f"{time.perf_counter() - t0:.0f}s elapsed", flush=True)

    try:
        for i, _layer, x, _ctx in plan.fp_pass():
            if plan.staging.done(plan.block_name(i)):
                plan.summary.skipped.append(i)
                print(f"[rayawq] block {i + 1}/{total} already done, skipped", flush=True)
                continue
            while len(in_flight) >= workers:  # at most `workers` blocks (GPUs) at once
                collect(block=True)
            in_flight[task.remote(str(plan.source.path), i, x.cpu(), cfg, plan.cdtype)] = i
            collect(block=False)
        while in_flight:
            collect(block=True)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, QuantError):
            plan.staging.remove()
            raise QuantError(str(cause).splitlines()[-1]) from None
        raise
    except QuantError:
        plan.staging.remove()
        raise
    return plan.finish()


def run_job(args: argparse.Namespace) -> int:
    """Entry shared by ``python -m cluster.quantize_job`` and ``rayawq quantize --ray-address``."""
    from cluster.ray_env import connect

    connect(args.ray_address)
    num_gpus = args.num_gpus if args.num_gpus is not None else int(ray.cluster_resources().get("GPU", 0))
    summary = run_distributed(args.model, args.work_dir, config_from_args(args), num_gpus=num_gpus,
                              workers=args.workers, overwrite=args.overwrite)
    print(summary.table(), flush=True)
    return 0


def add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs to use, one per block task (default: all in the cluster; 0 = CPU tasks)")
    p.add_argument("--workers", type=int, default=None, help="blocks searched at once (default: GPUs or CPUs)")


def main(argv: list[str] | None = None) -> int:
    from quant.cli import run

    p = argparse.ArgumentParser(prog="python -m cluster.quantize_job", description=__doc__.splitlines()[0])
    add_quant_args(p)
    add_job_args(p)
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS", "auto"),
                   help="Ray cluster to join (auto: the one this job was submitted to, else a local one)")
    args = p.parse_args(argv)
    return run(run_job, args)


if __name__ == "__main__":
    sys.exit(main())
