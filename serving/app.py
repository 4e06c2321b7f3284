"""The Ray Serve application: an OpenAI ingress (FastAPI) in front of one engine deployment per model.

    serve run serving.app:build_app model=/path/to/awq-model            # args as key=value
    serve deploy serving/serve_config.example.yaml                      # the same, from YAML
    rayawq serve /path/to/awq-model --port 8000                         # cluster/serve_cmd.py

``build_app(args)`` composes the deployments from an ``AppConfig`` (like Ray Serve LLM's
``build_openai_app``): flat keys (``model=...``, ``tp=...``) describe one model, ``models: [...]`` several.
``run_local(model_path)`` starts (or joins) Ray, runs the app and returns a ``LocalServer`` with the base URL
and ``shutdown()``, for scripts such as the demo.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


# -- configuration -------------------------------------------------------------------------------------
class ModelConfig(BaseModel):
    """One served model: the engine's settings and its deployment's (replicas, resources, health)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str                                   # checkpoint directory (visible to every node)
    name: str | None = None                      # served model name (default: the directory's name)
    # engine (serving.config.EngineConfig)
    model_format: Literal["auto", "awq", "hf"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    device: str | None = None
    tp: int = Field(1, ge=1)
    max_batch_size: int | None = Field(None, ge=1)            # EngineConfig.max_num_seqs
    session_len: int | None = Field(None, ge=2)
    cache_max_entry_count: float | None = Field(None, gt=0, le=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    block_size: int | None = Field(None, ge=1)
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = None
    chat_template: str | None = None                         # Jinja text, or a file every node can read
    engine: dict[str, Any] = Field(default_factory=dict)      # any other EngineConfig field
    tool_parser: Literal["auto", "hermes", "llama3", "none"] = "auto"
    profile_dir: str | None = None                            # traces of POST /start_profile .. /stop_profile
    # deployment
    num_replicas: int = Field(1, ge=1)
    autoscale: tuple[int, int] | None = None                  # (min, max) replicas: autoscaling on
    target_ongoing_requests: float | None = Field(None, gt=0)  # per replica; default max_batch_size / 2
    max_ongoing_requests: int | None = Field(None, ge=1)       # per replica; default 2 x max_batch_size
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | None = Field(None, ge=0)                # default: 1 per TP rank where GPUs exist
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(60.0, gt=0)
    stuck_timeout_s: float = Field(300.0, gt=0)               # no engine progress with requests in flight
    # streamed messages per second per replica, shared by its streams (several tokens per message under
    # load; 0: one message per decode step and stream)
    stream_messages_per_s: float = Field(1000.0, ge=0)
    runtime_env: dict[str, Any] | None = None

    @field_validator("autoscale", mode="before")
    @classmethod
    def _autoscale(cls, v):
        if isinstance(v, str):
            v = [int(x) for x in v.replace(" ", "").split(",") if x]
        if v is not None:
            if len(v) != 2 or not 0 <= v[0] <= v[1] or v[1] < 1:
                raise ValueError("autoscale is 'min,max' with 0 <= min <= max and max >= 1")
        return tuple(v) if v is not None else None

    @model_validator(mode="after")
    def _check(self):
        if self.name is None:
            self.name = Path(self.model).name or self.model
        return self

    def engine_config(self):
        from .config import EngineConfig

        kw = dict(self.engine)
        for ours, theirs in (("model_format", "model_format"), ("dtype", "dtype"), ("device", "device"),
                             ("tp", "tp"), ("max_batch_size", "max_num_seqs"), ("session_len", "session_len"),
                             ("cache_max_entry_count", "cache_max_entry_count"), ("num_kv_blocks", "num_kv_blocks"),
                             ("max_num_batched_tokens", "max_num_batched_tokens"), ("block_size", "block_size"),
                             ("enable_prefix_caching", "enable_prefix_caching"), ("enforce_eager", "enforce_eager"),
                             ("chat_template", "chat_template")):
            v = getattr(self, ours)
            if v is not None:
                kw[theirs] = v
        kw.setdefault("progress", False)
        return EngineConfig(**kw)

    def batch_size(self) -> int:
        return int(self.max_batch_size or self.engine.get("max_num_seqs") or 128)


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(min_length=1)
    api_keys: list[str] = Field(default_factory=list)
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.5, ge=0)
    ingress_max_ongoing_requests: int = Field(2048, ge=1)
    app_name: str = "rayawq"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v):
        if isinstance(v, str):
            v = [k.strip() for k in v.split(",")]
        return [k for k in (v or []) if k]

    @model_validator(mode="after")
    def _unique(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names must be unique, got {names}")
        return self

    @classmethod
    def from_args(cls, args: dict | "AppConfig") -> "AppConfig":
        """Nested (``models: [...]``) or flat (one model's keys next to the app's) arguments."""
        if isinstance(args, AppConfig):
            return args
        args = dict(args or {})
        if "models" not in args:
            app_keys = set(cls.model_fields)
            model = {k: v for k, v in args.items() if k not in app_keys}
            args = {k: v for k, v in args.items() if k in app_keys}
            args["models"] = [model]
        if not args.get("api_keys") and os.environ.get("RAYAWQ_API_KEYS"):
            args["api_keys"] = os.environ["RAYAWQ_API_KEYS"]
        return cls.model_validate(args)


def _has_gpus() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# -- deployments ---------------------------------------------------------------------------------------
@serve.deployment
class LLMServer:
    """Hosts one model's engine (a background-thread ``AsyncEngine``) and answers the ingress's calls."""

    def __init__(self, mcfg: dict):
        from .engine.llm_engine import LLMEngine
        from .metrics import EngineMetrics
        from .openai.engine_server import EngineServer

        self.cfg = ModelConfig.model_validate(mcfg)
        if self.cfg.tp > 1:  # this replica is rank 0; ranks 1.. are actors in its placement group's bundles
            from .tp_group import start_tp_engine

            engine = start_tp_engine(self.cfg.model, self.cfg.engine_config())
        else:
            engine = LLMEngine(self.cfg.model, self.cfg.engine_config())
        self.server = EngineServer(engine, self.cfg.name, self.cfg.tool_parser, self.cfg.stream_messages_per_s,
                                   self.cfg.profile_dir)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = "?"
        self.metrics = EngineMetrics(self.cfg.name)
        self.server.add_observer(self.metrics)
        self.created = int(time.time())
        self._stop = threading.Event()
        threading.Thread(target=self._refresh_gauges, name="rayawq-gauges", daemon=True).start()

    def _refresh_gauges(self):
        while not self._stop.wait(2.0):
            try:
                self.metrics.update(self.server.engine_stats())
            except Exception:
                log.exception("gauge update failed")

    async def generate(self, req: dict):
        async for batch in self.server.generate(req):
            yield batch

    async def complete(self, req: dict) -> list[dict]:
        """A non-streaming request: one reply, no per-token messages."""
        return await self.server.complete(req)

    def info(self) -> dict:
        return {**self.server.info(), "root": self.cfg.model, "created": self.created}

    def stats(self) -> dict:
        return {**self.server.engine_stats(), "replica": self.replica}

    def replica_actor_name(self) -> str:
        return serve.get_replica_context().replica_id.to_full_id_str()

    async def tokenize(self, req: dict):
        """On the tokenizer thread: a sync method would run on the replica's event loop, which every stream
        of this replica shares."""
        return await self.server.offload(self._safe, self.server.tokenize, req)

    async def detokenize(self, tokens: list[int]):
        return await self.server.offload(self._safe, self.server.detokenize, tokens)

    async def profile(self, action: str):
        from .openai.engine_server import _err
        from .openai.protocol import OpenAIError

        try:
            return await self.server.profile(action)
        except OpenAIError as e:
            return {"type": "error", **_err(e)}

    def _safe(self, fn, *args):
        from .openai.engine_server import _err
        from .openai.protocol import OpenAIError

        try:
            return fn(*args)
        except OpenAIError as e:
            return {"type": "error", **_err(e)}

    def check_health(self):
        self.server.healthy(self.cfg.stuck_timeout_s)

    def __del__(self):
        try:
            self._stop.set()
            self.server.shutdown()
        except Exception:
            pass


class ServeBackend:
    """``routes.create_app``'s backend over deployment handles, one per model."""

    def __init__(self, handles: dict):
        self.handles = handles
        self._info: dict[str, dict] = {}

    def model_names(self) -> list[str]:
        return list(self.handles)

    async def info(self, model: str) -> dict:
        if model not in self._info:
            self._info[model] = await self.handles[model].info.remote()
        return self._info[model]

    async def call(self, model: str, method: str, *args):
        return await getattr(self.handles[model], method).remote(*args)

    async def generate(self, model: str, req: dict):
        gen = self.handles[model].options(stream=True).generate.remote(req)
        try:
            async for batch in gen:
                yield batch
        finally:
            gen.cancel()  # a no-op when finished; frees the engine's request when the client went away

    async def complete(self, model: str, req: dict) -> list[dict]:
        return await self.handles[model].complete.remote(req)


@serve.ingress()
class OpenAIIngress:
    def __init__(self, models: dict, api_keys: list[str]):
        self.backend = ServeBackend(models)
        self.api_keys = api_keys

    def __serve_build_asgi_app__(self):
        from .openai.routes import create_app

        return create_app(self.backend, self.api_keys)


def build_app(args: dict | AppConfig | None = None) -> serve.Application:
    """The Serve application for ``serve run serving.app:build_app model=...`` and ``serve deploy``."""
    cfg = AppConfig.from_args(args or {})
    gpus = None
    handles = {}
    for m in cfg.models:
        if m.num_gpus is None:
            gpus = _has_gpus() if gpus is None else gpus
            dev = (m.device or ("cuda" if gpus else "cpu"))
            num_gpus = 1.0 if dev.startswith("cuda") else 0.0
        else:
            num_gpus = m.num_gpus
        actor = {"num_cpus": m.num_cpus, "num_gpus": num_gpus}  # per rank; the replica is rank 0
        if m.runtime_env:
            actor["runtime_env"] = m.runtime_env
        bs = m.batch_size()
        opts: dict[str, Any] = {
            "name": f"LLMServer:{m.name}".replace("/", "_"),
            "ray_actor_options": actor,
            "max_ongoing_requests": m.max_ongoing_requests or 2 * bs,
            "health_check_period_s": m.health_check_period_s,
            "health_check_timeout_s": m.health_check_timeout_s,
            "graceful_shutdown_timeout_s": 5,
        }
        if m.tp > 1:  # one bundle per rank on one node (NVLink), the replica's own first
            bundle = {k: v for k, v in (("CPU", m.num_cpus), ("GPU", num_gpus)) if v}
            if not bundle:
                raise ValueError(f"model {m.name!r}: tp={m.tp} places one bundle per rank, and a rank with "
                                 "num_cpus=0 and no GPU has nothing to place: give num_cpus > 0")
            opts["placement_group_bundles"] = [dict(bundle) for _ in range(m.tp)]
            opts["placement_group_strategy"] = "STRICT_PACK"
        if m.autoscale:
            lo, hi = m.autoscale
            opts["autoscaling_config"] = {
                "min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
                "target_ongoing_requests": m.target_ongoing_requests or max(1.0, bs / 2),
                "upscale_delay_s": 10, "downscale_delay_s": 120,
            }
        else:
            opts["num_replicas"] = m.num_replicas
        handles[m.name] = LLMServer.options(**opts).bind(m.model_dump())
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
        max_ongoing_requests=cfg.ingress_max_ongoing_requests)
    return ingress.bind(handles, cfg.api_keys)


