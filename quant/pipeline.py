"""Drive AWQ over a whole model, block by block, with bounded memory and resumable progress.

One full-precision pass walks the blocks in order; block *i*'s inputs are block *i-1*'s full-precision
outputs (as in llm-awq, AutoAWQ and LMDeploy), so each block's search depends only on its own inputs.
Here the blocks are searched in the same process, one after the other; ``cluster.quantize_job`` hands the
same ``quantize_block`` calls to Ray tasks.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .block_quant import BlockContext, BlockReport, quantize_block, run_block
from .calib_data import calibration_windows, load_texts
from .checkpoint import StagingDir, copy_side_files, publish, write_config
from .config import QuantConfig
from .errors import QuantError
from .decoder import BlockSpec
from .model_io import BlockBuilder, ModelSource, rotary_embeddings
from .shards import ShardMerger

log = logging.getLogger("rayawq.quant")


@dataclass
class QuantSummary:
    work_dir: Path
    seconds: float
    blocks: list[BlockReport] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    timings: dict[int, dict[str, float]] = field(default_factory=dict)  # block -> step -> seconds (runner's)
    job_timings: dict[str, float] = field(default_factory=dict)  # once-per-job steps (setup, finish, ...)

    def table(self) -> str:
        rows = ["block  mse(RTN)    mse(AWQ)    gain    seconds"]
        for b in self.blocks:
            gain = b.mse_rtn / b.mse_awq if b.mse_awq > 0 else float("inf")
            rows.append(f"{b.index:5d}  {b.mse_rtn:.3e}  {b.mse_awq:.3e}  {gain:5.2f}x  {b.seconds:7.1f}")
        if self.skipped:
            rows.append(f"resumed: blocks {self.skipped} were already done")
        rows.append(f"total {self.seconds:.1f} s -> {self.work_dir}")
        return "\n".join(rows)

    def mean_timings(self) -> dict[str, float]:
        """Mean seconds per block of each step the runner timed (where the time around the search goes)."""
        steps = dict.fromkeys(k for t in self.timings.values() for k in t)
        n = max(1, len(self.timings))
        return {k: sum(t.get(k, 0.0) for t in self.timings.values()) / n for k in steps}

    def timing_table(self) -> str:
        if not self.timings:
            return ""
        rows = [f"mean per block over {len(self.timings)} blocks (s):"]
        rows += [f"  {k:<16s} {v:8.3f}" for k, v in self.mean_timings().items()]
        rows += ["once per job (s):"] + [f"  {k:<16s} {v:8.3f}" for k, v in self.job_timings.items()]
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


class QuantPlan:
    """What every runner shares: source, settings, calibration ids, staging dir, and the FP pass.

    ``fp_pass`` walks the blocks in order and yields each block with its full-precision inputs; a runner
    searches the block where it likes (here, or in a Ray task) and hands the packed tensors to ``save_block``.
    """

    def __init__(self, model: str, work_dir: str | Path, cfg: QuantConfig, device: str = "auto",
                 overwrite: bool = False, act_budget_gb: float = 8.0, compute_device: str | None = None):
        from transformers import AutoTokenizer

        self.t0 = time.perf_counter()
        self.work_dir, self.cfg, self.overwrite = Path(work_dir), cfg, overwrite
        self.source = ModelSource(model)
        cfg.resolve_dtype(self.source.dtype())
        cfg.check_model(self.source.config)
        self.spec = BlockSpec.from_config(self.source.config, self.source.family)
        self.device = pick_device(device)
        # Where the search runs decides the arithmetic dtype, so the FP pass matches it.
        self.cdtype = compute_dtype(pick_device(compute_device or device), cfg.out_dtype)
        self.staging = StagingDir(self.work_dir, cfg.fingerprint(str(self.source.path)), overwrite=overwrite)
        tokenizer = AutoTokenizer.from_pretrained(self.source.path)
        texts = load_texts(cfg.calib_dataset)
        self.ids = calibration_windows(texts, tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
        # RoPE for the windows' positions: with ``spec``, what every block is built from, wherever it is searched
        self.rope = rotary_embeddings(self.source, self.ids.shape[1], self.cdtype, self.device)
        self.act_budget = int(act_budget_gb * 1024**3)
        self.summary = QuantSummary(self.work_dir, 0.0)
        self.staging.open()
        # shards are written as their parts arrive (on the merger's thread); a crashed run's are redone
        self.out_dir = self.staging.root / "checkpoint"
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.out_dir.mkdir()
        # "extra" (embeddings, head) first: it is staged at the start, so it is merged while blocks are searched
        names = ["extra"] + [self.block_name(i) for i in range(self.num_blocks)]
        self.merger = ShardMerger(names, self.out_dir, cfg.max_shard_size)
        for name in names:
            if self.staging.done(name):
                self.merger.part_ready(name, self.part_path(name))

    @property
    def num_blocks(self) -> int:
        return self.source.num_layers

    def block_name(self, i: int) -> str:
        return f"block-{i:05d}"

    def fp_pass(self) -> Iterator[tuple[int, torch.nn.Module, torch.Tensor, BlockContext]]:
        """Yield ``(i, block, inputs, ctx)``; block ``i+1``'s inputs are block ``i``'s FP outputs, computed first."""
        builder = BlockBuilder(self.source, self.spec, self.device, self.cdtype)
        ctx = BlockContext.build(self.rope, self.cdtype, self.device)
        store = ActivationStore(self.device, self.act_budget, self.staging.root / "spill")
        x = store.place(builder.embed(self.ids), "x0")
        for i in range(self.num_blocks):
            layer = builder.block(i)
            next_x = run_block(layer, x, ctx, self.cfg.batch_size)  # before any scaling touches the block
            yield i, layer, x, ctx
            del layer
            x = store.place(next_x, f"x{i + 1}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def part_path(self, name: str) -> Path:
        return self.staging.parts / self.staging.part_info(name)["file"]

    def save_block(self, tensors: dict[str, torch.Tensor], report: BlockReport) -> None:
        name = self.block_name(report.index)
        self.staging.save_part(name, tensors,
                               {"mse_rtn": report.mse_rtn, "mse_awq": report.mse_awq, "seconds": report.seconds})
        self.merger.part_ready(name, self.part_path(name))
        self.summary.blocks.append(report)
        log.info("block %d: mse rtn %.3e awq %.3e (%.1fs)", report.index, report.mse_rtn, report.mse_awq,
                 report.seconds)

    def save_extra(self) -> None:
        """Embeddings, final norm and head as the part "extra" (a runner may do this early, off the critical path)."""
        if not self.staging.done("extra"):
            self.staging.save_part("extra", extra_tensors(self.source, self.cfg.out_dtype))
            self.merger.part_ready("extra", self.part_path("extra"))

    def abandon(self) -> None:
        """Remove the staging directory (a refused job leaves nothing behind), after the merger stops."""
        self.merger.stop()
        self.staging.remove()

    def finish(self) -> QuantSummary:
        """Write the last shard (the others were written as their parts arrived) and move the checkpoint into place."""
        staging, cfg, steps = self.staging, self.cfg, self.summary.job_timings
        self.save_extra()
        out = self.out_dir
        t = time.perf_counter()
        self.merger.finish()
        steps["finish_shards"] = time.perf_counter() - t
        write_config(self.source.config, out, cfg.quantization_config(), cfg.out_dtype)
        copy_side_files(self.source.path, out)
        t = time.perf_counter()
        publish(out, self.work_dir, self.overwrite)
        steps["finish_publish"] = time.perf_counter() - t
        t = time.perf_counter()
        staging.remove()
        steps["finish_cleanup"] = time.perf_counter() - t
        self.summary.blocks.sort(key=lambda b: b.index)
        self.summary.seconds = time.perf_counter() - self.t0
        return self.summary


class BlockWriter:
    """Saves finished blocks on one background thread, in the order they are handed over.

    Hashing, writing and fsync-ing a part then overlap the next searches instead of delaying them. The
    staging guarantees are ``save`` 's own (temp file, rename, then the manifest entry), so a part is either
    complete and listed or absent. The first failure is re-raised by ``check`` or ``close``; after it, the
    rest are dropped (they are redone on resume).
    """

    def __init__(self, save: Callable[..., None], max_pending: int = 4):
        self._save = save
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)  # bounds the host RAM of queued results
        self._error: BaseException | None = None
        self.seconds = 0.0  # spent saving, on the writer thread
        self._thread = threading.Thread(target=self._run, name="rayawq-block-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                t0 = time.perf_counter()
                try:
                    fn, args = item
                    fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
                    self._error = exc
                self.seconds += time.perf_counter() - t0

    def submit(self, *args) -> None:
        """Queue one ``save(*args)``; blocks while ``max_pending`` are waiting."""
        self.call(self._save, *args)

    def call(self, fn: Callable[..., None], *args) -> None:
        """Queue any other write that must not race the saves (they share the staging manifest)."""
        self.check()
        self._queue.put((fn, args))

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self, raise_error: bool = True) -> BaseException | None:
        """Wait until everything queued is saved (or dropped after a failure); re-raise or return the failure."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error:
            self.check()
        return self._error


