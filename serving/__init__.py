"""Serving: AWQ / FP16 model runner with a paged KV cache, continuous batching, CUDA graphs, pipeline API."""

from .config import CheckpointError, EngineConfig, InvalidRequestError, ModelConfig
from .engine import LLMEngine, RequestOutput
from .sampling_params import GenerationConfig

__all__ = ["CheckpointError", "EngineConfig", "GenerationConfig", "InvalidRequestError", "LLMEngine",
           "ModelConfig", "RequestOutput"]
