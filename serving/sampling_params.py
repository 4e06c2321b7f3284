"""Per-request generation settings (LMDeploy's ``GenerationConfig`` names), checked before a request is queued."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class GenerationConfig:
    """``temperature == 0`` (the default) is greedy decoding; anything above samples."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                        # 0 or -1: no top-k
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0         # OpenAI's: subtract this once from every token already generated
    frequency_penalty: float = 0.0        # OpenAI's: subtract this times the token's count in the output
    random_seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit, [-100, 100]
    stop_words: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None           # None: none; 0: the chosen token's; n: also the top n
    skip_special_tokens: bool = True
    min_new_tokens: int = 0
    prompt_logprobs: bool = False         # log-probability of each prompt token (perplexity); no prefix cache
    prompt_top_logprobs: int = 0          # with prompt_logprobs: also the top n at each prompt position
    json_mode: bool = False               # the output is json_prefix + one JSON object + json_suffix (constrained)
    json_schema: dict | str | list | None = None  # the output is one document it accepts (xgrammar); between
    #                                      json_prefix and json_suffix when set (a list: one per prefix alternative)
    guided_regex: str | None = None       # vLLM's: the whole output matches this regular expression (xgrammar)
    guided_choice: list[str] | None = None  # vLLM's: the output is one of these strings (xgrammar)
    response_format: dict | None = None   # LMDeploy's / OpenAI's form: {"type": "json_object"} or {"type":
    #                                      "json_schema", "json_schema": {"schema": {...}}}; sets json_mode/json_schema
    json_prefix: str | tuple[str, ...] = ""  # a forced tool call's opening literal (or alternatives)
    json_suffix: str = ""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> "GenerationConfig":
        def bad(msg):
            raise InvalidRequestError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0 or self.temperature != self.temperature:
            bad(f"temperature must lie in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must lie in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad(f"repetition_penalty must lie in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                bad(f"{name} must lie in [-2, 2], got {v}")
        if self.response_format is not None:
            json_mode, schema = parse_response_format(self.response_format)
            self.json_mode = self.json_mode or json_mode
            self.json_schema = schema if schema is not None else self.json_schema
        if self.guided_regex is not None and (not isinstance(self.guided_regex, str) or not self.guided_regex):
            bad("guided_regex must be a non-empty regular expression")
        if self.guided_choice is not None and (not isinstance(self.guided_choice, list) or not self.guided_choice
                                               or any(not isinstance(c, str) or not c for c in self.guided_choice)):
            bad("guided_choice must be a non-empty list of non-empty strings")
        if sum(x is not None for x in (self.json_schema, self.guided_regex, self.guided_choice)) > 1:
            bad("give at most one of json_schema (guided_json), guided_regex and guided_choice")
        if self.json_schema is not None and not (isinstance(self.json_schema, (dict, str)) or (
                isinstance(self.json_schema, list) and all(isinstance(x, (dict, str)) for x in self.json_schema))):
            bad("json_schema must be a JSON Schema (a dict, or its JSON text), or a list of them")
        if self.logit_bias is None:
            self.logit_bias = {}
        if not isinstance(self.logit_bias, dict):
            bad("logit_bias must map token ids to biases")
        for t, v in self.logit_bias.items():
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                bad(f"logit_bias keys must be non-negative token ids, got {t!r}")
            if not isinstance(v, (int, float)) or not -100.0 <= v <= 100.0:
                bad(f"logit_bias values must lie in [-100, 100], got {v!r} for token {t}")
        if not isinstance(self.prompt_top_logprobs, int) or not 0 <= self.prompt_top_logprobs <= MAX_LOGPROBS:
            bad(f"prompt_top_logprobs must lie in [0, {MAX_LOGPROBS}], got {self.prompt_top_logprobs!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad(f"logprobs must lie in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens must lie in [0, max_new_tokens]")
        if isinstance(self.stop_words, str):
            self.stop_words = [self.stop_words]
        if any(not isinstance(s, str) or not s for s in self.stop_words):
            bad("stop_words must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        if self.random_seed is not None and not isinstance(self.random_seed, int):
            bad("random_seed must be an integer")
        return self


def parse_response_format(rf: dict) -> tuple[bool, dict | str | None]:
    """OpenAI's / LMDeploy's ``response_format`` -> (JSON output?, the schema it must follow or None)."""
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise InvalidRequestError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
    if kind != "json_schema":
        return kind == "json_object", None
    schema = (rf.get("json_schema") or {}).get("schema")
    if not isinstance(schema, (dict, str)):
        raise InvalidRequestError("response_format json_schema needs json_schema.schema, a JSON Schema")
    return True, schema
