"""The Ray task body of the distributed quantizer: rebuild one block from the files and run AWQ on it.

Kept apart from the job's entry module so the task pickles by reference to an importable module
(``python -m cluster.quantize_job`` runs that module as ``__main__``).

Inputs and results cross the object store as numpy arrays: Ray stores those zero-copy (a worker on the
same node maps the driver's bytes), while a torch tensor is pickled, which copies it on both sides.
"""

from __future__ import annotations

import os
import sys
import time

_IMPORT_START = time.time()  # a worker's import of this module (torch, quant) is part of its start-up

import warnings
from functools import lru_cache

import numpy as np
import torch

from cluster.handoff import CudaHandoff, open_peer_device
from quant.block_quant import BlockContext, quantize_block
from quant.config import QuantConfig
from quant.decoder import BlockSpec
from quant.model_io import BlockBuilder, ModelSource

_IMPORTED = time.time()

# Same-width integer views: numpy has no bfloat16, and a view keeps the bits exactly.
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def to_array(t: torch.Tensor) -> np.ndarray:
    """A host numpy view of ``t``'s bits (a copy only where ``t`` is on a GPU or not contiguous)."""
    t = t.detach().contiguous().cpu()
    return t.view(_INT_OF_WIDTH[t.element_size()]).numpy()


def from_array(a: np.ndarray, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """Tensor of ``dtype`` on ``device`` from ``to_array``'s bits; never aliases ``a``.

    An array from the object store is read-only shared memory: it is copied, never written.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        t = torch.from_numpy(a).view(dtype)
    return t.to(device, copy=True)


def pack_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, torch.dtype]]:
    return {k: (to_array(t), t.dtype) for k, t in tensors.items()}


def unpack_tensors(packed: dict[str, tuple[np.ndarray, torch.dtype]]) -> dict[str, torch.Tensor]:
    return {k: from_array(a, dtype) for k, (a, dtype) in packed.items()}


@lru_cache(maxsize=8)
def _worker_source(model_path: str) -> ModelSource:
    """The model's files opened once per worker process, reused across the blocks it is given."""
    return ModelSource(model_path)


def _maybe_inject_failure(index: int) -> None:
    """Fault injection for tests: the first attempt at each block armed in RAYAWQ_FAIL_ONCE_DIR fails, by
    raising (``block-<i>.armed``) or by killing the worker process outright (``block-<i>.kill``)."""
    fail_marker = os.environ.get("RAYAWQ_FAIL_ONCE_DIR")
    if fail_marker:
        marker = os.path.join(fail_marker, f"block-{index}")
        if os.path.exists(marker + ".kill") and not os.path.exists(marker + ".killed"):
            open(marker + ".killed", "w").close()
            os._exit(1)  # the process dies mid-block, as on a lost node or an OOM kill
        if os.path.exists(marker + ".armed") and not os.path.exists(marker + ".fired"):
            open(marker + ".fired", "w").close()
            raise RuntimeError(f"injected failure in block {index}")


# Set (through the task's runtime_env) so that Ray leaves CUDA_VISIBLE_DEVICES alone in block workers. Ray
# reuses a worker process for later tasks; a process keeps the GPU it first initialised CUDA on, whatever
# CUDA_VISIBLE_DEVICES says for its next task, so two tasks given different GPUs could run on the same one
# (seen on 2 GPUs: every block twice as slow). With all GPUs visible, each task picks its own by index.
NOSET_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def task_device() -> str:
    """The device of this task: ``cuda:<the GPU Ray assigned>`` (see ``NOSET_ENV``), ``cuda`` or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    import ray

    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if ids and os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES") == "1":
        return f"cuda:{int(ids[0])}"
    return "cuda"


def _process_start() -> float:
    """Wall-clock time this process started (Linux), else now."""
    try:
        ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


def warm_worker(model_path: str) -> tuple[str, dict[str, float]]:
    """Start a block worker before its first block: imports, the CUDA context and the model's files opened,
    overlapped with the driver's own set-up. Returns ("" or the error, which the real task reports properly;
    wall-clock stamps of each step, so the driver can tell where a slow start went)."""
    stamps = {"process": _process_start(), "import": _IMPORT_START, "imported": _IMPORTED, "init": time.time()}
    try:
        device = task_device()
        if device != "cpu":
            torch.cuda.set_device(device)
            torch.empty(1, device=device)
            stamps["cuda"] = time.time()
        _worker_source(model_path)
        stamps["ready"] = time.time()
        return "", stamps
    except Exception as e:  # noqa: BLE001 - the block task that follows raises it properly
        return f"{type(e).__name__}: {e}", stamps


class BlockWorker:
    """The Ray actor that searches blocks: one per placement-group bundle, so it keeps one GPU (or CPU) for the
    whole job with one CUDA context. (Stateless tasks let Ray hand a reused worker process a different GPU
    each time, and each new GPU in a process costs a context: the likely reason the block rebuild took 0.84 s
    a block on 4 H100s against 0.07 s on 1-2.) Warmed up in the constructor, while the driver sets up; it
    never imports transformers (``quant.decoder``)."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.warm_error, self.warm_stamps = warm_worker(model_path)

    def open_peer(self, uuid: str) -> None:
        """Create the CUDA context on the driver's GPU (``uuid``) ahead of the first CUDA IPC handle. A call of
        its own: the driver learns its GPU only after it has asked for the workers."""
        try:
            open_peer_device(uuid)
            self.warm_stamps["peer"] = time.time()
        except Exception as e:  # noqa: BLE001 - the first handle reports it (and falls back to the object store)
            self.warm_error = self.warm_error or f"{type(e).__name__}: {e}"

    def warm_status(self) -> tuple[str, dict[str, float], bool]:
        """("" or why the warm-up failed (the blocks run anyway and raise the real error), its step stamps,
        whether this process has imported transformers by now)."""
        return self.warm_error, self.warm_stamps, "transformers" in sys.modules

    def search(self, index: int, x, cfg: QuantConfig, dtype: torch.dtype, spec: BlockSpec, rope: dict):
        return search_block(self.model_path, index, x, cfg, dtype, spec, rope)


