"""The OpenAI-compatible HTTP surface as a FastAPI app over a *backend* (what runs the models).

``create_app(backend, api_keys, metrics)`` is used by the Serve ingress (backend = deployment handles) and by
tests (backend = ``EngineServer`` in process). A backend has ``model_names()``, ``async call(model, method,
*args)`` and ``generate(model, req)``: an async iterator of event lists (``engine_server``'s module doc).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ..metrics import CONTENT_TYPE_LATEST, IngressMetrics
from . import tool_parser
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, NamedToolChoice, OpenAIError,
                       TokenizeRequest,
                       new_id, now)
from .streaming import aclose_quietly, read_ahead

log = logging.getLogger(__name__)
CHAT_PAGE = Path(__file__).with_name("chat.html")


# -- helpers -------------------------------------------------------------------------------------------
def _validation_error(e: ValidationError) -> OpenAIError:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    return OpenAIError(f"{param}: {msg}" if param else msg, 400, param=param, code="invalid_value")


async def _parse(request: Request, model_cls):
    try:
        body = await request.json()
    except Exception:
        raise OpenAIError("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def _event_error(ev: dict) -> OpenAIError:
    return OpenAIError(ev["message"], ev.get("status", 400), ev.get("err_type", "invalid_request_error"),
                       ev.get("param"), ev.get("code"))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _tok_bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", errors="replace"))


def _chat_lp(entries: list[dict] | None) -> list[dict]:
    out = []
    for e in entries or []:
        out.append({"token": e["token"], "logprob": e["logprob"], "bytes": _tok_bytes(e["token"]),
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": _tok_bytes(t)} for t, lp in e["top"]]})
    return out


class _Usage:
    def __init__(self, n: int):
        self.n = n
        self.prompt = 0
        self.completion = 0
        self.cached = 0

    def add(self, ev: dict) -> None:
        if ev["index"] % self.n == 0:  # the prompt counts once for its n choices
            self.prompt += ev["num_prompt_tokens"]
            self.cached += ev.get("num_cached_tokens") or 0
        self.completion += ev["num_output_tokens"]

    def dict(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


class _Timer:
    """TTFT / TPOT / latency of one request as the ingress sees it."""

    def __init__(self, metrics: IngressMetrics | None, model: str):
        self.m, self.model, self.t0, self.first, self.tokens = metrics, model, time.monotonic(), None, 0

    def tokens_out(self, n: int) -> None:
        if n and self.first is None:
            self.first = time.monotonic()
        self.tokens += n

    def done(self, usage: _Usage | None) -> None:
        if self.m is None:
            return
        t = time.monotonic()
        self.m.e2e.labels(self.model).observe(t - self.t0)
        if self.first is not None:
            self.m.ttft.labels(self.model).observe(self.first - self.t0)
            if self.tokens > 1:
                self.m.tpot.labels(self.model).observe((t - self.first) / (self.tokens - 1))
        if usage is not None:
            self.m.prompt_tokens.labels(self.model).inc(usage.prompt)
            self.m.generation_tokens.labels(self.model).inc(usage.completion)


class _Guard:
    """ASGI middleware: API keys on ``/v1/*`` (Bearer or ``api-key`` header), and request counting.

    Plain ASGI (not ``BaseHTTPMiddleware``) so a client's disconnect reaches streaming responses unchanged.
    """

    def __init__(self, app, keys: list[str], metrics: IngressMetrics):
        self.app, self.keys, self.metrics = app, [k.encode() for k in keys], metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.keys:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else \
                headers.get(b"api-key", b"").decode("latin-1")
            if not any(hmac.compare_digest(token.encode(), k) for k in self.keys):
                msg = "invalid API key" if token else "missing API key (send 'Authorization: Bearer <key>')"
                err = OpenAIError(msg, 401, "invalid_request_error", code="invalid_api_key")
                self.metrics.requests.labels("", path, "401").inc()
                return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(scope.get("rayawq.model", ""), path, str(status["code"])).inc()


# -- the app -------------------------------------------------------------------------------------------
def create_app(backend, api_keys: list[str] | tuple = (), metrics: IngressMetrics | None = None,
               title: str = "rayawq") -> FastAPI:
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    keys = [k for k in (api_keys or []) if k]
    metrics = metrics or IngressMetrics()
    app.state.metrics = metrics

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    app.add_middleware(_Guard, keys=keys, metrics=metrics)

    def check_model(request: Request, name: str) -> str:
        request.scope["rayawq.model"] = name
        if name not in backend.model_names():
            raise OpenAIError(f"The model '{name}' does not exist. Served: {', '.join(backend.model_names())}",
                              404, "invalid_request_error", param="model", code="model_not_found")
        return name

    # -- plain routes ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        for model in backend.model_names():
            try:
                s = await backend.call(model, "stats")
                metrics.set_engine(model, s.get("replica", ""), s)
            except Exception as e:  # a replica being replaced: the HTTP metrics still answer
                log.warning("engine stats of %s unavailable: %s", model, e)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        data = []
        for name in backend.model_names():
            info = await backend.info(name)
            data.append({"id": name, "object": "model", "created": info.get("created", 0), "owned_by": "rayawq",
                         "root": info.get("root", name), "parent": None,
                         "max_model_len": info.get("max_model_len")})
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_model(request, model_id)
        info = await backend.info(model_id)
        return {"id": model_id, "object": "model", "created": info.get("created", 0), "owned_by": "rayawq",
                "root": info.get("root", model_id), "max_model_len": info.get("max_model_len")}

    @app.post("/v1/tokenize")
    async def tokenize(request: Request):
        req = await _parse(request, TokenizeRequest)
        check_model(request, req.model)
        return _unwrap(await backend.call(req.model, "tokenize", req.model_dump(exclude_none=True)))

    @app.post("/v1/detokenize")
    async def detokenize(request: Request):
        req = await _parse(request, DetokenizeRequest)
        check_model(request, req.model)
        return _unwrap(await backend.call(req.model, "detokenize", req.tokens))

    # -- profiling (vLLM's routes; a model served with profile_dir) -------------------------------------
    async def _profile(request: Request, action: str):
        body = await request.body()
        try:
            req = json.loads(body) if body.strip() else {}
        except ValueError:
            raise OpenAIError("the body must be JSON: {} or {\"model\": NAME}", 400, "invalid_request_error")
        if not isinstance(req, dict):
            raise OpenAIError("the body must be a JSON object: {} or {\"model\": NAME}", 400,
                              "invalid_request_error")
        names = [check_model(request, req["model"])] if req.get("model") else backend.model_names()
        return {"object": "profile", "action": action,
                "models": {m: _unwrap(await backend.call(m, "profile", action)) for m in names}}

    @app.post("/start_profile")
    async def start_profile(request: Request):
        """Trace the coming engine steps (every tensor-parallel rank) under the model's profile_dir."""
        return await _profile(request, "start")

    @app.post("/stop_profile")
    async def stop_profile(request: Request):
        """Write the traces (``rank<r>.trace.json.gz``, for Perfetto or chrome://tracing); says where."""
        return await _profile(request, "stop")

    # -- generation --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        check_model(request, req.model)
        info = await backend.info(req.model)
        ereq = {
            "kind": "chat", "n": req.n, "max_tokens": req.max_new,
            "messages": [_message(m) for m in req.messages],
            "tools": [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            "json_mode": bool(req.response_format and req.response_format.type != "text"),
            "json_schema": req.response_format.schema if req.response_format else None,
            "chat_template_kwargs": req.chat_template_kwargs, "add_generation_prompt": req.add_generation_prompt,
            "sampling": req.sampling(req.max_new),
            "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
            "request_id": new_id("chatcmpl"),
        }
        fmt = info.get("tool_format", "auto") if req.tools_enabled else "none"
        if req.tools_enabled and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)):
            # forced: decoding is constrained to one call in the model's format (engine_server.forced_call)
            names = [req.tool_choice.function.name] if isinstance(req.tool_choice, NamedToolChoice) else \
                [t.function.name for t in req.tools]
            ereq["tool_call"] = {"fmt": "llama3" if fmt == "llama3" else "hermes", "names": names}
        return await _respond(req, ereq, lambda ev, usage: _chat_stream(req, ereq, ev, fmt, usage),
                              lambda ev: _chat_full(req, ereq, ev, fmt))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        check_model(request, req.model)
        if req.stream and req.echo and req.logprobs is not None:
            raise OpenAIError("echo with logprobs is not supported when streaming", param="echo",
                              code="unsupported_parameter")
        ereq = {"kind": "completion", "n": req.n, "max_tokens": req.max_tokens, "prompts": req.prompts,
                "echo": req.echo, "sampling": req.sampling(req.max_tokens), "logprobs": req.logprobs,
                "request_id": new_id("cmpl")}
        return await _respond(req, ereq, lambda ev, usage: _completion_stream(req, ereq, ev, usage),
                              lambda ev: _completion_full(req, ereq, ev))

    async def _respond(req, ereq: dict, stream_fn, full_fn):
        timer = _Timer(metrics, req.model)
        gen = _batches(backend, req.model, ereq, req.stream)
        first = await _first(gen)  # errors before any output become plain HTTP errors
        if first and first[0]["type"] == "error":
            await aclose_quietly(gen)
            raise _event_error(first[0])
        metrics.in_flight.labels(req.model).inc()

        async def events() -> AsyncIterator[dict]:
            try:
                batches = [first] if first else []
                for b in batches:
                    for ev in b:
                        _count(timer, ev)
                        yield ev
                async for b in gen:
                    for ev in b:
                        _count(timer, ev)
                        yield ev
            finally:
                metrics.in_flight.labels(req.model).dec()
                await aclose_quietly(gen)

        if req.stream:
            usage = _Usage(ereq["n"])

            async def body():
                try:
                    async for chunk in stream_fn(events(), usage):
                        yield chunk
                finally:
                    timer.done(usage)
            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result, usage = await full_fn(events())
        timer.done(usage)
        return JSONResponse(result)

    return app


def _batches(backend, model: str, ereq: dict, stream: bool) -> AsyncIterator[list[dict]]:
    """The request's event batches: streamed, one coalesced batch per turn of the SSE writer (several tokens
    per chunk when it fell behind); not streamed, the backend's single reply when it has ``complete``."""
    if stream or not hasattr(backend, "complete"):
        return read_ahead(backend.generate(model, ereq))
    return _one(backend.complete(model, ereq))


async def _one(reply) -> AsyncIterator[list[dict]]:
    yield await reply


def _count(timer: _Timer, ev: dict) -> None:
    if ev["type"] == "delta":
        timer.tokens_out(len(ev["token_ids"]))


async def _first(gen):
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


def _unwrap(res):
    if isinstance(res, dict) and res.get("type") == "error":
        raise _event_error(res)
    return res


def _message(m) -> dict:
    d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name:
        d["name"] = m.name
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            args = c.function.arguments
            if isinstance(args, str):  # templates render arguments with tojson: give them the object
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                         "arguments": args}})
        d["tool_calls"] = calls
    return d


# -- chat ----------------------------------------------------------------------------------------------
async def _collect(events, total: int, n: int, lp_of) -> tuple[dict[int, list], dict[int, dict], "_Usage"]:
    """Drain a non-streaming request's events: logprob entries and the finish event of each choice, usage.
    An engine error, or a choice that failed, raises."""
    lps: dict[int, list] = {i: [] for i in range(total)}
    fin: dict[int, dict] = {}
    usage = _Usage(n)
    async for ev in events:
        if ev["type"] == "error":
            raise _event_error(ev)
        if ev["type"] == "delta":
            lps[ev["index"]] += lp_of(ev.get("logprobs"))
        elif ev["type"] == "finish":
            if ev["finish_reason"] == "error":
                raise OpenAIError(f"generation failed: {ev.get('error')}", 500, "server_error")
            fin[ev["index"]] = ev
            usage.add(ev)
    return lps, fin, usage


async def _chat_full(req: ChatCompletionRequest, ereq: dict, events, fmt: str):
    n = ereq["n"]
    lps, fin, usage = await _collect(events, n, n, _chat_lp)
    choices = []
    for i in range(n):
        ev = fin[i]
        text, reason = ev["text"], ev["finish_reason"]
        msg: dict = {"role": "assistant", "content": text}
        if fmt != "none":
            content, calls = tool_parser.parse(text, fmt)
            if calls:
                msg = {"role": "assistant", "content": content or None,
                       "tool_calls": [c.to_openai() for c in calls]}
                reason = "tool_calls"
        choices.append({"index": i, "message": msg, "logprobs": {"content": lps[i]} if ereq["logprobs"] is not None
                        else None, "finish_reason": reason})
    return {"id": ereq["request_id"], "object": "chat.completion", "created": now(), "model": req.model,
            "choices": choices, "usage": usage.dict()}, usage


async def _chat_stream(req: ChatCompletionRequest, ereq: dict, events, fmt: str, usage: "_Usage"):
    rid, created, model, n = ereq["request_id"], now(), req.model, ereq["n"]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    splitters = {i: tool_parser.StreamSplitter(fmt) for i in range(n)}
    extra = {"usage": None} if include_usage else {}

    def chunk(i, delta, reason=None, logprobs=None):
        c = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [c], **extra})

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for ev in events:
        i = ev.get("index", 0)
        if ev["type"] == "error":
            yield _sse(_event_error(ev).body())
            break
        if ev["type"] == "delta":
            text = splitters[i].feed(ev["text"])
            lp = {"content": _chat_lp(ev["logprobs"])} if ev.get("logprobs") else None
            if text or lp:
                yield chunk(i, {"content": text}, logprobs=lp)
        elif ev["type"] == "finish":
            usage.add(ev)
            reason = ev["finish_reason"]
            if reason == "error":
                yield _sse(OpenAIError(f"generation failed: {ev.get('error')}", 500, "server_error").body())
                continue
            rest, calls = splitters[i].finish()
            if rest:
                yield chunk(i, {"content": rest})
            if calls:
                yield chunk(i, {"tool_calls": [c.to_openai(k) for k, c in enumerate(calls)]})
                reason = "tool_calls"
            yield chunk(i, {}, reason)
    if include_usage:
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage.dict()})
    yield "data: [DONE]\n\n"


# -- completions ---------------------------------------------------------------------------------------
def _completion_lp(entries: list[dict], offset: int) -> dict:
    tokens, lps, tops, offs = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        tops.append(dict(e["top"]) if e["top"] else {e["token"]: e["logprob"]})
        offs.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def _echo_lp(prompt: dict) -> dict:
    toks, lps = prompt["tokens"], prompt["token_logprobs"]
    offs, off = [], 0
    for t in toks:
        offs.append(off)
        off += len(t)
    # Prompt positions carry the prompt token's logprob and, when logprobs > 0, the top n alternatives.
    tops = prompt.get("top_logprobs") or [None if lp is None else {t: lp} for t, lp in zip(toks, lps)]
    return {"tokens": list(toks), "token_logprobs": list(lps), "top_logprobs": tops, "text_offset": offs}


async def _completion_full(req: CompletionRequest, ereq: dict, events):
    total = len(ereq["prompts"]) * ereq["n"]
    entries, fin, usage = await _collect(events, total, ereq["n"], lambda lp: lp or [])
    choices = []
    for i in range(total):
        ev = fin[i]
        text, lp = ev["text"], None
        prompt = ev.get("prompt")
        if ereq["logprobs"] is not None:
            head = len(prompt["text"]) if prompt else 0
            lp = _completion_lp(entries[i], head)
            if prompt and prompt.get("tokens") is not None:
                e = _echo_lp(prompt)
                lp = {k: e[k] + lp[k] for k in lp}
        if prompt:
            text = prompt["text"] + text
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": ev["finish_reason"]})
    return {"id": ereq["request_id"], "object": "text_completion", "created": now(), "model": req.model,
            "choices": choices, "usage": usage.dict()}, usage


async def _completion_stream(req: CompletionRequest, ereq: dict, events, usage: "_Usage"):
    rid, created, model = ereq["request_id"], now(), req.model
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    offsets: dict[int, int] = {}
    echoed: set[int] = set()

    def chunk(i, text, reason=None, logprobs=None):
        return _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}],
                     **extra})

    async for ev in events:
        i = ev.get("index", 0)
        if ev["type"] == "error":
            yield _sse(_event_error(ev).body())
            break
        if ereq["echo"] and i not in echoed and ev["type"] in ("delta", "finish"):
            echoed.add(i)
            ptext = _prompt_text(ereq, i)
            if ptext:
                yield chunk(i, ptext)
            offsets[i] = len(ptext)
        if ev["type"] == "delta":
            lp = None
            if ev.get("logprobs"):
                lp = _completion_lp(ev["logprobs"], offsets.get(i, 0))
            offsets[i] = offsets.get(i, 0) + len(ev["text"])
            if ev["text"] or lp or ev["token_ids"]:  # one chunk per engine output, text or not (timing)
                yield chunk(i, ev["text"], logprobs=lp)
        elif ev["type"] == "finish":
            usage.add(ev)
            if ev["finish_reason"] == "error":
                yield _sse(OpenAIError(f"generation failed: {ev.get('error')}", 500, "server_error").body())
                continue
            yield chunk(i, "", ev["finish_reason"])
    if include_usage:
        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": usage.dict()})
    yield "data: [DONE]\n\n"


def _prompt_text(ereq: dict, index: int) -> str:
    p = ereq["prompts"][index // ereq["n"]]
    return p if isinstance(p, str) else ""
