"""Where this rank sits in a tensor-parallel group; the only place that talks to torch.distributed."""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class TPContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None      # a torch.distributed process group (NCCL on GPU, gloo on CPU); None for tp = 1
    cpu_group: Any = None  # gloo group for host messages (the steps rank 0 sends); None: ``group`` (gloo itself)
    fast: Any = None       # a SymmetricAllReduce for small tensors (decode), when the GPUs can map each other's memory
    channel: Any = None    # a StepChannel (shared memory) for rank 0's steps when every rank is on one node

    @classmethod
    def init(cls, rank: int, world_size: int, init_method: str, backend: str, timeout_s: float = 1800.0,
             channel: str | None = None) -> "TPContext":
        """Join the group at ``init_method`` (``tcp://host:port``, chosen by rank 0); blocks until all ranks do.

        ``channel``: a path for rank 0's step messages through shared memory (``StepChannel.new_path()``; every
        rank on one node): rank 0 creates the file before joining, the others open it after."""
        import torch.distributed as dist

        from ..engine.step_channel import StepChannel

        ch = StepChannel(channel, 0, world_size, None, create=True) if channel and rank == 0 else None
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        cpu = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        tp = cls(rank, world_size, dist.group.WORLD, cpu)
        if channel:
            ch = ch or StepChannel(channel, rank, world_size, None)
            ch.fallback = tp.gloo_broadcast_object  # messages over the payload area
            tp = replace(tp, channel=ch)
        return tp

    @property
    def is_leader(self) -> bool:
        """Rank 0 of a group of several: it schedules and samples, the others follow its steps."""
        return self.world_size > 1 and self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (use the returned tensor: the symmetric-memory path does not write ``x``)."""
        if self.world_size > 1:
            if self.fast is not None and self.fast.fits(x):
                return self.fast.all_reduce(x)
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x [..., s]`` side by side along the last dimension, rank order: ``[..., world * s]``."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def with_symmetric_memory(self, device: torch.device, max_bytes: int) -> "TPContext":
        """This context with a one-shot all-reduce through symmetric memory for tensors up to ``max_bytes``.

        Decode makes two small all-reduces per decoder layer; one kernel that reads the peers' buffers over NVLink
        takes 6.4 us in a CUDA graph on two H200s against NCCL's 19.5 (8 KB; docs/benchmarks.md), and the row
        layers' fused finish (:mod:`.reduce_norm`) runs through the same buffer. Where symmetric memory cannot be
        set up on every rank, NCCL stays (with a warning)."""
        if self.world_size == 1 or device.type != "cuda":
            return self
        fast, why = None, ""
        try:
            fast = SymmetricAllReduce(self.group, device, max_bytes)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
        if self.min_int(int(fast is not None)) == 0:  # every rank takes the same path
            logging.getLogger(__name__).warning("symmetric-memory all-reduce unavailable (%s); using NCCL",
                                                why or "on another rank")
            return self
        return replace(self, fast=fast)

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

    def broadcast_object(self, obj: Any = None, timeout_s: float | None = None) -> Any:
        """Rank 0's picklable ``obj``, returned on every rank (host to host: the step channel, else gloo).
        ``timeout_s``: rank 0 gives up on the channel (``TimeoutError``) if a rank is not there to take it."""
        if self.channel is None:
            return self.gloo_broadcast_object(obj)
        if self.rank == 0:
            self.channel.send(obj, timeout_s)
            return obj
        return self.channel.recv()

    def gloo_broadcast_object(self, obj: Any = None) -> Any:
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


class SymmetricAllReduce:
    """One buffer every rank can read (torch's symmetric memory); a sum is one kernel that copies this rank's
    input in, signals the peers and adds up all of their buffers. Safe under CUDA graph capture and replay.

    The same allocation holds the region of :mod:`.reduce_norm`'s fused kernel after torch's: two slots of
    ``max_bytes / 4`` fp16/bf16 elements and the per-program flags (zeroed before any rank can signal)."""

    def __init__(self, group, device: torch.device, max_bytes: int):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        from .reduce_norm import BLOCK_N, MAX_ROWS

        self.group_name = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9, a no-op after
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.max_bytes = max_bytes
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.slot_elems = max_bytes // 4
        self.max_programs = self.slot_elems // BLOCK_N + MAX_ROWS  # every row's last chunk may be partial
        self.flag_off = 2 * self.slot_elems * 2  # bytes from the fused region's start
        fused_bytes = self.flag_off + self.max_programs * self.world * 4
        self.buf = symm_mem.empty(max_bytes + fused_bytes, dtype=torch.uint8, device=device)
        self.buf.zero_()
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(self.buf, self.group_name)
        self.ptrs = torch.tensor([p + max_bytes for p in handle.buffer_ptrs], dtype=torch.int64, device=device)
        self.epoch = torch.zeros(self.max_programs, dtype=torch.int32, device=device)
        self.sumsq = torch.empty(self.max_programs, dtype=torch.float32, device=device)  # the row tail's scratch
        self.ticket = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
        self.op = torch.ops.symm_mem.one_shot_all_reduce_copy_out

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= self.max_bytes and x.dtype in (torch.bfloat16, torch.float16,
                                                                               torch.float32)

    def fused_fits(self, rows: int, n: int) -> bool:
        """Whether ``rows x n`` fp16/bf16 outputs fit one slot of the fused kernel's region."""
        return rows * n <= self.slot_elems

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() * x.element_size()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self.op(self.buf[:n].view(x.dtype), x.reshape(-1), "sum", self.group_name, out.view(-1))
        return out


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
