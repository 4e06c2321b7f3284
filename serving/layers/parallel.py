"""Where this rank sits in a tensor-parallel group; the only place that talks to torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed process group (NCCL on GPU, gloo on CPU); None for tp = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total`` (which must divide evenly)."""
        if total % self.world_size:
            raise ValueError(f"{what}={total} does not divide over tp={self.world_size}")
        return total // self.world_size


SINGLE = TPContext()
