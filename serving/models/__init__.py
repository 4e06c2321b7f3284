"""One file per model family; ``build_model`` picks by ``ModelConfig.family``."""

from ..config import ModelConfig
from ..layers.parallel import SINGLE, TPContext
from .llama import LlamaForCausalLM
from .mistral import MistralForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen3 import Qwen3ForCausalLM

MODELS = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
          "qwen3": Qwen3ForCausalLM}


def build_model(cfg: ModelConfig, tp: TPContext = SINGLE):
    return MODELS[cfg.family](cfg, tp)


__all__ = ["MODELS", "build_model"]
