"""Where this rank sits in a tensor-parallel group; the only place that talks to torch.distributed."""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None      # a torch.distributed process group (NCCL on GPU, gloo on CPU); None for tp = 1
    cpu_group: Any = None  # gloo group for host messages (the steps rank 0 sends); None: ``group`` (gloo itself)

    @classmethod
    def init(cls, rank: int, world_size: int, init_method: str, backend: str,
             timeout_s: float = 1800.0) -> "TPContext":
        """Join the group at ``init_method`` (``tcp://host:port``, chosen by rank 0); blocks until all ranks do."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        cpu = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        return cls(rank, world_size, dist.group.WORLD, cpu)

    @property
    def is_leader(self) -> bool:
        """Rank 0 of a group of several: it schedules and samples, the others follow its steps."""
        return self.world_size > 1 and self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def min_int(self, v: int) -> int:
        """The smallest of every rank's ``v`` (e.g. KV blocks: the scheduler's count must fit every rank)."""
        if self.world_size == 1:
            return v
        import torch.distributed as dist

        t = torch.tensor([v], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group or self.group)
        return int(t.item())

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape and dtype), in stream order on GPU."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast(x, src=0, group=self.group)
        return x

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's picklable ``obj``, returned on every rank (host to host, over gloo)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group or self.group)
        return box[0]

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total`` (which must divide evenly)."""
        if total % self.world_size:
            raise ValueError(f"{what}={total} does not divide over tp={self.world_size}")
        return total // self.world_size

    def destroy(self) -> None:
        if self.world_size > 1:
            leave_process_group()


def leave_process_group(timeout_s: float = 60.0) -> None:
    """Leave the default group (if any), so that this process can join another one later.

    NCCL's teardown waits for the other ranks' (every rank should leave at about the same time); a teardown that
    does not finish in ``timeout_s`` is left behind with a warning rather than hanging the caller."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    t = threading.Thread(target=dist.destroy_process_group, name="rayawq-leave-group", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        logging.getLogger(__name__).warning("leaving the tensor-parallel group did not finish in %.0f s", timeout_s)


SINGLE = TPContext()
