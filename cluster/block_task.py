"""The Ray task body of the distributed quantizer: rebuild one block from the files and run AWQ on it.

Kept apart from the job's entry module so the task pickles by reference to an importable module
(``python -m cluster.quantize_job`` runs that module as ``__main__``).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from quant.block_quant import BlockContext, quantize_block
from quant.config import QuantConfig
from quant.model_io import BlockBuilder, ModelSource


@lru_cache(maxsize=2)
def _worker_builder(model_path: str, device: str, dtype: torch.dtype) -> BlockBuilder:
    """One meta skeleton per worker process and model, reused across the blocks it is given."""
    return BlockBuilder(ModelSource(model_path), torch.device(device), dtype)


def search_block(model_path: str, index: int, x: torch.Tensor, cfg: QuantConfig, dtype: torch.dtype):
    """Body of the Ray task: rebuild block ``index`` from the files and run AWQ on it."""
    fail_marker = os.environ.get("RAYAWQ_FAIL_ONCE_DIR")
    if fail_marker:  # fault injection for tests: the first attempt at each listed block dies
        marker = os.path.join(fail_marker, f"block-{index}")
        if os.path.exists(marker + ".armed") and not os.path.exists(marker + ".fired"):
            open(marker + ".fired", "w").close()
            raise RuntimeError(f"injected failure in block {index}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    builder = _worker_builder(model_path, device, dtype)
    layer = builder.block(index)
    ctx = BlockContext.build(builder.rotary(), x.shape[1], dtype, torch.device(device))
    # The inputs arrive in host memory from the object store; searching them there would copy every chunk
    # to the GPU for each of the ~40 scale candidates.
    x = x.to(device=device, dtype=dtype)
    tensors, report = quantize_block(layer, index, x, ctx, builder.source.family, cfg)
    if device == "cuda":
        report.peak_gpu_gb = torch.cuda.max_memory_allocated() / 1024**3
    return tensors, report
