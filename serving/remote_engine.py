"""A tensor-parallel engine for a plain Python process (pipeline, chat CLI, ``rayawq eval``).

On GPU, rank 0 must hold its GPU through Ray, or Ray may hand that GPU to another rank, and a driver holds none.
So here rank 0 runs in a Ray actor on bundle 0 of a STRICT_PACK placement group of ``tp`` bundles (the other ranks
take the other bundles, as in a Serve replica), and the caller talks to it through ``RemoteEngine``, which has the
``LLMEngine`` methods the pipeline uses. ``generate`` and ``get_ppl`` are one actor call each; ``stream`` is one
Ray streaming-generator call (each step's outputs travel while rank 0 runs the next step).
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Iterator

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import EngineConfig, ModelConfig
from .engine.llm_engine import RequestOutput
from .sampling_params import GenerationConfig
from .tokenizer import engine_tokenizer
from .tp_group import TPFollowers, packed_group, rank_bundle, rank_device, start_tp_engine

log = logging.getLogger(__name__)


class EngineHost:
    """Rank 0 in a Ray actor: starts the other ranks in its own placement group and runs the engine."""

    def __init__(self):
        self.engine = None
        self._lock = threading.Lock()  # the engine is single-threaded; this actor runs two calls at a time

    def build(self, model_path: str, ecfg: EngineConfig, tokenizer=None) -> dict:
        self.engine = start_tp_engine(model_path, ecfg, tokenizer=tokenizer)
        f = self.engine.followers  # their actors and follow() refs, so the caller can see a rank go
        return {"max_model_len": self.engine.max_model_len, "num_blocks": self.engine.runner.num_blocks,
                "device": str(self.engine.runner.device), "followers": (f.workers, f.loops)}

    def call(self, method: str, *args, **kwargs):
        with self._lock:
            return getattr(self.engine, method)(*args, **kwargs)

    def stream(self, prompts: list, params, request_ids: list[str]):
        """A Ray streaming generator: each engine step's outputs as soon as the step ends, while the next one runs
        (one actor call per batch of requests instead of one per step)."""
        steps = self.engine.stream(prompts, params, request_ids)
        try:
            while True:
                with self._lock:
                    step = next(steps, None)
                if step is None:
                    return
                yield step
        finally:
            with self._lock:
                steps.close()

    def cancel(self, request_ids: list[str]) -> None:
        """Abort streamed requests between two steps of their stream (this runs beside it), so that a call made
        after this one never steps them; the stream sees them gone and ends."""
        with self._lock:
            for rid in request_ids:
                self.engine.abort(rid)

    def close(self) -> None:
        if self.engine is not None:
            with self._lock:
                self.engine.close()


class RemoteEngine:
    """An ``LLMEngine`` split over ``ecfg.tp`` ranks, all of them Ray actors; starts a local Ray when none runs.

    ``close()`` stops the ranks and frees their placement group (and the Ray this started). A call that waits
    longer than ``watch_s`` checks that every rank is still there; when one is gone the engine closes and the call
    raises.
    """

    watch_s: float = 1.0

    def __init__(self, model_path: str | Path, ecfg: EngineConfig, tokenizer=None, ready_timeout_s: float = 600.0):
        model_path = str(model_path)
        self.config = ecfg
        self.model_config = ModelConfig.from_path(model_path, ecfg.model_format, ecfg.dtype)  # fails before Ray
        given = tokenizer is not None  # then rank 0 gets it too (pickled), else both load the model's
        self.tokenizer = engine_tokenizer(model_path, tokenizer, ecfg.chat_template)
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            log.info("starting a local Ray for tp=%d (connect to a cluster with ray.init() first to use it)", ecfg.tp)
            ray.init(include_dashboard=False)
        unit = rank_bundle(rank_device(ecfg))
        have = ray.cluster_resources()
        need = {k: v * ecfg.tp for k, v in unit.items()}
        short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
        self.host = self._pg = None
        try:
            if short:
                raise RuntimeError(f"tp={ecfg.tp} needs {need} (one bundle per rank) but the Ray cluster has "
                                   f"{ {k: have.get(k, 0.0) for k in need} }: lower tp or add resources")
            self._pg = packed_group(ecfg.tp, unit, ready_timeout_s)
            self.host = ray.remote(EngineHost).options(
                num_cpus=1, num_gpus=unit.get("GPU", 0.0), max_concurrency=2,  # a stream and its cancel
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=0),
            ).remote()
            info = ray.get(self.host.build.remote(model_path, ecfg, self.tokenizer if given else None))
        except BaseException:
            self._release()
            raise
        self.max_model_len = info["max_model_len"]
        self.num_blocks = info["num_blocks"]
        self.followers = TPFollowers(*info["followers"])
        log.info("tp=%d engine ready on %s: %d KV blocks per rank", ecfg.tp, info["device"], self.num_blocks)

    def _call(self, method: str, *args, **kwargs):
        if self.host is None:
            raise RuntimeError("this engine is closed")
        ref = self.host.call.remote(method, *args, **kwargs)
        while not ray.wait([ref], timeout=self.watch_s)[0]:
            self._check_ranks()
        return ray.get(ref)

    def _check_ranks(self) -> None:
        """On GPU a step whose peer rank is gone waits in NCCL for good: give up on the engine instead."""
        why = self.followers.dead()
        if why:
            self._release()
            raise RuntimeError(f"{why}; the engine is closed (start a new one)")

    def encode(self, prompt: str | list[int] | list[dict], chat: bool | None = None) -> list[int]:
        return self._call("encode", prompt, chat)

    def add_request(self, prompt: str | list[int] | list[dict], params: GenerationConfig | None = None,
                    request_id: str | None = None, stream: bool = False) -> str:
        return self._call("add_request", prompt, params, request_id, stream)

    def abort(self, request_id: str) -> bool:
        return self._call("abort", request_id)

    def has_unfinished(self) -> bool:
        return self._call("has_unfinished")

    def step(self) -> list[RequestOutput]:
        return self._call("step")

    def generate(self, prompts: list, params: GenerationConfig | list[GenerationConfig] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        return self._call("generate", prompts, params, use_tqdm)

    def stream(self, prompts: list, params: GenerationConfig | list[GenerationConfig] | None = None
               ) -> Iterator[list[tuple[int, RequestOutput]]]:
        """``LLMEngine.stream`` through one streaming actor call: rank 0 keeps stepping while the outputs travel.
        Closing the iterator early cancels what still runs."""
        if self.host is None:
            raise RuntimeError("this engine is closed")
        rids = [f"remote-{uuid.uuid4().hex}" for _ in prompts]
        gen = self.host.stream.options(num_returns="streaming").remote(prompts, params, rids)
        done = False
        try:
            while True:
                if not ray.wait([gen], timeout=self.watch_s)[0]:
                    self._check_ranks()
                    continue
                try:
                    ref = next(gen)
                except StopIteration:
                    break
                yield ray.get(ref)
            done = True
        finally:
            if not done and self.host is not None:  # before the caller's next call reaches rank 0
                try:
                    ray.get(self.host.cancel.remote(rids), timeout=60)
                except Exception as e:  # rank 0 gone: the next call says so
                    log.warning("could not cancel the stream's requests: %s", e)

    def get_ppl(self, input_ids: list[list[int]]) -> list[float]:
        return self._call("get_ppl", input_ids)

    def start_profile(self, out_dir: str | Path, with_stack: bool = False) -> None:
        self._call("start_profile", str(out_dir), with_stack)

    def stop_profile(self) -> str:
        return self._call("stop_profile")

    def close(self) -> None:
        """Stop every rank and free the placement group; safe to call twice."""
        if self.host is not None:
            try:
                ray.get(self.host.close.remote(), timeout=120)
            except Exception as e:  # a dead rank 0: its actors go with the placement group below
                log.warning("rank 0 did not close cleanly: %s", e)
        self._release()

    def _release(self) -> None:
        host, pg, self.host, self._pg = self.host, self._pg, None, None
        if host is not None:
            ray.kill(host)
        if pg is not None:
            remove_placement_group(pg)
        if self._own_ray:
            self._own_ray = False
            ray.shutdown()
