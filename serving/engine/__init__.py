"""The engine: sequence (request state), block_manager (KV blocks), scheduler (who runs), model_runner
(tensors, graphs), llm_engine (the loop)."""

from .llm_engine import LLMEngine, RequestOutput

__all__ = ["LLMEngine", "RequestOutput"]
