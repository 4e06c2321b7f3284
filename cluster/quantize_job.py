"""Distributed AWQ: the FP pass walks the blocks here; each block's search runs on a block worker (a Ray actor).

    ray job submit --working-dir . -- python -m cluster.quantize_job MODEL --work-dir OUT [--num-gpus N]

Block *i*'s inputs are block *i-1*'s full-precision outputs, so as soon as the driver has them, block *i*
goes to a free worker (one GPU each, or CPU) while the driver moves on to block *i+1*. Workers read their block from
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
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.block_task import NOSET_ENV, BlockWorker, pack_tensors, to_array, unpack_tensors
from cluster.handoff import CudaHandoff, HandoffError, device_uuid
from quant.cli import add_quant_args, config_from_args
from quant.config import QuantConfig
from quant.errors import QuantError
from quant.pipeline import BlockWriter, QuantPlan, QuantSummary

log = logging.getLogger("rayawq.job")

# Failures worth another try on another worker; a QuantError is deterministic and is not retried.
RETRYABLE = [RuntimeError, OSError, ConnectionError]


def resources(num_gpus: int) -> dict:
    return {"num_gpus": 1, "num_cpus": 1} if num_gpus > 0 else {"num_cpus": 1}


def reserve(num_gpus: int, workers: int) -> PlacementGroup:
    """One bundle per worker: tasks scheduled into it run at most ``workers`` at once, however many are
    submitted, so tasks queued ahead wait for this job's own GPUs instead of taking other ones."""
    bundle = {"GPU": 1, "CPU": 1} if num_gpus > 0 else {"CPU": 1}
    pg = placement_group([bundle] * workers, strategy="PACK")
    have = ray.cluster_resources()
    short = {k: workers * v for k, v in bundle.items() if have.get(k, 0) < workers * v}
    if short:  # an autoscaling cluster may still grow; a fixed one never will, so say what to change
        print(f"[rayawq] waiting for {workers} x {bundle}: the cluster has {have.get('GPU', 0):g} GPUs and "
              f"{have.get('CPU', 0):g} CPUs now; lower --workers / --num-gpus unless nodes are being added", flush=True)
    waited, ready_ref = 0, pg.ready()
    while True:
        ready, _ = ray.wait([ready_ref], timeout=30)
        if ready:
            return pg
        waited += 30
        print(f"[rayawq] still waiting for {workers} x {bundle} after {waited} s", flush=True)


