"""LMDeploy-style pipeline: ``pipeline(model_path, engine_config)(prompts, gen_config)``.

A prompt is a string (a user turn: the chat template is applied when ``do_preprocess`` and the tokenizer has
one), a list of ``{"role", "content"}`` messages, or token ids. One prompt gives one ``Response``; a list gives
a list, run as one continuous batch. ``stream_infer`` yields pieces as they are decoded.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

from .config import EngineConfig
from .engine import LLMEngine, RequestOutput
from .sampling_params import GenerationConfig


@dataclass
class Response:
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None
    token_ids: list[int]
    logprobs: list | None = None
    index: int = 0


def _is_single(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], dict):
        return True  # one conversation
    return isinstance(prompts, list) and prompts and isinstance(prompts[0], int)


class Pipeline:
    """Owns its engine: ``close()`` (or ``with pipeline(...) as pipe``) frees it, and with ``tp > 1`` its Ray ranks."""

    def __init__(self, model_path: str, engine_config: EngineConfig | None = None, **engine_kwargs):
        cfg = engine_config or EngineConfig()
        if cfg.tp > 1:
            extra = set(engine_kwargs) - {"tokenizer"}
            if extra:
                raise ValueError(f"with tp={cfg.tp} the model loads from model_path on every rank; "
                                 f"{sorted(extra)} cannot be passed")
            from .remote_engine import RemoteEngine

            self.engine = RemoteEngine(model_path, cfg, **engine_kwargs)
        else:
            self.engine = LLMEngine(model_path, engine_config, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ids(self, prompt, do_preprocess: bool) -> list[int]:
        has_template = getattr(self.tokenizer, "chat_template", None)
        return self.engine.encode(prompt, chat=bool(do_preprocess and has_template))

    def __call__(self, prompts, gen_config: GenerationConfig | list[GenerationConfig] | None = None,
                 do_preprocess: bool = True, use_tqdm: bool = False):
        single = _is_single(prompts)
        plist = [prompts] if single else list(prompts)
        ids = [self._ids(p, do_preprocess) for p in plist]
        outs = self.engine.generate(ids, gen_config, use_tqdm=use_tqdm)
        res = [_response(o, i) for i, o in enumerate(outs)]
        return res[0] if single else res

    def get_ppl(self, input_ids: list[int] | list[list[int]]) -> float | list[float]:
        """Mean next-token NLL of token-id sequences (exp() of it is the perplexity), as LMDeploy's."""
        single = bool(input_ids) and isinstance(input_ids[0], int)
        out = self.engine.get_ppl([input_ids] if single else input_ids)
        return out[0] if single else out

    def stream_infer(self, prompts, gen_config: GenerationConfig | list[GenerationConfig] | None = None,
                     do_preprocess: bool = True) -> Iterator[Response]:
        """Yields ``Response`` pieces (new text and tokens; ``index`` says which prompt) until all finish.

        Leaving the loop early cancels what is still running.
        """
        plist = [prompts] if _is_single(prompts) else list(prompts)
        ids = [self._ids(p, do_preprocess) for p in plist]
        with closing(self.engine.stream(ids, gen_config)) as steps:  # closed (so aborted) if we are left early
            for step in steps:
                for i, out in step:
                    yield Response(out.delta_text, len(out.token_ids), out.num_prompt_tokens, out.finish_reason,
                                   out.new_token_ids, out.logprobs[-len(out.new_token_ids):] if out.logprobs and
                                   out.new_token_ids else None, i)


def _response(o: RequestOutput, i: int) -> Response:
    return Response(o.text, len(o.token_ids), o.num_prompt_tokens, o.finish_reason, o.token_ids, o.logprobs, i)


def pipeline(model_path: str, engine_config: EngineConfig | None = None, **engine_kwargs) -> Pipeline:
    return Pipeline(model_path, engine_config, **engine_kwargs)