# -- run it from a script ------------------------------------------------------------------------------
class LocalServer:
    """A running app: ``base_url`` for OpenAI clients (``.../v1``), ``url`` for the chat page."""

    def __init__(self, host: str, port: int, app_name: str, model_names: list[str], started_ray: bool,
                 api_key: str | None):
        self.host, self.port, self.app_name = host, port, app_name
        self.model_names, self.started_ray, self.api_key = model_names, started_ray, api_key
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.base_url = self.url + "/v1"

    def client(self, **kw):
        """An ``openai.OpenAI`` client for this server."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", **kw)

    def shutdown(self) -> None:
        """Stop Serve and Ray when ``run_local`` started Ray; on a joined cluster delete only this app."""
        import ray

        if not self.started_ray:  # a shared cluster: remove only this app
            serve.delete(self.app_name)
            return
        try:
            serve.shutdown()
        finally:
            if ray.is_initialized():
                ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def run_local(model_path: str | None = None, port: int = 8000, host: str = "127.0.0.1",
              address: str | None = None, ray_num_cpus: int | None = None, ready_timeout_s: float = 600.0,
              config: dict | AppConfig | None = None, **model_kwargs) -> LocalServer:
    """Serve ``model_path`` (or ``config``) on ``host:port`` and wait until it answers; returns a ``LocalServer``.

    ``address``: a Ray cluster to join (``auto``: the one this machine runs, else a new local one; None: a new
    local one unless Ray is already initialised); ``ray_num_cpus``: CPUs of a new local cluster.
    ``model_kwargs`` are ``ModelConfig`` fields (``name``, ``max_batch_size``, ``num_cpus`` ...) and ``AppConfig``
    fields (``api_keys``, ``ingress_num_cpus`` ...).
    """
    import ray

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    app_keys = {k: model_kwargs.pop(k) for k in list(model_kwargs) if k in AppConfig.model_fields}
    if config is None:
        if model_path is None:
            raise ValueError("give model_path or config")
        config = {**app_keys, "models": [{"model": str(model_path), **model_kwargs}]}
    cfg = AppConfig.from_args(config)
    started = False
    if not ray.is_initialized():
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                          if p)}}
        if address:
            try:
                ray.init(address=address, runtime_env=env)
            except ConnectionError:
                if address != "auto":
                    raise
                ray.init(address="local", num_cpus=ray_num_cpus, include_dashboard=False, runtime_env=env)
                started = True
        else:
            ray.init(address="local", num_cpus=ray_num_cpus, include_dashboard=False, runtime_env=env)
            started = True
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    server = LocalServer(host, port, cfg.app_name, [m.name for m in cfg.models], started,
                         cfg.api_keys[0] if cfg.api_keys else None)
    _wait_ready(server.url, ready_timeout_s)
    return server


def _wait_ready(url: str, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                if r.status == 200:
                    return
        except Exception as e:
            last = e
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not become ready in {timeout_s:.0f} s ({last})")
