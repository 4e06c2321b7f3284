"""Connecting to Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import os

import ray


def connect(address: str | None = "auto", num_cpus: int | None = None) -> None:
    """Join ``address`` (``auto``: the cluster this process was started in, if any) or start a local one.

    The working tree travels to workers so ``quant``/``kernels``/``serving`` import there too.
    """
    if ray.is_initialized():
        return
    # Serve's proxy misses its default 5 s readiness check on small machines (DESIGN.md).
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    if address in (None, "", "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        return
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError:
        if address != "auto":
            raise
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