class _Dispatch:
    """The driver's side of the pipeline: inputs out to the block workers, results to the writer.

    Up to ``limit`` blocks are in flight; with ``limit`` above the worker count the extra ones wait in a
    worker's queue, their inputs already sent, so a GPU does not idle while the driver collects, saves and
    submits. A block goes to the worker that should free first (``pick_worker``). Inputs go as CUDA IPC handles
    when ``handoff`` (workers on this node, inputs on a GPU; the driver keeps each tensor until its block is
    done), else through the object store. Finished blocks go to a ``BlockWriter`` thread.
    """

    def __init__(self, plan: QuantPlan, workers: list, call_options: dict, limit: int, handoff: bool = False):
        self.plan, self.workers, self.call_options = plan, workers, call_options
        self.limit, self.handoff = limit, handoff
        self.load = [0] * len(workers)  # blocks sent to each worker and not yet collected
        self.last_sent = [0.0] * len(workers)  # perf_counter of each worker's latest block
        self.in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (block, worker)
        self.submitted: dict[int, float] = {}
        self.kept: dict[int, torch.Tensor] = {}  # inputs shared by handle, alive until their block is done
        self.writer = BlockWriter(self._save)
        self._rope = None  # the driver's RoPE tables in the object store, put once, read by every block
        self.t0 = time.perf_counter()

    def timing(self, i: int) -> dict[str, float]:
        return self.plan.summary.timings.setdefault(i, {})

    def _send(self, i: int, x: torch.Tensor):
        if self.handoff and x.is_cuda:
            try:
                h = CudaHandoff.of(x)
                self.kept[i] = x
                return h
            except Exception as e:  # noqa: BLE001 - e.g. an allocator mode without IPC: use the object store
                log.warning("CUDA IPC handles unavailable (%s); sending inputs through the object store", e)
                self.handoff = False
        return ray.put(to_array(x))

    def pick_worker(self) -> int:
        """The worker with the fewest blocks; among equals, the one whose latest block was sent longest ago
        (taking the first of equals piled 9 blocks on one of 4 GPUs and 7 on another)."""
        return min(range(len(self.workers)), key=lambda k: (self.load[k], self.last_sent[k]))

    def _launch(self, i: int, arg) -> None:
        w = self.pick_worker()
        self.load[w] += 1
        self.last_sent[w] = time.perf_counter()
        self.submitted[i] = time.time()
        if self._rope is None:
            self._rope = ray.put(pack_tensors(dict(zip(("cos", "sin"), self.plan.rope))))
        ref = self.workers[w].search.options(**self.call_options).remote(i, arg, self.plan.cfg, self.plan.cdtype,
                                                                         self.plan.spec, self._rope)
        self.in_flight[ref] = (i, w)

    def submit(self, i: int, x: torch.Tensor) -> None:
        """Send block ``i``'s inputs now (while earlier blocks run), then wait for room and submit."""
        t = time.perf_counter()
        arg = self._send(i, x)
        self.timing(i)["send"] = time.perf_counter() - t
        t = time.perf_counter()
        while len(self.in_flight) >= self.limit:
            self.collect(block=True)
        self.timing(i)["wait_slot"] = time.perf_counter() - t
        self._launch(i, arg)
        self.collect(block=False)

    def collect(self, block: bool) -> None:
        ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=None if block else 0)
        for ref in ready:
            i, w = self.in_flight.pop(ref)
            self.load[w] -= 1
            t = time.perf_counter()
            try:
                packed, report, task_timings = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                if not isinstance(exc.as_instanceof_cause(), HandoffError) or i not in self.kept:
                    raise
                log.warning("block %d: %s; sending inputs through the object store from now on",
                            i, str(exc.as_instanceof_cause()).splitlines()[-1])
                self.handoff = False
                self._launch(i, ray.put(to_array(self.kept.pop(i))))
                continue
            if self.kept.pop(i, None) is not None:
                torch.cuda.ipc_collect()  # free what the workers have let go of
            got = time.time()
            tm = self.timing(i)
            tm["get"] = time.perf_counter() - t
            tm["submit_to_start"] = task_timings.pop("start") - self.submitted.pop(i)
            tm["end_to_got"] = got - task_timings.pop("end")
            tm.update(task_timings)
            self.writer.submit(packed, report)

    def drain(self) -> None:
        while self.in_flight:
            self.collect(block=True)
        t = time.perf_counter()
        self.writer.close()
        self.plan.summary.job_timings["writer_drain"] = time.perf_counter() - t

    def _save(self, packed: dict, report) -> None:
        """On the writer thread: save the part, then report progress (so "done" means on disk)."""
        t = time.perf_counter()
        self.plan.save_block(unpack_tensors(packed), report)
        self.timing(report.index)["save"] = time.perf_counter() - t
        plan, total = self.plan, self.plan.num_blocks
        tm = self.timing(report.index)
        steps = " ".join(f"{k} {v:.2f}" for k, v in tm.items())
        print(f"[rayawq] block {report.index + 1}/{total} done in {report.seconds:.1f}s "
              f"(mse rtn {report.mse_rtn:.3e} -> awq {report.mse_awq:.3e}); "
              f"{len(plan.summary.blocks) + len(plan.summary.skipped)}/{total} finished, "
              f"{time.perf_counter() - self.t0:.0f}s elapsed [s: {steps}]", flush=True)


def _fp_blocks(plan: QuantPlan):
    """``plan.fp_pass()`` with the seconds each block's FP step took (the driver's own compute)."""
    it = plan.fp_pass()
    while True:
        t = time.perf_counter()
        try:
            i, _layer, x, _ctx = next(it)
        except StopIteration:
            return
        yield i, x, time.perf_counter() - t


def _handoff_peer(pg: PlacementGroup, num_gpus: int) -> str | None:
    """The UUID of the driver's GPU when block inputs can go as CUDA IPC handles: GPU tasks, all of them on
    this node, and not turned off with RAYAWQ_CUDA_IPC=0. ``None`` means: through the object store."""
    if num_gpus <= 0 or not torch.cuda.is_available() or os.environ.get("RAYAWQ_CUDA_IPC", "1") == "0":
        return None
    nodes = set(ray.util.placement_group_table(pg).get("bundles_to_node_id", {}).values())
    if nodes != {ray.get_runtime_context().get_node_id()}:
        return None
    return device_uuid(torch.cuda.current_device())


def _release(block_workers: list, pg: PlacementGroup) -> None:
    for w in block_workers:
        ray.kill(w)
    remove_placement_group(pg)


