"""Weight clipping search: one idea, per linear.

For every output channel and input group, clamp to ±(absmax·r), r = 1.0, 0.95 … 0.55, fake-quantize, and keep
the r whose output on a token subsample (~512 tokens) is closest to full precision. Math in fp32; the
per-group products are one einsum, so no [channels × tokens × in] tensor is ever built.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizer import fake_quantize

N_GRID = 20
MAX_SHRINK = 0.5
N_TOKENS = 512


def subsample_tokens(x: torch.Tensor, n_tokens: int = N_TOKENS) -> torch.Tensor:
    """Every k-th token of ``x`` flattened to ``[tokens, in]`` so that about ``n_tokens`` remain."""
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, flat.shape[0] // n_tokens)
    return flat[::step][:n_tokens]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, oc_batch: int | None = None) -> torch.Tensor:
    """Best clamp value ``[out, in // group_size]`` for weight ``w`` ``[out, in]`` given inputs ``x`` ``[tokens, in]``.

    On GPU the per-group products run as TF32 matmuls (the errors only rank 10 candidates) over large channel
    batches; on CPU in fp32, 256 channels at a time.
    """
    out_f, in_f = w.shape
    if oc_batch is None:
        oc_batch = 2048 if w.is_cuda else 256
    if w.is_cuda:
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            return _search_clip(w, x, bits, group_size, oc_batch)
        finally:
            torch.set_float32_matmul_precision(prev)
    return _search_clip(w, x, bits, group_size, oc_batch)


def _search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, oc_batch: int) -> torch.Tensor:
    out_f, in_f = w.shape
    n_groups = in_f // group_size
    xg = x.float().reshape(-1, n_groups, group_size)
    best = torch.empty(out_f, n_groups, device=w.device)
    for start in range(0, out_f, oc_batch):
        wb = w[start : start + oc_batch].float().reshape(-1, n_groups, group_size)
        ref = torch.einsum("ogk,tgk->otg", wb, xg)
        org_max = wb.abs().amax(dim=-1)
        min_err = torch.full_like(org_max, float("inf"))
        best_max = org_max.clone()
        for i in range(int(N_GRID * MAX_SHRINK)):
            max_val = org_max * (1 - i / N_GRID)
            cur = wb.clamp(-max_val[..., None], max_val[..., None])
            q = fake_quantize(cur.reshape(-1, in_f), bits, group_size).reshape_as(wb)
            err = (torch.einsum("ogk,tgk->otg", q, xg) - ref).pow(2).mean(dim=1)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best[start : start + oc_batch] = best_max
    return best


@torch.no_grad()
def apply_clip(fc: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = fc.weight
    g = w.float().reshape(w.shape[0], -1, group_size)
    m = max_val[..., None]
    w.copy_(g.clamp(-m, m).reshape(w.shape).to(w.dtype))
