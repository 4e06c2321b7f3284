"""What an engine replica does with an OpenAI request: build the prompt (chat template, tools), check it
against the context, run ``n`` samples per prompt on the ``AsyncEngine`` and stream events back.

No Ray and no HTTP here: ``serving.app`` hosts this in a Serve deployment, tests use it directly. Requests and
events are plain dicts (they cross process boundaries). Events, sent in lists (several per list under load):

* ``{"type": "delta", "index", "text", "token_ids", "logprobs"}``: new output of choice ``index``;
* ``{"type": "finish", "index", "finish_reason", "text", "num_prompt_tokens", "num_output_tokens",
  "num_cached_tokens", "prompt": {...} | None}``: the last event of a choice (``prompt`` with echo);
* ``{"type": "error", ...OpenAIError fields}``: the request was refused; nothing else follows.

A list holds at most one delta per choice: all the tokens a choice made since the last list (``streaming``).
Non-streaming requests use ``complete``: every event in one list.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from ..config import InvalidRequestError
from ..constrain.json_schema import available as schemas_available
from ..engine.async_engine import AsyncEngine
from ..sampling_params import GenerationConfig
from .protocol import OpenAIError
from .streaming import coalesce
from .tool_parser import HERMES_CLOSE, HERMES_OPEN, format_for_template

log = logging.getLogger(__name__)
T = TypeVar("T")

JSON_INSTRUCTION = "Answer with a single JSON object and nothing else."


def forced_call(fmt: str, names: list[str]) -> tuple[tuple[str, ...], str]:
    """The literals around the arguments object of one forced tool call (``tool_choice`` required: any of
    ``names``; named: one name): the prefix alternatives, one per name, and the suffix."""
    key = "parameters" if fmt == "llama3" else "arguments"
    heads = tuple(f'{{"name": {json.dumps(n)}, "{key}": ' for n in names)
    if fmt == "llama3":
        return heads, "}"
    return tuple("<tool_call>\n" + h for h in heads), "}\n</tool_call>"


def tool_schemas(tools: list[dict], names: list[str]) -> list[dict]:
    """The arguments schema of each named tool, in ``names`` order (an object of any shape where a tool has no
    ``parameters``)."""
    params = {t["function"]["name"]: t["function"].get("parameters") for t in tools if "function" in t}
    return [params.get(n) or {"type": "object"} for n in names]


def tool_instruction(tools: list[dict]) -> str:
    """A system-prompt description of the tools for chat templates that do not render ``tools`` themselves;
    it teaches the Hermes/Qwen format that ``tool_parser`` reads."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call functions to help with the user's request. The functions, as JSON signatures:\n"
            f"<tools>\n{lines}\n</tools>\n"
            "To call one, reply with a JSON object holding its name and arguments between tags, one block "
            f"per call:\n{HERMES_OPEN}\n{{\"name\": \"<function name>\", \"arguments\": {{...}}}}\n{HERMES_CLOSE}")


@dataclass
class Stats:
    """Counters read by the metrics exporters (plain numbers; updated on the replica's event loop)."""

    requests_total: int = 0
    requests_failed: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    in_flight: int = 0
    last_progress: float = field(default_factory=time.monotonic)


