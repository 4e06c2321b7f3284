"""Metrics: Prometheus text for ``GET /metrics`` (the ingress's own registry) and ``ray.util.metrics`` in each
engine replica (the Ray dashboard's view, tagged per replica by Serve).

Names follow vLLM's where they overlap (``..._time_to_first_token_seconds``, ``..._num_requests_running``,
``..._kv_cache_usage_perc``), with the prefix ``rayawq_``.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics  # noqa: F401

disable_created_metrics()  # no *_created series: they double the page for nothing

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ENGINE_GAUGES = {
    "running": ("rayawq_num_requests_running", "Requests in the engine's running batch"),
    "waiting": ("rayawq_num_requests_waiting", "Requests queued in the engine"),
    "kv_cache_usage": ("rayawq_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)"),
    "kv_blocks_total": ("rayawq_kv_cache_blocks_total", "KV-cache blocks of the replica"),
    "num_preemptions": ("rayawq_num_preemptions", "Sequences preempted so far"),
}


class IngressMetrics:
    """What the HTTP layer sees, per model; rendered with the engines' gauges by ``render``."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rayawq_requests", "HTTP requests by route and status code",
                                ["model", "route", "status"], registry=r)
        self.in_flight = Gauge("rayawq_requests_in_flight", "Requests being answered by this ingress",
                               ["model"], registry=r)
        self.prompt_tokens = Counter("rayawq_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("rayawq_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("rayawq_time_to_first_token_seconds", "Time to first token, at the ingress",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("rayawq_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request, at the ingress", ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("rayawq_e2e_request_latency_seconds", "Request latency, at the ingress",
                             ["model"], buckets=E2E_BUCKETS, registry=r)
        self.engine = {k: Gauge(name, doc, ["model", "replica"], registry=r)
                       for k, (name, doc) in ENGINE_GAUGES.items()}

    def set_engine(self, model: str, replica: str, stats: dict) -> None:
        for k, g in self.engine.items():
            if k in stats:
                g.labels(model, replica).set(float(stats[k]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineMetrics:
    """``ray.util.metrics`` of one engine replica; an observer for ``EngineServer`` plus a gauge refresher.

    Serve tags metrics made inside a replica with its deployment, replica and application, so the dashboard
    (and Ray's Prometheus export) shows them per replica.
    """

    def __init__(self, model: str):
        from ray.util import metrics as m

        self.tags = {"model": model}
        keys = ("model",)
        self.gauges = {k: m.Gauge(name, description=doc, tag_keys=keys) for k, (name, doc) in ENGINE_GAUGES.items()}
        self.ttft = m.Histogram("rayawq_engine_time_to_first_token_seconds", description="TTFT in the engine",
                                boundaries=list(TTFT_BUCKETS), tag_keys=keys)
        self.tpot = m.Histogram("rayawq_engine_time_per_output_token_seconds", description="TPOT in the engine",
                                boundaries=list(TPOT_BUCKETS), tag_keys=keys)
        self.e2e = m.Histogram("rayawq_engine_request_latency_seconds", description="Request time in the engine",
                               boundaries=list(E2E_BUCKETS), tag_keys=keys)
        self.prompt_tokens = m.Counter("rayawq_engine_prompt_tokens", description="Prompt tokens", tag_keys=keys)
        self.generation_tokens = m.Counter("rayawq_engine_generation_tokens", description="Generated tokens",
                                           tag_keys=keys)
        self.requests = m.Counter("rayawq_engine_requests", description="Finished requests", tag_keys=keys)

    def __call__(self, event: str, **kw) -> None:
        t = self.tags
        if event == "ttft":
            self.ttft.observe(kw["seconds"], t)
        elif event == "tpot":
            self.tpot.observe(kw["seconds"], t)
        elif event == "finish":
            self.e2e.observe(kw["seconds"], t)
            self.requests.inc(1, t)
            if kw["prompt_tokens"]:
                self.prompt_tokens.inc(kw["prompt_tokens"], t)
            if kw["output_tokens"]:
                self.generation_tokens.inc(kw["output_tokens"], t)

    def update(self, stats: dict) -> None:
        for k, g in self.gauges.items():
            if k in stats:
                g.set(float(stats[k]), self.tags)
