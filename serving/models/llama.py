"""Llama (and the shared decoder for Mistral, Qwen2, Qwen3), written for inference on the paged cache.

q/k/v and gate/up are fused into one linear each; linears split over tensor-parallel ranks by shard spec
(column: qkv, gate_up; row: o, down, followed by one all-reduce each).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig, QuantConfig
from ..layers.attention import PagedAttention
from ..layers.embedding import Embedding
from ..layers.linear import Linear, column_parts, qkv_parts
from ..layers.norm import RMSNorm
from ..layers.parallel import SINGLE, TPContext
from ..layers.rotary import RotaryEmbedding


def quant_for(cfg: ModelConfig, prefix: str, names: list[str]) -> QuantConfig | None:
    """AWQ for this layer unless the checkpoint keeps any of its parts dense."""
    q = cfg.quant
    if q is None:
        return None
    return q if all(q.applies_to(f"{prefix}.{n}") for n in names) else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, prefix: str, rotary: RotaryEmbedding, o_bias: bool):
        super().__init__()
        d = cfg.head_dim
        parts = qkv_parts(cfg.num_heads, cfg.num_kv_heads, d, tp)
        self.q_size, self.kv_size = parts[0].local_out, parts[1].local_out
        self.num_heads, self.num_kv_heads, self.head_dim = self.q_size // d, self.kv_size // d, d
        self.qkv_proj = Linear(cfg.hidden_size, 0, bias=cfg.attention_bias, tp=tp, mode="column", parts=parts,
                               quant=quant_for(cfg, prefix, ["q_proj", "k_proj", "v_proj"]), dtype=cfg.dtype,
                               prefix=f"{prefix}.qkv_proj")
        self.o_proj = Linear(cfg.num_heads * d, cfg.hidden_size, bias=o_bias, tp=tp, mode="row",
                             quant=quant_for(cfg, prefix, ["o_proj"]), dtype=cfg.dtype, prefix=f"{prefix}.o_proj")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.dtype)
        self.qk_norm = cfg.qk_norm
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, rotary)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, defer: bool = False):
        """The attention block's output; ``defer``: as a ``RowOutput`` where the next norm can finish it."""
        if not self.qk_norm and x.is_cuda:  # AWQ decode: RoPE + cache store sum the QKV layer's split-K partials
            ws = self.qkv_proj.split_partials(x)
            if ws is not None:
                return self.o_proj(self.attn.forward_partials(positions, ws, self.qkv_proj.bias, x.dtype),
                                   defer=defer)
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        return self.o_proj(self.attn(positions, q, k, v), defer=defer)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, prefix: str):
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 0, bias=cfg.mlp_bias, tp=tp, mode="column",
                                   parts=column_parts({0: i, 1: i}, tp, prefix),
                                   quant=quant_for(cfg, prefix, ["gate_proj", "up_proj"]), dtype=cfg.dtype,
                                   prefix=f"{prefix}.gate_up_proj")
        self.down_proj = Linear(i, cfg.hidden_size, bias=cfg.mlp_bias, tp=tp, mode="row",
                                quant=quant_for(cfg, prefix, ["down_proj"]), dtype=cfg.dtype,
                                prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor, defer: bool = False):
        return self.down_proj(self.gate_up_proj(x, act="silu_mul"), defer=defer)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, prefix: str, rotary: RotaryEmbedding, o_bias: bool):
        super().__init__()
        # the norms finishing the MLP before them and the attention (finish slots 1 and 0: they alternate)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, finish_slot=1)
        self.self_attn = Attention(cfg, tp, f"{prefix}.self_attn", rotary, o_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, finish_slot=0)
        self.mlp = MLP(cfg, tp, f"{prefix}.mlp")

    def forward(self, positions, x, residual):
        """``x``: the embeddings (``residual`` None) or the layer before's MLP output, which, like the attention
        output here, may be left for the norm after it to finish (``RowOutput``: split-K and rank sums fused)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, defer=True)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, defer=True), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, o_bias: bool):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, tp, f"model.layers.{i}", rotary, o_bias) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, finish_slot=1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our fused module, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    o_proj_bias = True  # Llama's attention_bias covers o_proj too

    def __init__(self, cfg: ModelConfig, tp: TPContext = SINGLE):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, tp, o_bias=cfg.attention_bias and self.o_proj_bias)
        # vocabulary-parallel where it divides: each rank reads 1/tp of the head per step and the logits are
        # gathered (a Llama-3 head is 1 GiB in bf16: at batch 1 it is ~12 % of a step's reads)
        self.tp = tp
        mode = "column" if tp.world_size > 1 and cfg.vocab_size % tp.world_size == 0 else "replicated"
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, tp=tp, mode=mode, dtype=cfg.dtype, prefix="lm_head")
        if cfg.tie_word_embeddings:  # the head is (this rank's rows of) the embedding
            emb = self.model.embed_tokens.weight
            self.lm_head.weight = emb if mode == "replicated" else nn.Parameter(
                emb.data.narrow(0, tp.rank * self.lm_head.out_local, self.lm_head.out_local), requires_grad=False)

    @property
    def logits_are_collective(self) -> bool:
        """Whether ``compute_logits`` is a collective (every rank must call it with the same rows)."""
        return self.lm_head.mode == "column"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return self.tp.all_gather(logits) if self.logits_are_collective else logits