class EngineServer:
    def __init__(self, engine, model_name: str, tool_format: str = "auto", stream_messages_per_s: float = 0.0,
                 profile_dir: str | None = None):
        self.engine = engine
        self.profile_dir = profile_dir  # torch.profiler traces (POST /start_profile, /stop_profile); None: off
        self._profiling: str | None = None
        # the replica's budget of streamed messages per second, shared by its streams (0: one per step)
        self.stream_messages_per_s = float(stream_messages_per_s)
        self.async_engine = AsyncEngine(engine)
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = int(engine.max_model_len)
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        self.template = template if isinstance(template, str) else json.dumps(template) if template else None
        self.template_renders_tools = bool(self.template and "tools" in self.template)
        self.tool_format = format_for_template(self.template) if tool_format == "auto" else tool_format
        self.stats = Stats()
        # tokenizer work (chat templates, text prompts, the tokenize endpoints) runs here, off the event loop
        # that streams every request's tokens; one thread: a fast tokenizer is not safe for concurrent encodes
        self._tok_pool = ThreadPoolExecutor(1, thread_name_prefix="rayawq-tok")
        self._observers: list = []  # callables(event_name, **values): metrics hooks
        self._ids = 0
        self._lock = threading.Lock()

    def add_observer(self, fn) -> None:
        self._observers.append(fn)

    def _observe(self, name: str, **kw) -> None:
        for fn in self._observers:
            try:
                fn(name, **kw)
            except Exception:
                log.exception("metrics observer failed")

    # -- info ---------------------------------------------------------------------------------------
    def info(self) -> dict:
        return {"model": self.model_name, "max_model_len": self.max_model_len, "tool_format": self.tool_format,
                "has_chat_template": self.template is not None, "has_tokenizer": self.tokenizer is not None}

    def engine_stats(self) -> dict:
        sch, bm = self.engine.scheduler, self.engine.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        return {"running": len(sch.running), "waiting": len(sch.waiting),
                "kv_cache_usage": used / bm.num_blocks if bm.num_blocks else 0.0,
                "kv_blocks_total": bm.num_blocks, "num_preemptions": getattr(sch, "num_preemptions", 0),
                "in_flight": self.stats.in_flight, "requests_total": self.stats.requests_total,
                "prompt_tokens_total": self.stats.prompt_tokens_total,
                "generation_tokens_total": self.stats.generation_tokens_total}

    def healthy(self, stuck_after_s: float) -> None:
        """Raises when the engine thread died, a tensor-parallel rank is gone, or the engine has requests but made
        no progress for ``stuck_after_s``."""
        if not self.async_engine._thread.is_alive():
            raise RuntimeError("the engine loop thread is not running")
        followers = getattr(self.engine, "followers", None)
        why = followers.dead() if followers is not None else None
        if why:  # its steps would wait on the lost rank for good (NCCL): the replica has to be replaced
            raise RuntimeError(f"{why}; this replica cannot run steps any more")
        idle = time.monotonic() - self.stats.last_progress
        if self.stats.in_flight and idle > stuck_after_s:
            raise RuntimeError(f"the engine made no progress for {idle:.0f} s with {self.stats.in_flight} "
                               "requests in flight")

    async def profile(self, action: str) -> dict:
        """``start``: the engine's steps are traced on every tensor-parallel rank from the next step boundary
        into a new directory under ``profile_dir``; ``stop``: the traces are written, the directory returned."""
        if not self.profile_dir:
            raise OpenAIError(f"profiling is off for model '{self.model_name}': serve it with --profile-dir DIR "
                              "(profile_dir in the Serve config)", 400, "invalid_request_error")
        if action not in ("start", "stop"):
            raise OpenAIError(f"unknown profile action {action!r}: start or stop", 400, "invalid_request_error")
        if (action == "start") == (self._profiling is not None):
            raise OpenAIError("the profiler is already running: POST /stop_profile first" if action == "start" else
                              "the profiler is not running: POST /start_profile first", 400,
                              "invalid_request_error")
        if action == "start":
            out = str(Path(self.profile_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")  # one replica's
            self._profiling = out
            try:
                await asyncio.wrap_future(self.async_engine.run(lambda e: e.start_profile(out)))
            except BaseException:
                self._profiling = None
                raise
            return {"profiling": True, "trace_dir": out}
        out, self._profiling = self._profiling, None
        await asyncio.wrap_future(self.async_engine.run(lambda e: e.stop_profile()))
        return {"profiling": False, "trace_dir": out}

    def shutdown(self) -> None:
        self.async_engine.shutdown()
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    async def offload(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the tokenizer thread: a long prompt's template and encoding would otherwise stall
        the event loop, and with it the first token of every request that arrives meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, fn, *args)

    # -- tokens -------------------------------------------------------------------------------------
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise OpenAIError(f"this model has no tokenizer: {what} needs one (send token ids)")
        return self.tokenizer

    def token_str(self, tid: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{tid}"
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def render_chat(self, req: dict) -> list[int]:
        tok = self._need_tokenizer("a chat request")
        if not self.template:
            raise OpenAIError("this model has no chat template: use /v1/completions", param="messages")
        messages = [dict(m) for m in req["messages"]]
        tools = req.get("tools") or None
        system_extra = []
        if tools and not self.template_renders_tools:
            system_extra.append(tool_instruction(tools))
            tools = None
        if req.get("json_schema") is not None:
            system_extra.append(f"{JSON_INSTRUCTION} It follows this JSON Schema: {json.dumps(req['json_schema'])}")
        elif req.get("json_mode"):
            system_extra.append(JSON_INSTRUCTION)
        if system_extra:
            extra = "\n\n".join(system_extra)
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{extra}"}
            else:
                messages.insert(0, {"role": "system", "content": extra})
        try:
            text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                           add_generation_prompt=req.get("add_generation_prompt", True),
                                           **(req.get("chat_template_kwargs") or {}))
        except Exception as e:  # jinja errors: roles the template refuses, and the like
            raise OpenAIError(f"the chat template failed on these messages: {e}", param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        return self._need_tokenizer("a text prompt").encode(prompt)

    def tokenize(self, req: dict) -> dict:
        if req.get("messages") is not None:
            ids = self.render_chat({"messages": req["messages"]})
        else:
            tok = self._need_tokenizer("tokenize")
            ids = tok.encode(req["prompt"], add_special_tokens=req.get("add_special_tokens", True))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, tokens: list[int]) -> dict:
        tok = self._need_tokenizer("detokenize")
        return {"prompt": tok.decode(tokens)}

    # -- generation ---------------------------------------------------------------------------------
    def _plan(self, req: dict) -> list[tuple[int, list[int], GenerationConfig, dict]]:
        """(choice index, prompt ids, config, extra) per sub-request; every check before any is queued."""
        if req["kind"] == "chat":
            prompts = [self.render_chat(req)]
        else:
            prompts = [self.encode_prompt(p) for p in req["prompts"]]
        n = int(req.get("n", 1))
        echo, max_tokens = bool(req.get("echo")), req.get("max_tokens")
        want_lp = req.get("logprobs")
        plan = []
        for pi, ids in enumerate(prompts):
            if not ids:
                raise OpenAIError("the prompt is empty", param="prompt")
            vocab = self.engine.model_config.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise OpenAIError(f"token ids must lie in [0, {vocab})", param="prompt")
            room = self.max_model_len - len(ids)
            if room < 1:
                raise OpenAIError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                    f"prompt has {len(ids)} tokens (at least one new token is needed).",
                    param="messages" if req["kind"] == "chat" else "prompt", code="context_length_exceeded")
            if max_tokens is not None and max_tokens > room:
                raise OpenAIError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                    "completion). Please reduce the prompt or max_tokens.",
                    param="max_tokens", code="context_length_exceeded")
            score_only = max_tokens == 0
            new = 1 if score_only else (max_tokens if max_tokens is not None else room)
            for j in range(n):
                g = dict(req["sampling"], max_new_tokens=new)
                if req.get("json_mode"):
                    g["json_mode"] = True  # constrained decoding: the output is one JSON object
                if req.get("json_schema") is not None and not req.get("tool_call"):
                    g["json_schema"] = req["json_schema"]  # ... that this schema accepts (xgrammar)
                if req.get("tool_call"):  # tool_choice required or named: exactly one call, in the model's format
                    g["json_mode"] = True
                    g["json_prefix"], g["json_suffix"] = forced_call(**req["tool_call"])
                    if schemas_available():  # each tool's arguments held to its parameters' schema
                        g["json_schema"] = tool_schemas(req.get("tools") or [], req["tool_call"]["names"])
                if g.get("random_seed") is not None and j:
                    g["random_seed"] = (g["random_seed"] + j) % (2**63)
                if score_only:
                    g.update(ignore_eos=True, min_new_tokens=0, stop_words=[])
                if want_lp is not None:
                    g["logprobs"] = int(want_lp)
                g["prompt_logprobs"] = bool(echo and want_lp is not None)
                if echo and want_lp:
                    g["prompt_top_logprobs"] = int(want_lp)
                try:
                    cfg = GenerationConfig(**g).validate()
                except InvalidRequestError as e:
                    raise OpenAIError(str(e)) from None
                plan.append((pi * n + j, ids, cfg, {"score_only": score_only, "echo": echo,
                                                     "prompt": req["prompts"][pi] if req["kind"] != "chat"
                                                     else None}))
        return plan

    async def generate(self, req: dict, paced: bool = True):
        """Async generator of event lists (see the module doc); ``paced``: keep to the message budget."""
        try:
            plan = await self.offload(self._plan, req) if _tokenizes(req) else self._plan(req)
        except OpenAIError as e:
            yield [{"type": "error", **_err(e)}]
            return
        rid = req.get("request_id") or self._next_id()
        queue: asyncio.Queue = asyncio.Queue()
        self.stats.requests_total += 1
        self.stats.in_flight += 1
        t0 = time.monotonic()
        tasks = [asyncio.create_task(self._run_one(f"{rid}-{idx}", idx, ids, cfg, extra, queue, t0))
                 for idx, ids, cfg, extra in plan]
        left = len(tasks)
        started = False
        sent = 0.0
        try:
            while left:
                batch = [await queue.get()]
                _drain_into(queue, batch)
                if started and paced and all(e["type"] == "delta" for e in batch):
                    await self._keep_to_budget(sent)  # a finish goes out at once: its client may send the next
                    _drain_into(queue, batch)
                errors = [e for e in batch if e["type"] == "error"]
                if errors and not started:
                    yield [errors[0]]
                    return
                for e in batch:
                    if e["type"] in ("finish", "error"):
                        left -= 1
                started = True
                yield coalesce(batch)  # one message per choice, however many tokens it made meanwhile
                sent = time.monotonic()
        finally:
            self.stats.in_flight -= 1
            for t in tasks:
                if not t.done():
                    t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_to_budget(self, sent: float) -> None:
        """Wait until this stream's share of the message budget allows its next message (sent at ``sent``).

        Every message costs the Serve path (replica, ingress, proxy) a fixed amount of CPU, and a streaming
        handle tells the producer nothing about its consumer, so the replica bounds its own message rate:
        each of its ``in_flight`` streams sends at most every ``in_flight / stream_messages_per_s`` seconds,
        the tokens made meanwhile go in one message. Few streams: the gap is below a decode step and
        every token is sent at once; many: one message carries several tokens.
        """
        if self.stream_messages_per_s <= 0:
            return
        wait = sent + self.stats.in_flight / self.stream_messages_per_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def complete(self, req: dict) -> list[dict]:
        """All events of a non-streaming request as one list (one delta per choice): one message, not one
        per token."""
        events: list[dict] = []
        async for batch in self.generate(req, paced=False):
            events.extend(batch)
        return coalesce(events)

    def _next_id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"oai-{self._ids}"

    async def _run_one(self, rid, index, ids, cfg: GenerationConfig, extra, queue: asyncio.Queue, t0):
        first = None
        n_out = 0
        last = None
        try:
            async for out in self.async_engine.generate(ids, cfg, request_id=rid):
                self.stats.last_progress = time.monotonic()
                last = out
                new = out.new_token_ids
                if extra["score_only"]:
                    new = []
                if new and first is None:
                    first = time.monotonic()
                    self._observe("ttft", seconds=first - t0)
                n_out += len(new)
                if not out.finished:
                    if new or out.delta_text:
                        queue.put_nowait({"type": "delta", "index": index, "text": out.delta_text,
                                          "token_ids": list(new), "logprobs": self._lps(out, len(new), cfg)})
                    continue
                # the finishing output may carry the last tokens
                delta = "" if extra["score_only"] else out.delta_text
                if new or delta:
                    queue.put_nowait({"type": "delta", "index": index, "text": delta, "token_ids": list(new),
                                      "logprobs": self._lps(out, len(new), cfg)})
        except InvalidRequestError as e:
            queue.put_nowait({"type": "error", **_err(OpenAIError(str(e))), "index": index})
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine failed this request
            log.exception("request %s failed", rid)
            self.stats.requests_failed += 1
            queue.put_nowait({"type": "error", **_err(OpenAIError(f"{type(e).__name__}: {e}", 500,
                                                                     "server_error")), "index": index})
            return
        out = last
        n_prompt = out.num_prompt_tokens if out else len(ids)
        if extra["score_only"]:
            n_out, reason = 0, "length"
        else:
            reason = out.finish_reason if out else "error"
        self.stats.prompt_tokens_total += n_prompt
        self.stats.generation_tokens_total += n_out
        now = time.monotonic()
        if first is not None and n_out > 1:
            self._observe("tpot", seconds=(now - first) / (n_out - 1))
        self._observe("finish", prompt_tokens=n_prompt, output_tokens=n_out, seconds=now - t0)
        ev = {"type": "finish", "index": index, "finish_reason": reason,
              "text": "" if extra["score_only"] else (out.text if out else ""),
              "num_prompt_tokens": n_prompt, "num_output_tokens": n_out,
              "num_cached_tokens": out.num_cached_tokens if out else 0, "prompt": None,
              "error": out.error if out else None}
        if extra["echo"]:
            ev["prompt"] = self._echo(ids, extra["prompt"], out.prompt_logprobs if out else None,
                                      out.prompt_top_logprobs if out else None)
        queue.put_nowait(ev)

    def _lps(self, out, n_new: int, cfg: GenerationConfig):
        if cfg.logprobs is None or not n_new or not out.logprobs:
            return None
        res = []
        for tid, d in zip(out.new_token_ids[-n_new:], out.logprobs[-n_new:]):
            top = sorted(d.items(), key=lambda kv: -kv[1])[:cfg.logprobs] if cfg.logprobs else []
            res.append({"token": self.token_str(tid), "id": tid, "logprob": float(d.get(tid, float("nan"))),
                        "top": [(self.token_str(t), float(lp)) for t, lp in top]})
        return res

    def _echo(self, ids: list[int], prompt, plps, tops=None) -> dict:
        text = prompt if isinstance(prompt, str) else (
            self.tokenizer.decode(ids) if self.tokenizer is not None else "")
        res = {"text": text, "tokens": None, "token_logprobs": None, "top_logprobs": None}
        if plps is not None:
            res["tokens"] = [self.token_str(t) for t in ids]
            res["token_logprobs"] = [None if lp is None else float(lp) for lp in plps]
        if tops is not None:  # the prompt token itself, then the top n (OpenAI's shape)
            res["top_logprobs"] = [
                None if d is None or lp is None else
                {res["tokens"][i]: float(lp), **{self.token_str(t): float(v) for t, v in d.items()}}
                for i, (d, lp) in enumerate(zip(tops, plps))]
        return res


