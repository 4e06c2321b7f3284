"""OpenAI request models (validated with pydantic before anything reaches the engine) and the error type.

Field names and ranges follow OpenAI's API; the extra sampling fields (``top_k``, ``min_tokens``,
``ignore_eos``, ``repetition_penalty``, ``stop_token_ids``, ``skip_special_tokens``) are vLLM's names, so
clients written for vLLM pass them in ``extra_body`` unchanged. Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import InvalidRequestError
from ..sampling_params import MAX_LOGPROBS, parse_response_format


class OpenAIError(Exception):
    """An error answered in OpenAI's nested form: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_dict(cls, d: dict) -> "OpenAIError":
        return cls(d.get("message", "error"), int(d.get("status", 400)), d.get("type", "invalid_request_error"),
                   d.get("param"), d.get("code"))


def unsupported(param: str, why: str) -> OpenAIError:
    return OpenAIError(f"{param}: {why}", 400, param=param, code="unsupported_parameter")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- pieces --------------------------------------------------------------------------------------------
class StreamOptions(_Model):
    include_usage: bool = False


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # OpenAI's {"name", "schema", "strict", "description"}

    @model_validator(mode="after")
    def _schema(self):
        try:
            parse_response_format(self.model_dump())
        except InvalidRequestError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def schema(self) -> dict | None:
        """The JSON Schema the output must follow (``json_schema`` type), else None."""
        return parse_response_format(self.model_dump())[1]


class TextPart(_Model):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content part of type {self.type!r} is not supported (text only)")
        return self


class FunctionCall(_Model):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role!r} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


Stop = Union[str, list[str], None]


class _Sampling(_Model):
    """Fields common to both endpoints."""

    model: str
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    guided_json: dict[str, Any] | str | None = None   # the output follows this JSON Schema (xgrammar)
    guided_regex: str | None = None                    # the output matches this regular expression
    guided_choice: list[str] | None = None             # the output is one of these strings

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        return v or None

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        """OpenAI's keys are token ids written as strings; biases lie in [-100, 100]."""
        if not v:
            return None
        if len(v) > 300:
            raise ValueError("logit_bias takes at most 300 tokens")
        out = {}
        for k, b in v.items():
            try:
                t = int(k)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {k!r}") from None
            if t < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must lie in [-100, 100], got {b} for token {k}")
            out[str(t)] = float(b)
        return out

    def sampling(self, max_new_tokens: int | None) -> dict:
        """GenerationConfig keyword arguments (max_new_tokens is filled in by the engine deployment)."""
        g: dict[str, Any] = {"max_new_tokens": max_new_tokens, "stop_words": list(self.stop or []),
                             "stop_token_ids": list(self.stop_token_ids or []), "ignore_eos": self.ignore_eos,
                             "min_new_tokens": self.min_tokens, "skip_special_tokens": self.skip_special_tokens}
        # OpenAI's default temperature is 1 (sampling); 0 is greedy.
        g["temperature"] = 1.0 if self.temperature is None else float(self.temperature)
        if self.top_p is not None:
            g["top_p"] = float(self.top_p)
        if self.top_k is not None:
            g["top_k"] = int(self.top_k)
        if self.repetition_penalty is not None:
            g["repetition_penalty"] = float(self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                g[name] = float(getattr(self, name))
        if self.seed is not None:
            g["random_seed"] = int(self.seed) % (2**63)
        if self.logit_bias:
            g["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        for ours, theirs in (("guided_json", "json_schema"), ("guided_regex", "guided_regex"),
                             ("guided_choice", "guided_choice")):
            if getattr(self, ours) is not None:
                g[theirs] = getattr(self, ours)
        return g


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise OpenAIError("tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools}:
            raise OpenAIError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools",
                              param="tool_choice")
        return self

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tools_enabled(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


PromptT = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: PromptT
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], int)):
            v = [v]
        if not v or any(len(p) == 0 for p in v):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise unsupported("suffix", "not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "only best_of == n is supported")
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError("max_tokens 0 needs echo=true (prompt scoring)", param="max_tokens")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        return list(self.prompt)  # normalised to a list by the validator


class TokenizeRequest(_Model):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Model):
    model: str
    tokens: list[int]
