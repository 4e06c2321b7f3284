"""WikiText-style perplexity of an FP model or an AWQ checkpoint.

Convention (DESIGN.md / shared data README): join the text, tokenize once, cut non-overlapping windows of
``seqlen`` tokens, average the per-window mean token NLL, exponentiate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .awq_model import load_awq_model, read_quant_config
from .calib_data import BUILTIN_CALIB, read_texts, token_stream
from .errors import QuantError

BUILTIN_EVAL = BUILTIN_CALIB.with_name("eval.txt")


@dataclass
class Perplexity:
    ppl: float
    windows: int
    seqlen: int
    tokens: int


def load_for_eval(model: str | Path, device: torch.device, dtype: torch.dtype | None = None):
    """An AWQ checkpoint through the reference loader, or an FP model through transformers."""
    from transformers import AutoModelForCausalLM

    path = Path(model)
    if not (path / "config.json").is_file():
        raise QuantError(f"{model} is not a model directory with a config.json")
    if read_quant_config(path) is not None:
        return load_awq_model(path, device=device, dtype=dtype)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def eval_windows(tokenizer, dataset: str | Path, seqlen: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """``[n, seqlen]`` non-overlapping windows of the joined text (lines joined by blank lines, as the
    GPTQ/AWQ evaluation scripts join WikiText rows); the first ``max_windows`` if given."""
    path = BUILTIN_EVAL if str(dataset) == "builtin" else Path(dataset)
    text = "\n\n".join(read_texts(path))
    ids = token_stream([text], tokenizer)
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise QuantError(f"{path} has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, tokenizer, dataset: str | Path, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> Perplexity:
    """Perplexity of a transformers model (FP, or AWQ through the reference loader)."""
    windows = eval_windows(tokenizer, dataset, seqlen, max_windows)
    device = next(model.parameters()).device
    nll = 0.0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        window = window[None].to(device)
        logits = model(window).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:]).item()
    n = windows.shape[0]
    return Perplexity(math.exp(nll / n), n, seqlen, n * seqlen)
