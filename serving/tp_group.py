"""Tensor-parallel ranks on Ray: the caller is rank 0, ranks 1..N-1 are ``TPWorker`` actors, one per GPU.

Rank 0 holds the engine (scheduler, sampler, tokenizer); every step it sends the batch to the other ranks over a
gloo group and they run the same forward, their all-reduces pairing up with its own (NCCL on GPU, gloo on CPU).
The workers sit in the caller's placement group when it has one (a Serve replica whose bundles are
``[rank 0, rank 1, ...]``, STRICT_PACK), else in one made here. Rank 0 picks the rendezvous port on its own host.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import replace
from pathlib import Path

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import EngineConfig, ModelConfig
from .engine.llm_engine import LLMEngine
from .engine import step_channel
from .layers.parallel import TPContext, leave_process_group

log = logging.getLogger(__name__)


class TPWorker:
    """One rank > 0: builds its shard of the model, then follows rank 0's steps until told to stop."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.runner = None

    def where(self) -> tuple[str, list[str]]:
        """This actor's node and GPUs."""
        return _where()

    def build(self, model_path: str, ecfg: EngineConfig, init_method: str, backend: str,
              visible: str | None = None, channel: str | None = None) -> int:
        """Join the group and build this rank's model, KV cache and CUDA graphs; returns its KV blocks."""
        from .engine.model_runner import ModelRunner

        if visible:
            ecfg = replace(ecfg, device=_see_group_gpus(visible, self.rank))
        tp = TPContext.init(self.rank, self.world_size, init_method, backend, channel=channel)
        cfg = ModelConfig.from_path(model_path, ecfg.model_format, ecfg.dtype)
        self.runner = ModelRunner(cfg, ecfg, model_path=model_path, tp=tp)
        return self.runner.num_blocks

    def follow(self) -> None:
        try:
            self.runner.follow()
        finally:
            self.runner.leave_group()


class TPFollowers:
    """Rank 0's handle on ranks 1..N-1: their actors, their ``follow`` calls and the placement group made here."""

    def __init__(self, workers: list, loops: list, own_pg=None):
        self.workers, self.loops, self.own_pg = workers, loops, own_pg

    def dead(self) -> str | None:
        """Why a follower is gone (its actor died, or its ``follow`` ended), or ``None`` while every one follows.

        On GPU a step whose peer is gone waits in NCCL (no error comes), so the health check asks this instead."""
        ready, _ = ray.wait(self.loops, num_returns=1, timeout=0)
        if not ready:
            return None
        rank = self.loops.index(ready[0]) + 1
        try:
            ray.get(ready[0], timeout=0)
        except Exception as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            return f"tensor-parallel rank {rank} died: {last}"
        return f"tensor-parallel rank {rank} stopped following rank 0"

    def close(self, timeout_s: float = 30.0) -> None:
        """After rank 0 sent ``stop``: wait for the followers to return, then free their actors."""
        try:
            ray.get(self.loops, timeout=timeout_s)
        except Exception as e:  # a follower that failed or hangs: it goes with its actor
            log.warning("a tensor-parallel rank did not stop cleanly: %s", e)
        _kill(self.workers, self.own_pg)


def _kill(workers: list, pg) -> None:
    for w in workers:
        try:
            ray.kill(w)
        except Exception:
            pass
    if pg is not None:
        remove_placement_group(pg)


