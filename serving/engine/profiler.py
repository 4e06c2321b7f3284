"""torch.profiler traces of the engine's steps, one file per tensor-parallel rank (vLLM's start/stop_profile).

A tensor-parallel step is as slow as its slowest rank, so rank 0's trace alone cannot say where time goes:
``ModelRunner`` forwards start/stop to the followers and every rank writes ``rank<r>.trace.json.gz``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class StepProfiler:
    """One rank's profiler: ``start(dir)`` begins recording CPU and CUDA activity, ``stop()`` writes the trace.
    ``with_stack`` also records the Python calls (host time by function; slows the host down)."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.prof: torch.profiler.profile | None = None
        self.out_dir: Path | None = None

    def start(self, out_dir: str | os.PathLike, with_stack: bool = False) -> None:
        if self.prof is not None:
            raise RuntimeError("the profiler is already running: stop it first")
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts, with_stack=with_stack)
        self.prof.__enter__()
        self.out_dir = path

    def stop(self) -> Path:
        """End the recording and write this rank's trace (to a temp name, then renamed); returns its path."""
        if self.prof is None:
            raise RuntimeError("the profiler is not running: start it first")
        prof, self.prof = self.prof, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        final = self.out_dir / f"rank{self.rank}.trace.json.gz"
        tmp = final.with_name(f".{final.name}.tmp.json.gz")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, final)
        return final
