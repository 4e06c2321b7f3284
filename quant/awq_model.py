"""Load any AutoAWQ-layout checkpoint into a transformers model with packed weights.

The reference loader: every quantized linear becomes an :class:`AWQLinear` that keeps the packed tensors
and calls ``kernels.awq_linear`` (Triton on GPU, unpack + dequantize + matmul on CPU). It reads checkpoints
written by this project, AutoAWQ or LMDeploy alike, and serves evaluation and as the yardstick the engine is
compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import kernels

from .errors import QuantError


class AWQLinear(nn.Module):
    """A linear layer whose weight is 4-bit packed in the AutoAWQ GEMM layout."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__()
        if in_features % group_size or out_features % 8:
            raise QuantError(f"AWQLinear {in_features}->{out_features}: in must divide by {group_size}, out by 8")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.empty(in_features, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(in_features // group_size, out_features // 8, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.empty(in_features // group_size, out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.awq_linear(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, bias={self.bias is not None}"


def read_quant_config(path: Path) -> dict | None:
    """``quantization_config`` of a checkpoint if it is AWQ, else None (a plain FP model)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    q = cfg.get("quantization_config")
    if not q or q.get("quant_method", "").lower() != "awq":
        return None
    if q.get("bits", q.get("w_bit", 4)) != 4:
        raise QuantError(f"{path}: only 4-bit AWQ checkpoints are supported, this one has bits={q.get('bits')}")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantError(f"{path}: AWQ version {version!r} is not supported; only the GEMM layout is")
    return q


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise QuantError(f"{path} has no .safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise QuantError(f"{path}: shard {f} listed in the index is missing")
        with safe_open(path / f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def load_awq_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A transformers causal LM with :class:`AWQLinear` layers holding the checkpoint's packed weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    q = read_quant_config(path)
    if q is None:
        raise QuantError(f"{path} is not an AWQ checkpoint (no quantization_config with quant_method awq)")
    group_size = int(q.get("group_size", q.get("q_group_size", 128)))
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    state = checkpoint_tensors(path)
    if dtype is None:
        scales = next(t for k, t in state.items() if k.endswith(".scales"))
        dtype = torch.float32 if torch.device(device).type == "cpu" else scales.dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantized = {k[: -len(".qweight")] for k in state if k.endswith(".qweight")}
    for name in quantized:
        parent, _, leaf = name.rpartition(".")
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise QuantError(f"{path}: {name} is quantized in the checkpoint but is not a linear layer in the model")
        setattr(model.get_submodule(parent), leaf,
                AWQLinear(old.in_features, old.out_features, group_size, old.bias is not None, dtype, "meta"))
    for k, t in state.items():
        if t.is_floating_point() and not k.endswith(".scales"):
            state[k] = t.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise QuantError(f"{path}: checkpoint does not match its config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if tied:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild them on the target device.
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "inv_freq") and mod.inv_freq.is_meta:
            parent, _, leaf = mod_name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent) if parent else model, leaf, type(mod)(config=config))
    return model.to(device).eval()