def _where() -> tuple[str, list[str]]:
    return ray.get_runtime_context().get_node_id(), [str(i) for i in ray.get_gpu_ids()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rank_device(ecfg: EngineConfig) -> str:
    """The device the ranks run on: ``ecfg.device``, else CUDA where this process holds or sees a GPU."""
    if ecfg.device:
        return ecfg.device
    if ray.get_gpu_ids():  # asked first: CUDA must not start before _see_group_gpus
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def rank_bundle(device: str) -> dict:
    """One rank's placement-group bundle."""
    return {"GPU": 1.0, "CPU": 1.0} if device.startswith("cuda") else {"CPU": 1.0}


def packed_group(ranks: int, unit: dict, ready_timeout_s: float):
    """A STRICT_PACK placement group of ``ranks`` bundles ``unit`` (one node: NVLink, shared memory), ready."""
    pg = placement_group([dict(unit) for _ in range(ranks)], strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=ready_timeout_s)
    except Exception as e:
        remove_placement_group(pg)
        raise RuntimeError(f"the cluster cannot place {ranks} tensor-parallel rank(s) of {unit} on one node within "
                           f"{ready_timeout_s:.0f} s: add resources or lower tp") from e
    return pg


def _see_group_gpus(visible: str, rank: int) -> str:
    """Let this rank's process see every GPU of the group (Ray shows each actor only its own), in rank order, so
    that the ranks' devices are distinct and can map each other's memory (symmetric-memory all-reduce). Only
    possible before CUDA starts in the process; otherwise the rank keeps its one GPU. Returns its device."""
    import torch

    if torch.cuda.is_initialized():
        return "cuda"
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return f"cuda:{rank}" if torch.cuda.device_count() > rank else "cuda"


def start_tp_engine(model_path: str | Path, ecfg: EngineConfig, tokenizer=None,
                    ready_timeout_s: float = 600.0) -> LLMEngine:
    """An ``LLMEngine`` whose model is split over ``ecfg.tp`` ranks: this process and ``tp - 1`` Ray actors.

    Call ``engine.close()`` to stop the actors. A rank that fails while building takes the others down with it
    and its error is raised here.
    """
    if ecfg.tp < 2:
        raise ValueError(f"start_tp_engine is for tp >= 2 (got tp={ecfg.tp}); build LLMEngine directly")
    if not ray.is_initialized():
        raise RuntimeError("tensor parallelism needs Ray: call ray.init() (or run under Ray Serve) first")
    model_path = str(model_path)
    ModelConfig.from_path(model_path, ecfg.model_format, ecfg.dtype)  # bad checkpoints fail before any actor
    device = rank_device(ecfg)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    world = ecfg.tp
    pg, own_pg = get_current_placement_group(), None
    if pg is None and backend == "nccl" and not ray.get_gpu_ids():
        raise RuntimeError("on GPU, rank 0 must hold its GPU through Ray, or Ray may give the same GPU to "
                           "another rank: call start_tp_engine inside a Ray actor with num_gpus=1 (a Serve "
                           "replica with tp > 1 is one), not from the driver")
    if pg is not None:
        if len(pg.bundle_specs) < world:
            raise ValueError(f"tp={world} needs a placement group of {world} bundles (one per rank, rank 0 "
                             f"first); this one has {len(pg.bundle_specs)}")
        bundles = list(range(1, world))
    else:
        pg = own_pg = packed_group(world - 1, rank_bundle(device), ready_timeout_s)
        bundles = list(range(world - 1))
    actor_cls = ray.remote(TPWorker)
    workers = []
    for rank, b in enumerate(bundles, start=1):
        spec = pg.bundle_specs[b]
        workers.append(actor_cls.options(
            num_cpus=spec.get("CPU", 0), num_gpus=spec.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b),
        ).remote(rank, world))
    init_method = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
    ecfg = replace(ecfg, device=device)
    failed: list[str] = []
    done = threading.Event()
    channel = None
    try:
        places = [_where()] + ray.get([w.where.remote() for w in workers])
        visible = None
        if backend == "nccl" and device == "cuda" and ecfg.tp_symmetric_memory:
            ids = [gpus for _, gpus in places]
            if all(len(x) == 1 for x in ids) and len({x[0] for x in ids}) == world:
                visible = ",".join(x[0] for x in ids)
                ecfg = replace(ecfg, device=_see_group_gpus(visible, 0))
        # one node (STRICT_PACK): steps go through shared memory, else over gloo
        channel = step_channel.StepChannel.new_path() if len({node for node, _ in places}) == 1 else None
        builds = [w.build.remote(model_path, ecfg, init_method, backend, visible, channel) for w in workers]
        threading.Thread(target=_watch_builds, args=(builds, workers, failed, done), daemon=True,
                         name="rayawq-tp-build-watch").start()
        tp = TPContext.init(0, world, init_method, backend, channel=channel)
        engine = LLMEngine(model_path, ecfg, tokenizer=tokenizer, tp=tp)
        ray.get(builds)
    except BaseException as e:
        done.set()
        first = failed[:1]  # a follower's own error, not one of the kills below
        _kill(workers, own_pg)
        leave_process_group()
        if first:
            raise RuntimeError(f"a tensor-parallel rank failed while building: {first[0]}") from e
        raise
    finally:
        done.set()
        if channel is not None:
            step_channel.unlink(channel)
    engine.followers = TPFollowers(workers, [w.follow.remote() for w in workers], own_pg)
    log.info("tensor parallel over %d ranks (%s), %d KV blocks each", world, backend, engine.runner.num_blocks)
    return engine


def _watch_builds(builds: list, workers: list, failed: list, done: threading.Event) -> None:
    """A rank that fails to build leaves rank 0 blocked in a collective: kill every follower so that it fails
    (gloo sees the peers go) and report the first error."""
    pending = list(builds)
    while pending and not done.is_set():
        ready, pending = ray.wait(pending, timeout=1.0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                failed.append(str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))
                _kill(workers, None)
                return
