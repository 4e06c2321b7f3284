"""AWQ for one decoder block: capture inputs, search scales, apply them, search clips, quantize and pack.

This is the unit of work a Ray task runs: it needs the block (full precision), the block's full-precision
inputs and the rotary/mask context, and returns the block's packed tensors. It knows nothing of the
model around it, which is why blocks can be searched in any order on any device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .auto_clip import apply_clip, search_clip, subsample_tokens
from .auto_scale import apply_scale, search_scale
from .config import QuantConfig
from .errors import QuantError
from .families import Family
from .quantizer import fake_quantize, pack_awq


@dataclass
class BlockContext:
    """What a block's forward needs beside its input: rotary cos/sin and the causal mask."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor

    @classmethod
    def build(cls, position_embeddings: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype,
              device: torch.device) -> "BlockContext":
        """From RoPE ``(cos, sin)`` ``[1, seq, head_dim]`` (``model_io.rotary_embeddings``) and a causal mask."""
        cos, sin = (t.to(device=device, dtype=dtype) for t in position_embeddings)
        seqlen = cos.shape[-2]
        mask = torch.full((seqlen, seqlen), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
        return cls((cos, sin), mask[None, None])

    def to(self, device: torch.device) -> "BlockContext":
        cos, sin = self.position_embeddings
        return BlockContext((cos.to(device), sin.to(device)), self.attention_mask.to(device))


def run_block(layer: nn.Module, x: torch.Tensor, ctx: BlockContext, batch: int,
              out_device: torch.device | None = None) -> torch.Tensor:
    """The block's full-precision output for every sample, computed ``batch`` samples at a time."""
    device = ctx.attention_mask.device
    outs = []
    with torch.no_grad():
        for chunk in x.split(batch):
            y = layer(chunk.to(device), attention_mask=ctx.attention_mask,
                      position_embeddings=ctx.position_embeddings)
            y = y[0] if isinstance(y, tuple) else y
            outs.append(y.to(out_device or x.device))
    out = torch.cat(outs)
    if not torch.isfinite(out).all():
        raise QuantError("a block's output contains NaN or inf: the model overflows in this dtype; try --dtype bfloat16 or float32")
    return out


def capture_inputs(layer: nn.Module, names: list[str], x: torch.Tensor, ctx: BlockContext,
                   batch: int) -> dict[str, torch.Tensor]:
    """Inputs of the named linears over all samples ``[n, seq, in]``, kept where ``x`` is kept."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        layer.get_submodule(n).register_forward_hook(
            lambda _m, args, _out, n=n: store[n].append(args[0].detach().to(x.device))
        )
        for n in names
    ]
    try:
        run_block(layer, x, ctx, batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


@dataclass
class BlockReport:
    index: int
    mse_rtn: float
    mse_awq: float
    seconds: float = 0.0
    groups: list[dict] = field(default_factory=list)
    peak_gpu_gb: float = 0.0  # filled by runners that own a GPU (the Ray task)


def _inspect_fn(layer: nn.Module, group_inspect: str, first_linear: str, ctx: BlockContext):
    module = layer.get_submodule(group_inspect or first_linear)
    if group_inspect.endswith("attn"):
        def attn(h: torch.Tensor) -> torch.Tensor:
            out = module(hidden_states=h, attention_mask=ctx.attention_mask,
                         position_embeddings=ctx.position_embeddings)
            return out[0] if isinstance(out, tuple) else out
        return attn
    return module


def fake_quantize_block(layer: nn.Module, family: Family, bits: int, group_size: int) -> nn.Module:
    q = copy.deepcopy(layer)
    with torch.no_grad():
        for name in family.linears:
            fc = q.get_submodule(name)
            fc.weight.copy_(fake_quantize(fc.weight, bits, group_size))
    return q


def quantize_block(layer: nn.Module, index: int, x: torch.Tensor, ctx: BlockContext, family: Family,
                   cfg: QuantConfig) -> tuple[dict[str, torch.Tensor], BlockReport]:
    """AWQ (or RTN) for block ``index``; returns its checkpoint tensors (on CPU) and a report.

    ``layer`` is modified in place (scales and clips are folded into it).
    """
    import time

    t0 = time.perf_counter()
    device = ctx.attention_mask.device
    bits, gs, batch = cfg.w_bits, cfg.group_size, cfg.batch_size
    n_eval = min(x.shape[0], 8)
    ref_out = run_block(layer, x[:n_eval], ctx, batch)
    mse = lambda m: (run_block(m, x[:n_eval], ctx, batch) - ref_out).float().pow(2).mean().item()  # noqa: E731
    mse_rtn = mse(fake_quantize_block(layer, family, bits, gs))
    report = BlockReport(index, mse_rtn, mse_rtn)

    if cfg.method == "awq":
        v, o = layer.get_submodule(family.v), layer.get_submodule(family.o)
        groups = family.scale_groups(v.out_features, o.in_features)
        feat_of = {family.q: family.q, family.k: family.q, family.v: family.q, family.o: family.o,
                   family.gate: family.gate, family.up: family.gate, family.down: family.down}
        feats = capture_inputs(layer, sorted(set(feat_of.values())), x, ctx, batch)
        results = []
        for g in groups:  # every group is searched on the original weights, then all are applied
            linears = [layer.get_submodule(n) for n in g.linears]
            res = search_scale(linears, feats[feat_of[g.linears[0]]],
                               _inspect_fn(layer, g.inspect, g.linears[0], ctx),
                               bits, gs, batch, device, search=cfg.search_scale, duo=cfg.duo_scaling)
            results.append((g, linears, res))
            report.groups.append({"linears": list(g.linears), "ratio": res.ratio, "duo": res.duo,
                                  "loss": res.loss, "loss_rtn": res.loss_rtn})
        for g, linears, res in results:
            apply_scale(layer.get_submodule(g.prev), linears, res.scales)
            f = feats[feat_of[g.linears[0]]]
            f.div_(res.scales.to(f.device, f.dtype))
        if cfg.clip:
            for name in family.linears:
                if name in family.no_clip:
                    continue
                fc = layer.get_submodule(name)
                xs = subsample_tokens(feats[feat_of[name]]).to(device)
                apply_clip(fc, search_clip(fc.weight, xs, bits, gs), gs)
        del feats
        report.mse_awq = mse(fake_quantize_block(layer, family, bits, gs))

    tensors = pack_block(layer, index, family, cfg)
    report.seconds = time.perf_counter() - t0
    return tensors, report


def pack_block(layer: nn.Module, index: int, family: Family, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """The block's checkpoint tensors: packed linears, biases and norms in the output dtype, on CPU."""
    prefix = f"{family.layers}.{index}."
    out: dict[str, torch.Tensor] = {}
    quantized = set(family.linears)
    for name in family.linears:
        fc = layer.get_submodule(name)
        for k, t in pack_awq(fc.weight.detach().float(), cfg.w_bits, cfg.group_size, cfg.out_dtype).items():
            out[f"{prefix}{name}.{k}"] = t.cpu()
    for k, t in layer.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in quantized and leaf == "weight":
            continue
        out[prefix + k] = t.detach().to(cfg.out_dtype).cpu().contiguous()
    return out
