"""Mistral: the Llama decoder. Its sliding window is handled by capping the context at the window
(``ModelConfig``), where full attention is exact."""

from .llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
