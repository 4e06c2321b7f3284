"""Activation-aware scale search: one idea, per smoothing group.

For each ratio α, ``s = mean|x|^α`` (optionally divided by the weight's own mean magnitude^(1-α), "duo"
scaling), normalised by ``sqrt(max(s)·min(s))``; the group's weights become ``Q(W·s)/s`` and the inspected
module's output MSE against full precision picks the winner. Statistics and losses are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import QuantError
from .quantizer import fake_quantize

N_GRID = 20


@dataclass
class ScaleResult:
    scales: torch.Tensor  # fp32 [in_features]
    ratio: float
    duo: bool
    loss: float
    loss_rtn: float  # ratio 0, plain: what round-to-nearest gives


def batched_mse(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, ref: list[torch.Tensor],
                batch: int) -> float:
    """MSE of ``fn`` over ``x`` in chunks of ``batch`` samples against precomputed reference chunks."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk, r in zip(x.split(batch), ref):
            out = fn(chunk.to(r.device, non_blocking=True)).float()
            total += (out - r).pow(2).sum().item()
            count += r.numel()
    return total / max(count, 1)


def reference_outputs(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int,
                      device: torch.device) -> list[torch.Tensor]:
    with torch.no_grad():
        return [fn(chunk.to(device, non_blocking=True)).float() for chunk in x.split(batch)]


def weight_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel mean of |w| normalised by its group's absmax (the "duo" weight statistic)."""
    w = torch.cat([t.float() for t in weights], dim=0)
    g = w.abs().reshape(-1, group_size)
    g = g / g.amax(dim=1, keepdim=True).clamp(min=1e-8)
    return g.reshape(w.shape).mean(0)


def normalise(s: torch.Tensor) -> torch.Tensor:
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(
    linears: list[nn.Linear],
    x: torch.Tensor,
    inspect: Callable[[torch.Tensor], torch.Tensor],
    bits: int,
    group_size: int,
    batch: int,
    device: torch.device,
    search: bool = True,
    duo: bool = True,
    fixed_ratio: float = 0.5,
) -> ScaleResult:
    """Best scales for ``linears`` whose shared input is ``x`` ``[n, seq, in]``; ``inspect`` maps x to the output judged."""
    x_mean = torch.zeros(x.shape[-1], dtype=torch.float32, device=device)
    for chunk in x.split(batch):
        x_mean += chunk.to(device).abs().float().sum(dim=(0, 1))
    x_mean /= x.shape[0] * x.shape[1]
    if not torch.isfinite(x_mean).all():
        raise QuantError("activations contain NaN or inf; the model overflows in this dtype: try --dtype float32 or bfloat16")
    originals = [fc.weight.detach().clone() for fc in linears]
    w_mean = weight_magnitude(originals, group_size).to(device) if duo else None
    ref = reference_outputs(inspect, x, batch, device)

    def loss_for(s: torch.Tensor) -> float:
        for fc, w in zip(linears, originals):
            scaled = w.float() * s
            fc.weight.data = (fake_quantize(scaled, bits, group_size).float() / s).to(w.dtype)
        return batched_mse(inspect, x, ref, batch)

    candidates: list[tuple[float, bool]] = [(fixed_ratio, False)]
    if search:
        grid = [i / N_GRID for i in range(N_GRID)]
        candidates = [(r, False) for r in grid] + ([(r, True) for r in grid] if duo else [])
    best: ScaleResult | None = None
    loss_rtn = float("nan")
    try:
        for ratio, is_duo in candidates:
            s = x_mean.pow(ratio)
            if is_duo:
                s = s / w_mean.pow(1 - ratio).clamp(min=1e-4)
            s = normalise(s)
            loss = loss_for(s)
            if ratio == 0 and not is_duo:
                loss_rtn = loss
            if loss == loss and (best is None or loss < best.loss):
                best = ScaleResult(s, ratio, is_duo, loss, loss_rtn)
    finally:
        for fc, w in zip(linears, originals):
            fc.weight.data = w
    if best is None or not torch.isfinite(best.scales).all():
        raise QuantError("scale search produced no finite loss; the block overflows: try --dtype float32")
    best.loss_rtn = loss_rtn
    return best


def apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Fold ``1/s`` into the op before the group and ``s`` into the group's weights; the function is unchanged."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.copy_((prev.weight.float() / s.view(-1, 1)).to(prev.weight.dtype))
        else:  # RMSNorm-style: y = w * norm(x)
            prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
        for fc in linears:
            fc.weight.copy_((fc.weight.float() * s.view(1, -1)).to(fc.weight.dtype))