def _tokenizes(req: dict) -> bool:
    """Whether planning ``req`` runs the tokenizer (chat template or text prompts), not only token ids."""
    return req["kind"] == "chat" or any(not isinstance(p, list) for p in req.get("prompts") or ())


def _drain_into(queue: asyncio.Queue, batch: list) -> None:
    while not queue.empty():
        batch.append(queue.get_nowait())


def _err(e: OpenAIError) -> dict:
    return {"message": e.message, "status": e.status, "err_type": e.type, "param": e.param, "code": e.code}


class LocalBackend:
    """``routes.create_app``'s backend over in-process ``EngineServer``s (tests, single-process use)."""

    def __init__(self, servers: dict[str, EngineServer]):
        self.servers = servers

    def model_names(self) -> list[str]:
        return list(self.servers)

    async def info(self, model: str) -> dict:
        return self.servers[model].info()

    async def call(self, model: str, method: str, *args):
        srv = self.servers[model]
        try:
            if method == "stats":
                return {**srv.engine_stats(), "replica": "local"}
            res = getattr(srv, method)(*args)
            return await res if inspect.isawaitable(res) else res
        except OpenAIError as e:
            return {"type": "error", **_err(e)}

    def generate(self, model: str, req: dict):
        return self.servers[model].generate(req)

    async def complete(self, model: str, req: dict) -> list[dict]:
        return await self.servers[model].complete(req)
