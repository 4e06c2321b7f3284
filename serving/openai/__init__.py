"""OpenAI-compatible API: request models, the FastAPI routes, tool-call parsing, the engine-side handler."""

from .protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

__all__ = ["ChatCompletionRequest", "CompletionRequest", "OpenAIError"]
