"""Drive AWQ over a whole model, block by block, with bounded memory and resumable progress.

One full-precision pass walks the blocks in order; block *i*'s inputs are block *i-1*'s full-precision
outputs (as in llm-awq, AutoAWQ and LMDeploy), so each block's search depends only on its own inputs.
Here the blocks are searched in the same process, one after the other; ``cluster.quantize_job`` hands the
same ``quantize_block`` calls to Ray tasks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .block_quant import BlockContext, BlockReport, quantize_block, run_block
from .calib_data import calibration_windows, load_texts
from .checkpoint import StagingDir, copy_side_files, merge_parts, publish, write_config
from .config import QuantConfig
from .errors import QuantError
from .model_io import BlockBuilder, ModelSource

log = logging.getLogger("rayawq.quant")


@dataclass
class QuantSummary:
    work_dir: Path
    seconds: float
    blocks: list[BlockReport] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def table(self) -> str:
        rows = ["block  mse(RTN)    mse(AWQ)    gain    seconds"]
        for b in self.blocks:
            gain = b.mse_rtn / b.mse_awq if b.mse_awq > 0 else float("inf")
            rows.append(f"{b.index:5d}  {b.mse_rtn:.3e}  {b.mse_awq:.3e}  {gain:5.2f}x  {b.seconds:7.1f}")
        if self.skipped:
            rows.append(f"resumed: blocks {self.skipped} were already done")
        rows.append(f"total {self.seconds:.1f} s -> {self.work_dir}")
        return "\n".join(rows)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def compute_dtype(device: torch.device, out_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPU (bf16/fp16 matmuls are slow there and lose nothing we need); the model dtype on GPU."""
    return torch.float32 if device.type == "cpu" else out_dtype


class ActivationStore:
    """Holds one block's inputs ``[n, seq, hidden]`` on the device, in host RAM, or on disk, by a byte budget."""

    def __init__(self, device: torch.device, budget_bytes: int, spill_dir: Path):
        self.device, self.budget, self.spill_dir = device, budget_bytes, spill_dir
        self._spilled: Path | None = None

    def place(self, x: torch.Tensor, name: str) -> torch.Tensor:
        nbytes = x.numel() * x.element_size()
        if nbytes <= self.budget:
            return x.to(self.device)
        if nbytes <= 4 * self.budget or self.device.type == "cpu":
            return x.cpu()
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{name}.pt"
        torch.save(x.cpu(), path)
        if self._spilled is not None and self._spilled != path:
            self._spilled.unlink(missing_ok=True)  # the old mapping stays valid until it is dropped
        self._spilled = path
        return torch.load(path, mmap=True)


def quantize_model(model: str, work_dir: str | Path, cfg: QuantConfig, device: str = "auto",
                   overwrite: bool = False, act_budget_gb: float = 8.0, progress: bool = True) -> QuantSummary:
    """Quantize ``model`` (a directory or hub id) into an AutoAWQ checkpoint at ``work_dir``."""
    t0 = time.perf_counter()
    work_dir = Path(work_dir)
    source = ModelSource(model)
    cfg.resolve_dtype(source.dtype())
    cfg.check_model(source.config)
    dev = pick_device(device)
    cdtype = compute_dtype(dev, cfg.out_dtype)
    staging = StagingDir(work_dir, cfg.fingerprint(str(source.path)), overwrite=overwrite)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = calibration_windows(load_texts(cfg.calib_dataset), tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)

    staging.open()
    try:
        summary = _run(source, staging, cfg, dev, cdtype, ids, act_budget_gb, progress)
    except QuantError:
        staging.remove()  # a refused input is not resumable: leave nothing behind
        raise
    out = staging.root / "checkpoint"
    out.mkdir(exist_ok=True)
    parts = [staging.parts / staging.part_info(f"block-{i:05d}")["file"] for i in range(source.num_layers)]
    parts.append(staging.parts / staging.part_info("extra")["file"])
    merge_parts(parts, out, cfg.max_shard_size)
    write_config(source.config, out, cfg.quantization_config(), cfg.out_dtype)
    copy_side_files(source.path, out)
    publish(out, work_dir, overwrite)
    staging.remove()
    summary.seconds = time.perf_counter() - t0
    summary.work_dir = work_dir
    return summary


def _run(source: ModelSource, staging: StagingDir, cfg: QuantConfig, dev: torch.device, cdtype: torch.dtype,
         ids: torch.Tensor, act_budget_gb: float, progress: bool) -> QuantSummary:
    fam = source.family
    builder = BlockBuilder(source, dev, cdtype)
    ctx = BlockContext.build(builder.rotary(), ids.shape[1], cdtype, dev)
    store = ActivationStore(dev, int(act_budget_gb * 1024**3), staging.root / "spill")
    x = store.place(builder.embed(ids), "x0")
    summary = QuantSummary(staging.work_dir, 0.0)
    bar = tqdm(range(source.num_layers), desc="AWQ blocks", unit="block", disable=not progress)
    for i in bar:
        layer = builder.block(i)
        name = f"block-{i:05d}"
        next_x = run_block(layer, x, ctx, cfg.batch_size)  # full precision, before any scaling
        if staging.done(name):
            summary.skipped.append(i)
        else:
            tensors, report = quantize_block(layer, i, x, ctx, fam, cfg)
            staging.save_part(name, tensors, {"mse_rtn": report.mse_rtn, "mse_awq": report.mse_awq})
            summary.blocks.append(report)
            bar.set_postfix(mse_rtn=f"{report.mse_rtn:.2e}", mse_awq=f"{report.mse_awq:.2e}")
            log.info("block %d: mse rtn %.3e awq %.3e (%.1fs)", i, report.mse_rtn, report.mse_awq, report.seconds)
        del layer
        x = store.place(next_x, f"x{i + 1}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if not staging.done("extra"):
        staging.save_part("extra", extra_tensors(source, cfg.out_dtype))
    return summary


def extra_tensors(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and (untied) head, kept unquantized in the checkpoint dtype."""
    fam = source.family
    names = [f"{fam.embed}.weight", f"{fam.final_norm}.weight"]
    if source.has(f"{fam.lm_head}.weight") and not getattr(source.config, "tie_word_embeddings", False):
        names.append(f"{fam.lm_head}.weight")
    return {n: source.tensor(n).to(dtype).contiguous() for n in names}