def run_distributed(model: str, work_dir: str, cfg: QuantConfig, num_gpus: int = 0, workers: int | None = None,
                    overwrite: bool = False, act_budget_gb: float = 8.0, max_retries: int = 3,
                    prefetch: int = 1) -> QuantSummary:
    """Quantize with one block worker (a Ray actor in its own placement-group bundle) per GPU, or per CPU when
    ``num_gpus`` is 0; a worker that dies is restarted and its block retried (``max_retries``).

    ``workers`` blocks are searched at once (default: ``num_gpus``, or the CPUs); ``prefetch`` more wait
    in a worker's queue with their inputs already sent (one block's n x seq x hidden each: as CUDA IPC handles to
    the driver's GPU when every worker is on this node, which holds up to ``workers + prefetch`` blocks' inputs
    there beyond ``act_budget_gb``; else in the object store).
    """
    compute = "cuda" if num_gpus > 0 else "cpu"
    workers = workers or max(1, num_gpus or int(ray.available_resources().get("CPU", 1)))
    pg = reserve(num_gpus, workers)
    extra = {"runtime_env": {"env_vars": dict(NOSET_ENV)}} if num_gpus > 0 else {}
    # one actor per bundle, warming up (imports, CUDA context, the model's files) while the driver sets up
    actor = ray.remote(BlockWorker)
    created = time.time()
    opts = dict(max_restarts=max_retries, max_task_retries=max_retries, **extra, **resources(num_gpus))
    block_workers = [actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b),
                                   **opts).remote(model) for b in range(workers)]
    peer = _handoff_peer(pg, num_gpus)  # the driver's own CUDA start-up, while the workers start
    if peer is not None:
        for w in block_workers:
            w.open_peer.remote(peer)
    try:
        plan = QuantPlan(model, work_dir, cfg, device="auto" if num_gpus > 0 else "cpu", overwrite=overwrite,
                         act_budget_gb=act_budget_gb, compute_device=compute)
    except BaseException:  # a refused input: give the cluster its workers back before saying so
        _release(block_workers, pg)
        raise
    total = plan.num_blocks
    plan.summary.job_timings["setup"] = time.perf_counter() - plan.t0
    run = _Dispatch(plan, block_workers, {"retry_exceptions": RETRYABLE}, workers + max(0, prefetch),
                    handoff=peer is not None)
    run.writer.call(plan.save_extra)  # on the writer thread while the blocks run, not in finish()
    plan.summary.job_timings["cuda_ipc_inputs"] = float(peer is not None)
    try:
        try:
            for i, x, fp_s in _fp_blocks(plan):
                if plan.staging.done(plan.block_name(i)):
                    plan.summary.skipped.append(i)
                    print(f"[rayawq] block {i + 1}/{total} already done, skipped", flush=True)
                    continue
                run.timing(i)["fp"] = fp_s
                run.submit(i, x)
            run.drain()
            warm = ray.get([w.warm_status.remote() for w in block_workers])
            for err in filter(None, (e for e, _, _ in warm)):
                log.warning("a worker warm-up failed (the blocks ran anyway): %s", err)
            plan.summary.job_timings["worker_imported_transformers"] = float(any(t for _, _, t in warm))
            for step in ("process", "import", "imported", "init", "cuda", "peer", "ready"):
                at = [stamps[step] - created for _, stamps, _ in warm if step in stamps]
                if at:  # seconds from asking for the workers to the slowest one's step
                    plan.summary.job_timings[f"worker_{step}"] = max(at)
        finally:
            run.writer.close(raise_error=False)  # on an error above: keep what finished (it resumes)
            _release(block_workers, pg)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, QuantError):
            plan.abandon()
            raise QuantError(str(cause).splitlines()[-1]) from None
        raise
    except QuantError:
        plan.abandon()
        raise
    t = time.perf_counter()
    summary = plan.finish()
    summary.job_timings["finish"] = time.perf_counter() - t
    return summary


def run_job(args: argparse.Namespace) -> int:
    """Entry shared by ``python -m cluster.quantize_job`` and ``rayawq quantize --ray-address``."""
    from cluster.ray_env import connect

    connect(args.ray_address)
    num_gpus = args.num_gpus if args.num_gpus is not None else int(ray.cluster_resources().get("GPU", 0))
    summary = run_distributed(args.model, args.work_dir, config_from_args(args), num_gpus=num_gpus,
                              workers=args.workers, overwrite=args.overwrite)
    print(summary.table(), flush=True)
    print(summary.timing_table(), flush=True)
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
