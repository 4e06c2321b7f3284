"""Qwen2 / Qwen2.5: the Llama decoder with biases on q, k, v (none on o_proj)."""

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    o_proj_bias = False  # ModelConfig sets attention_bias (q/k/v) for this family
