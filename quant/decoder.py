"""One decoder block of the Llama family (Llama, Mistral, Qwen2, Qwen3) in plain torch, for AWQ calibration.

Why not transformers' own layer: a block worker of the distributed quantizer would have to import
transformers' modeling code to build it, 9-11 s of a cold worker's start on the H100 machine (it pulls in
torch._dynamo, torch.distributed.tensor, sympy), which capped the 4-GPU speedup. This block has the same
parameter names and computes what transformers' layer computes with the SDPA attention path (the test
checks outputs against it for every family), so the quantizer can build blocks from nothing but torch.

What is not reimplemented: the rotary tables (cos, sin) come from transformers' own rotary embedding on
the driver (``model_io.rotary_embeddings``), so every RoPE scaling variant stays transformers' business, and
the config's defaults are read through transformers' config class (``BlockSpec.from_config``). As with
transformers' layer called directly, the caller's mask decides what is attended (no sliding window here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuantError
from .families import Family

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class BlockSpec:
    """Shapes and options of one decoder block: all a worker needs to build it (small, picklable)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, config, family: Family) -> "BlockSpec":
        """From a transformers config object (its class fills the defaults a saved config.json leaves out)."""
        heads = int(config.num_attention_heads)
        attn_bias = bool(getattr(config, "attention_bias", False))

        def pick(fixed: bool | None, default: bool) -> bool:
            return default if fixed is None else fixed

        spec = cls(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            rms_norm_eps=float(config.rms_norm_eps),
            hidden_act=str(config.hidden_act),
            qkv_bias=pick(family.qkv_bias, attn_bias),
            o_bias=pick(family.o_bias, attn_bias),
            mlp_bias=pick(family.mlp_bias, bool(getattr(config, "mlp_bias", False))),
            qk_norm=family.qk_norm,
        )
        if spec.hidden_act not in _ACTIVATIONS:
            raise QuantError(f"activation {spec.hidden_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        if spec.num_heads % spec.num_kv_heads:
            raise QuantError(f"{spec.num_heads} attention heads do not divide into {spec.num_kv_heads} KV heads")
        return spec


class RMSNorm(nn.Module):
    """``w * x / rms(x)``, the statistics in fp32 and the product in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout: ``x * cos + rotate_half(x) * sin``, cos/sin ``[b, seq, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, spec: BlockSpec):
        super().__init__()
        h, hd = spec.hidden_size, spec.head_dim
        self.head_dim, self.groups = hd, spec.num_heads // spec.num_kv_heads
        self.q_proj = nn.Linear(h, spec.num_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * hd, h, bias=spec.o_bias)
        if spec.qk_norm:  # Qwen3: an RMSNorm over each head's vector before RoPE
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(b, s, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        if self.groups > 1:  # KV heads repeated, not SDPA's enable_gqa: the same kernel transformers picks
            k, v = (t.repeat_interleave(self.groups, dim=1) for t in (k, v))
        if attention_mask is not None:
            attention_mask = attention_mask[..., : k.shape[-2]]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.head_dim**-0.5,
                                             is_causal=attention_mask is None and s > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, spec: BlockSpec):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=spec.mlp_bias)
        self.act = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm attention then pre-norm gated MLP, each with a residual; submodule names as in transformers."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_embeddings)
        return h + self.mlp(self.post_attention_layernorm(h))