def search_block(model_path: str, index: int, x: np.ndarray | torch.Tensor | CudaHandoff, cfg: QuantConfig,
                 dtype: torch.dtype, spec: BlockSpec, rope: dict):
    """Body of the Ray task: rebuild block ``index`` from the files and run AWQ on it.

    ``x`` is the block's inputs: ``to_array`` of a ``dtype`` tensor, the tensor itself, or a ``CudaHandoff`` to
    the driver's copy (a ``HandoffError`` if it cannot be opened here). ``spec`` is the block's shape and
    ``rope`` the driver's RoPE tables (``pack_tensors`` of ``{"cos", "sin"}``), so that every block is built
    and run exactly as in the single-process quantizer. Returns
    ``(pack_tensors(tensors), report, timings)``; ``timings`` are seconds per step plus ``start``/``end``
    wall-clock stamps, so the driver can tell queueing and transfer from work.
    """
    timings = {"start": time.time()}
    _maybe_inject_failure(index)
    device = task_device()
    if device != "cpu":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats()
        timings["gpu"] = float(torch.device(device).index or 0)
    t = time.perf_counter()
    # The inputs arrive as a handle to the driver's GPU or in host memory from the object store; either way
    # they are copied to this GPU once (searching host memory would copy every chunk per scale candidate).
    if isinstance(x, CudaHandoff):
        x = x.copy_to(device, dtype)
    elif isinstance(x, np.ndarray):
        x = from_array(x, dtype, device)
    else:
        x = x.to(device=device, dtype=dtype)
    timings["x_to_device"] = _lap(t, device)
    t = time.perf_counter()
    builder = BlockBuilder(_worker_source(model_path), spec, torch.device(device), dtype)
    layer = builder.block(index)
    cos_sin = unpack_tensors(rope)
    ctx = BlockContext.build((cos_sin["cos"], cos_sin["sin"]), dtype, torch.device(device))
    timings["rebuild"] = _lap(t, device)
    tensors, report = quantize_block(layer, index, x, ctx, builder.source.family, cfg)
    timings["search_pack"] = report.seconds
    if device != "cpu":
        report.peak_gpu_gb = torch.cuda.max_memory_allocated() / 1024**3
    t = time.perf_counter()
    packed = pack_tensors(tensors)
    timings["to_array"] = time.perf_counter() - t
    timings["end"] = time.time()
    return packed, report, timings


def _lap(t0: float, device: str) -> float:
    if device != "cpu":
        torch.cuda.synchronize()  # time the copy, not its launch
    return time.perf_counter() - t0
