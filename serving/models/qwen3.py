"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE (``ModelConfig.qk_norm``)."""

from .llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
