"""Block inputs from the driver's GPU to a worker's GPU through a CUDA IPC handle instead of the object store.

A block's inputs are ``n x seq x hidden`` (0.5 GB for a 7B model at 128 x 512 tokens). Through the object store
they cost the driver a device-to-host copy plus a write into fresh shared-memory pages (~0.45 s a block on an
H100 host) and the worker a host-to-device copy: at 4 GPUs the driver's share of that is as long as a
GPU's share of the search, so the driver paces the job. When the worker runs on the driver's node, a CUDA IPC
handle (what ``torch.multiprocessing`` sends between processes) lets it copy the tensor GPU-to-GPU in a few
milliseconds while the driver keeps the tensor alive until the block is done.

The handle names the driver's GPU by UUID, because the two processes may number the GPUs differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

_DEVICE_ARG = 6  # position of the storage's device index in rebuild_cuda_tensor's arguments


class HandoffError(Exception):
    """The worker could not open the driver's CUDA IPC handle (other node, container without IPC, ...).

    Not a ``RuntimeError`` on purpose: the job does not retry it; the driver resends the inputs through the
    object store and stops using handles for the rest of the job."""


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index(uuid: str) -> int | None:
    """This process's index of the GPU ``uuid`` (None where it is not visible)."""
    return next((i for i in range(torch.cuda.device_count()) if device_uuid(i) == uuid), None)


@dataclass(frozen=True)
class CudaHandoff:
    """A picklable reference to a CUDA tensor that lives in another process on the same node."""

    uuid: str
    rebuild_args: tuple

    @classmethod
    def of(cls, t: torch.Tensor) -> "CudaHandoff":
        """Share ``t`` (the caller keeps ``t`` alive until every receiver is done with it)."""
        fn, args = reduce_tensor(t.detach())
        if fn is not rebuild_cuda_tensor:
            raise ValueError(f"not a CUDA tensor: {t.device}")
        return cls(device_uuid(t.device.index or 0), tuple(args))

    def copy_to(self, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A private copy on ``device`` (the shared memory is released before returning)."""
        try:
            index = local_index(self.uuid)
            if index is None:
                raise HandoffError(f"GPU {self.uuid} is not visible in this process")
            args = list(self.rebuild_args)
            args[_DEVICE_ARG] = index
            shared = rebuild_cuda_tensor(*args)
        except HandoffError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to map means: send the bytes instead
            raise HandoffError(f"cannot open the CUDA IPC handle: {type(e).__name__}: {e}") from None
        x = shared.to(device=device, dtype=dtype, copy=True)
        for d in {shared.device, x.device}:  # the copy is done before the mapping is let go
            torch.cuda.synchronize(d)
        del shared
        return x


def open_peer_device(uuid: str) -> None:
    """Create this process's CUDA context on the driver's GPU ahead of the first handle (warm-up)."""
    index = local_index(uuid)
    if index is not None:
        torch.empty(1, device=f"cuda:{index}")