def quantize_model(model: str, work_dir: str | Path, cfg: QuantConfig, device: str = "auto",
                   overwrite: bool = False, act_budget_gb: float = 8.0, progress: bool = True) -> QuantSummary:
    """Quantize ``model`` (a directory or hub id) into an AutoAWQ checkpoint at ``work_dir``, in this process."""
    plan = QuantPlan(model, work_dir, cfg, device, overwrite, act_budget_gb)
    try:
        plan.save_extra()  # first in the shards' order: staged now, the blocks merge as they finish
        bar = tqdm(plan.fp_pass(), total=plan.num_blocks, desc="AWQ blocks", unit="block", disable=not progress)
        for i, layer, x, ctx in bar:
            if plan.staging.done(plan.block_name(i)):
                plan.summary.skipped.append(i)
                continue
            tensors, report = quantize_block(layer, i, x, ctx, plan.source.family, cfg)
            plan.save_block(tensors, report)
            bar.set_postfix(mse_rtn=f"{report.mse_rtn:.2e}", mse_awq=f"{report.mse_awq:.2e}")
    except QuantError:
        plan.abandon()  # a refused input is not resumable: leave nothing behind
        raise
    return plan.finish()


def extra_tensors(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and (untied) head, kept unquantized in the checkpoint dtype."""
    fam = source.family
    names = [f"{fam.embed}.weight", f"{fam.final_norm}.weight"]
    if source.has(f"{fam.lm_head}.weight") and not getattr(source.config, "tie_word_embeddings", False):
        names.append(f"{fam.lm_head}.weight")
    return {n: source.tensor(n).to(dtype).contiguous() for n in names}
