"""The OpenAI layer without Ray: tool-call parsing, request validation, the app config, and the routes over
in-process engines (ASGI) and a scripted backend (tool calls and JSON mode from known model outputs)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
import time

import httpx2 as httpx
import openai
import pytest

from serving import EngineConfig, GenerationConfig, LLMEngine
from serving.app import AppConfig, build_app
from serving.openai import tool_parser
from serving.openai.engine_server import EngineServer, LocalBackend
from serving.openai.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from serving.openai.routes import create_app

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


# -- tool-call parsing -----------------------------------------------------------------------------------
def test_parse_hermes_and_llama3():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    content, calls = tool_parser.parse(text)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_weather", {"city": "Rome"})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    content, calls = tool_parser.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert content == "" and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    _, calls = tool_parser.parse('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert [c.name for c in calls] == ["a", "b"]
    # not calls: plain text, JSON without a name, malformed blocks
    for t in ("The weather is fine.", '{"city": "Paris"}', "<tool_call>{not json</tool_call>", "{broken"):
        content, calls = tool_parser.parse(t)
        assert calls == [] and content == t
    assert tool_parser.parse('{"name": "x", "arguments": {}}', "none") == ('{"name": "x", "arguments": {}}', [])


def test_stream_splitter_holds_back_calls_only():
    s = tool_parser.StreamSplitter("auto")
    sent = "".join(s.feed(p) for p in ["Sure", ", checking <to", "ol_call>\n{\"name\": \"get_weather\", ",
                                       "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"])
    assert sent == "Sure, checking "
    rest, calls = s.finish()
    assert rest == "" and calls[0].name == "get_weather"
    s = tool_parser.StreamSplitter("auto")
    sent = "".join(s.feed(p) for p in ["Hello <", "b>world"])
    rest, calls = s.finish()
    assert sent + rest == "Hello <b>world" and not calls
    s = tool_parser.StreamSplitter("auto")  # Llama-3 style: output starting with JSON is held
    assert s.feed('{"name": "f", ') == "" and s.feed('"parameters": {}}') == ""
    assert s.finish()[1][0].name == "f"
    s = tool_parser.StreamSplitter("auto")
    assert s.feed("{ not a call") == "" and s.finish() == ("{ not a call", [])


# -- validation and config -------------------------------------------------------------------------------
def test_request_validation():
    ok = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "stop": "x", "seed": 3})
    assert ok.stop == ["x"] and ok.sampling(5)["random_seed"] == 3 and ok.sampling(5)["temperature"] == 1.0
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "max_completion_tokens": 7,
                                                 "max_tokens": 3}).max_new == 7
    pen = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "frequency_penalty": 0.5,
                                                "presence_penalty": -1.0}).sampling(5)
    assert pen["frequency_penalty"] == 0.5 and pen["presence_penalty"] == -1.0
    import pydantic

    with pytest.raises(pydantic.ValidationError) as e:  # the routes answer this with a 400 naming the field
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "frequency_penalty": 2.5})
    assert e.value.errors()[0]["loc"] == ("frequency_penalty",)
    lb = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "logit_bias": {"42": 100, "7": -5.5}})
    assert lb.sampling(5)["logit_bias"] == {42: 100.0, 7: -5.5}
    for bad in ({"abc": 1}, {"3": 101}, {"-2": 1}):
        with pytest.raises(pydantic.ValidationError) as e:
            ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "logit_bias": bad})
        assert e.value.errors()[0]["loc"] == ("logit_bias",)
    with pytest.raises(OpenAIError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "tool_choice": "auto"})
    with pytest.raises(OpenAIError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": 0})
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts == [[1, 2]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompts == ["a", "b"]


def test_app_config():
    cfg = AppConfig.from_args({"model": "/x/my-model", "api_keys": "k1, k2", "autoscale": "1,4",
                               "max_batch_size": "16"})
    m = cfg.models[0]
    assert m.name == "my-model" and cfg.api_keys == ["k1", "k2"] and m.autoscale == (1, 4)
    assert m.engine_config().max_num_seqs == 16
    assert AppConfig.from_args({"model": "/x", "tp": 2}).models[0].engine_config().tp == 2
    with pytest.raises(ValueError, match="num_cpus > 0"):  # one bundle per rank, and this one would be empty
        build_app({"model": "/x", "tp": 2, "num_cpus": 0, "device": "cpu"})
    with pytest.raises(ValueError):
        AppConfig.from_args({"model": "/x", "autoscale": "3,1"})
    tpl = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert AppConfig.from_args({"model": "/x", "chat_template": tpl}).models[0].engine_config().chat_template == tpl


def test_serve_command_sends_the_chat_template_text(tmp_path):
    """``rayawq serve --chat-template FILE`` reads the file on the driver: replicas on other nodes need no copy."""
    import argparse

    from cluster.serve_cmd import _config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}")
    args = parser.parse_args(["serve", "/x/m", "--chat-template", str(f)])
    assert _config(args)["models"][0]["chat_template"] == f.read_text()
    with pytest.raises(ValueError, match="not found"):
        _config(parser.parse_args(["serve", "/x/m", "--chat-template", str(tmp_path / "missing.jinja")]))


# -- the routes over a real in-process engine ------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_factory):
    eng = LLMEngine(tiny_model_factory("qwen2"), EngineConfig(dtype="float32", block_size=8, num_kv_blocks=256,
                                                              session_len=512, progress=False))
    srv = EngineServer(eng, "tiny")
    yield srv
    srv.shutdown()


def _client(app):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0), http


def test_routes_in_process(server):
    async def main():
        c, http = _client(create_app(LocalBackend({"tiny": server})))
        r = await c.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, n=3, temperature=0.8,
                                            seed=7, logprobs=True, top_logprobs=2)
        assert len(r.choices) == 3 and r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices)
        assert all(len(t.top_logprobs) == 2 for ch in r.choices for t in ch.logprobs.content)
        # echo + logprobs + max_tokens 0: prompt scoring (lm-eval's loglikelihood requests)
        r = await c.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=0, echo=True,
                                       logprobs=1, temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == "the quick brown fox" and r.usage.completion_tokens == 0
        assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
        assert len(lp.tokens) == r.usage.prompt_tokens
        # the same scores as the engine's own prompt log-probabilities
        ids = server.tokenizer.encode("the quick brown fox")
        g = GenerationConfig(max_new_tokens=1, prompt_logprobs=True, ignore_eos=True)
        want = list(server.async_engine.stream(ids, g))[-1].prompt_logprobs  # only the loop thread steps
        assert lp.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
        r = await c.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2, temperature=0,
                                       echo=True, logprobs=0)
        assert len(r.choices) == 4 and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
        assert r.choices[0].text == r.choices[1].text  # greedy: both samples agree
        # tokenize helpers
        t = (await http.post("/v1/tokenize", json={"model": "tiny", "prompt": "hello"})).json()
        d = (await http.post("/v1/detokenize", json={"model": "tiny", "tokens": t["tokens"]})).json()
        assert d["prompt"] == "hello" and t["max_model_len"] == 512
        # tools reach the prompt (this template has no tools: the server's system prompt carries them)
        plain = await c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        tooled = await c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, tools=TOOLS)
        assert tooled.usage.prompt_tokens > plain.usage.prompt_tokens + 20
        # multi-turn with a tool result
        r = await c.chat.completions.create(model="tiny", max_tokens=2, tools=TOOLS, messages=MSG + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        # errors
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 700}])
        assert e.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError) as e:
            await c.completions.create(model="tiny", prompt="hi", max_tokens=600)
        assert e.value.body["param"] == "max_tokens"
        with pytest.raises(openai.BadRequestError):
            await c.completions.create(model="tiny", prompt=[1, 100000], max_tokens=2)
        bad = await http.post("/v1/chat/completions", content=b"{not json",
                              headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        bad = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "n": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
        # logit_bias: a +100 token is all the model says; a token id outside the vocabulary is a 400
        r = await c.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0.7,
                                       logit_bias={"42": 100})
        assert r.usage.completion_tokens == 4 and server.tokenizer.encode(r.choices[0].text,
                                                                          add_special_tokens=False) == [42] * 4
        with pytest.raises(openai.BadRequestError) as e:
            await c.completions.create(model="tiny", prompt="hello", max_tokens=2, logit_bias={"100000": 5})
        assert "vocabulary" in e.value.body["message"]
        # vLLM's guided decoding extras (xgrammar)
        r = await c.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=1.0, seed=3,
                                       extra_body={"guided_choice": ["alpha", "beta gamma"]})
        assert r.choices[0].text in ("alpha", "beta gamma") and r.choices[0].finish_reason == "stop"
        r = await c.chat.completions.create(model="tiny", messages=MSG, max_tokens=20,
                                            extra_body={"guided_regex": "[0-9]{2}"})
        assert len(r.choices[0].message.content) == 2 and r.choices[0].message.content.isdigit()
        with pytest.raises(openai.BadRequestError) as e:
            await c.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                       extra_body={"guided_regex": "a", "guided_choice": ["a"]})
        assert "at most one" in e.value.body["message"]
        assert server.engine_stats()["running"] == 0
    asyncio.run(main())


def test_auth(server):
    async def main():
        app = create_app(LocalBackend({"tiny": server}), api_keys=["sekret"])
        c, http = _client(app)
        assert (await http.get("/health")).status_code == 200  # health, metrics and the page stay open
        assert (await http.get("/")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
        ok = openai.AsyncOpenAI(base_url="http://test/v1", api_key="sekret", http_client=http)
        assert [m.id for m in (await ok.models.list()).data] == ["tiny"]
        assert "rayawq_requests_total" in (await http.get("/metrics")).text
    asyncio.run(main())


def test_health_detects_a_stuck_engine(server):
    server.healthy(60)
    server.stats.in_flight += 1
    server.stats.last_progress = time.monotonic() - 120
    try:
        with pytest.raises(RuntimeError, match="no progress"):
            server.healthy(60)
    finally:
        server.stats.in_flight -= 1
        server.stats.last_progress = time.monotonic()


# -- scripted model outputs: tool calls and JSON mode ----------------------------------------------------
class ScriptedBackend:
    """Answers every request with a fixed output text, in pieces, like an engine would stream it."""

    def __init__(self, text: str, tool_format: str = "hermes"):
        self.text, self.tool_format = text, tool_format

    def model_names(self):
        return ["m"]

    async def info(self, model):
        return {"tool_format": self.tool_format, "max_model_len": 4096}

    async def call(self, model, method, *args):
        return {"running": 0}

    async def generate(self, model, req):
        pieces = [self.text[i:i + 7] for i in range(0, len(self.text), 7)]
        for k in range(req["n"]):
            for p in pieces:
                yield [{"type": "delta", "index": k, "text": p, "token_ids": [1], "logprobs": None}]
            yield [{"type": "finish", "index": k, "finish_reason": "stop", "text": self.text,
                    "num_prompt_tokens": 10, "num_output_tokens": len(pieces), "num_cached_tokens": 0,
                    "prompt": None}]


def test_tool_call_round_trip_on_scripted_output():
    out = 'I will check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

    async def main():
        c, _ = _client(create_app(ScriptedBackend(out)))
        r = await c.chat.completions.create(model="m", messages=MSG, tools=TOOLS)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content == "I will check."
        call = ch.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        # streamed: content first, then one tool_calls delta, then finish_reason tool_calls
        s = await c.chat.completions.create(model="m", messages=MSG, tools=TOOLS, stream=True,
                                            stream_options={"include_usage": True})
        content, calls, reasons, usage = "", [], [], None
        async for chunk in s:
            if chunk.usage:
                usage = chunk.usage
            for chc in chunk.choices:
                content += chc.delta.content or ""
                calls += chc.delta.tool_calls or []
                if chc.finish_reason:
                    reasons.append(chc.finish_reason)
        assert content == "I will check." and reasons == ["tool_calls"] and usage.prompt_tokens == 10
        assert calls[0].function.name == "get_weather" and calls[0].index == 0
        # tool_choice none: the text stays text
        r = await c.chat.completions.create(model="m", messages=MSG, tools=TOOLS, tool_choice="none")
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == out
        # the follow-up turn with the tool result is accepted
        r = await c.chat.completions.create(model="m", tools=TOOLS, messages=MSG + [
            {"role": "assistant", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
        assert r.choices[0].message.tool_calls
    asyncio.run(main())


def test_llama3_tool_calls_and_json_mode_on_scripted_output():
    async def main():
        c, _ = _client(create_app(ScriptedBackend('{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                                                  "llama3")))
        r = await c.chat.completions.create(model="m", messages=MSG, tools=TOOLS)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        # the engine constrains JSON mode (tests/test_json_mode.py); the route passes the object through
        c, _ = _client(create_app(ScriptedBackend('{"answer": 42}')))
        r = await c.chat.completions.create(model="m", messages=MSG, response_format={"type": "json_object"})
        assert json.loads(r.choices[0].message.content) == {"answer": 42}
    asyncio.run(main())


# -- token coalescing (issue #5): a consumer that falls behind gets several tokens per message -------------
def _completion_req(**kw) -> dict:
    req = {"kind": "completion", "n": 2, "max_tokens": 24, "prompts": ["the quick brown fox"], "echo": False,
           "logprobs": 1, "sampling": {"temperature": 0.0, "ignore_eos": True}}
    req.update(kw)
    return req


def test_slow_consumer_gets_multi_token_messages_with_the_same_text(server):
    from serving.openai.streaming import read_ahead

    async def streamed(req):
        batches, text, ids, lps, fin = 0, {}, {}, {}, {}
        async for batch in read_ahead(server.generate(req)):
            batches += 1
            deltas = [ev["index"] for ev in batch if ev["type"] == "delta"]
            assert len(deltas) == len(set(deltas))  # at most one delta per choice per message
            for ev in batch:
                i = ev["index"]
                if ev["type"] == "delta":
                    text[i] = text.get(i, "") + ev["text"]
                    ids[i] = ids.get(i, []) + ev["token_ids"]
                    lps[i] = lps.get(i, []) + (ev["logprobs"] or [])
                elif ev["type"] == "finish":
                    fin[i] = ev
            await asyncio.sleep(0.05)  # a slow consumer: the engine runs ahead meanwhile
        return batches, text, ids, lps, fin

    async def main():
        full = {ev["index"]: ev for ev in await server.complete(_completion_req()) if ev["type"] == "finish"}
        batches, text, ids, lps, fin = await streamed(_completion_req())
        assert batches < 2 * 24  # fewer messages than tokens
        for i in (0, 1):
            assert fin[i]["num_output_tokens"] == len(ids[i]) == len(lps[i]) == 24
            assert text[i] == fin[i]["text"] == full[i]["text"]
        # a stop string still cuts the text where it first appears, whatever the chunking
        stop = full[0]["text"][8:11]
        want = full[0]["text"][:full[0]["text"].index(stop)]
        _, text, ids, _, fin = await streamed(_completion_req(n=1, sampling={"temperature": 0.0, "stop_words": [stop]}))
        assert fin[0]["finish_reason"] == "stop" and text.get(0, "") == fin[0]["text"] == want
        assert fin[0]["num_output_tokens"] == len(ids.get(0, []))
    asyncio.run(main())


class BurstBackend(ScriptedBackend):
    """Streams one token per event, all ready at once (an engine well ahead of its SSE writer)."""

    async def generate(self, model, req):
        for k in range(req["n"]):
            for ch in self.text:
                yield [{"type": "delta", "index": k, "text": ch, "token_ids": [7],
                        "logprobs": [{"token": ch, "id": 7, "logprob": -0.5, "top": [(ch, -0.5)]}]}]
            yield [{"type": "finish", "index": k, "finish_reason": "length", "text": self.text,
                    "num_prompt_tokens": 3, "num_output_tokens": len(self.text), "num_cached_tokens": 0,
                    "prompt": None}]


def test_sse_chunks_carry_several_tokens_when_the_writer_is_behind():
    text = "Hello there, general Kenobi."

    async def main():
        c, _ = _client(create_app(BurstBackend(text)))
        s = await c.completions.create(model="m", prompt="x", stream=True, logprobs=1, n=2,
                                       stream_options={"include_usage": True})
        got, chunks, tokens, usage = {0: "", 1: ""}, 0, {0: [], 1: []}, None
        async for chunk in s:
            usage = chunk.usage or usage
            for ch in chunk.choices:
                if ch.finish_reason is None:
                    chunks += 1
                    got[ch.index] += ch.text
                    tokens[ch.index] += ch.logprobs.tokens
        assert got == {0: text, 1: text} and tokens[0] == list(text)
        assert chunks < 2 * len(text)
        assert usage.completion_tokens == 2 * len(text) and usage.prompt_tokens == 3
        s = await c.chat.completions.create(model="m", messages=MSG, stream=True, logprobs=True)
        content, n = "", 0
        async for chunk in s:
            for ch in chunk.choices:
                if ch.delta.content:
                    n += 1
                    content += ch.delta.content
                    assert len(ch.logprobs.content) == len(ch.delta.content)
        assert content == text and n < len(text)
    asyncio.run(main())


# -- time to first token: what a request meets before its first token (issue #5) -------------------------
def test_requests_reach_the_engine_without_executor_threads(server):
    """A burst of arrivals is queued from the event loop: no thread of the default pool blocks per request
    until the next step boundary (the pool's size capped how many requests one step could admit)."""

    class NoThreads(concurrent.futures.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            raise AssertionError("a request went through the default executor")

    async def main():
        asyncio.get_running_loop().set_default_executor(NoThreads(1))
        g = GenerationConfig(max_new_tokens=2, ignore_eos=True)

        async def one(i):
            return [o async for o in server.async_engine.generate([5 + i, 6, 7], g)][-1]

        outs = await asyncio.gather(*(one(i) for i in range(40)))
        assert all(o.finished and len(o.token_ids) == 2 for o in outs)
    asyncio.run(main())


def test_a_request_cancelled_before_the_engine_took_it_leaves_nothing_behind(server):
    ae = server.async_engine
    g = GenerationConfig(max_new_tokens=500, ignore_eos=True)

    async def consume():
        async for _ in ae.generate([5, 6, 7], g):
            pass

    async def main():
        for k in range(6):  # cancelled at different points: before, during and after the engine takes it
            task = asyncio.create_task(consume())
            for _ in range(k):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _ in range(20):  # an abort takes effect at the next step boundary
            if not server.engine.has_unfinished() and not ae._sinks:
                break
            await asyncio.sleep(0.05)
        assert not server.engine.has_unfinished() and not ae._sinks
    asyncio.run(main())


def test_first_and_last_messages_are_not_held_by_the_message_budget(server):
    """The budget spaces a stream's middle messages; the first (TTFT) and the one that finishes a choice (its
    client sends its next request on it, closed loop) go out at once."""

    async def main():
        t0 = time.monotonic()
        times = [time.monotonic() - t0 async for _ in server.generate(
            _completion_req(n=1, max_tokens=2, logprobs=None, prompts=[[5, 6, 7]]))]
        return times

    old = server.stream_messages_per_s
    server.stream_messages_per_s = 0.5  # one message per stream every 2 s
    try:
        times = asyncio.run(main())
    finally:
        server.stream_messages_per_s = old
    assert times[-1] < 1.0, times


def test_text_prompts_are_tokenized_off_the_event_loop(server, monkeypatch):
    """Chat templates and text prompts are encoded on the tokenizer thread, token ids on the loop (cheap)."""
    seen = []
    plan = server._plan

    def spy(req):
        seen.append(threading.current_thread().name)
        return plan(req)

    monkeypatch.setattr(server, "_plan", spy)

    async def main():
        for req in (_completion_req(n=1, max_tokens=1), _completion_req(n=1, max_tokens=1, prompts=[[5, 6]]),
                    {"kind": "chat", "n": 1, "max_tokens": 1, "messages": MSG, "sampling": {}}):
            events = await server.complete(req)
            assert events[-1]["type"] == "finish", events
    asyncio.run(main())
    loop_thread = threading.current_thread().name
    assert seen[0].startswith("rayawq-tok") and seen[1] == loop_thread and seen[2].startswith("rayawq-tok")


def test_profile_routes_trace_the_engine_steps(server, tmp_path):
    """vLLM's POST /start_profile and /stop_profile: off unless the model has a profile_dir; then the steps
    between them land as a torch.profiler trace (one per rank) in a new directory, which stop names."""
    import argparse
    import gzip

    from cluster.serve_cmd import _config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    cfg = _config(parser.parse_args(["serve", "/x/m", "--profile-dir", "traces"]))
    assert cfg["models"][0]["profile_dir"].endswith("/traces") and cfg["models"][0]["profile_dir"].startswith("/")

    async def main():
        c, http = _client(create_app(LocalBackend({"tiny": server})))
        r = await http.post("/start_profile")
        assert r.status_code == 400 and "--profile-dir" in r.json()["error"]["message"]
        server.profile_dir = str(tmp_path)
        try:
            r = await http.post("/start_profile", json={"model": "nope"})
            assert r.status_code == 404
            r = await http.post("/start_profile")
            assert r.status_code == 200, r.text
            trace_dir = r.json()["models"]["tiny"]["trace_dir"]
            assert (await http.post("/start_profile")).status_code == 400  # already running
            await c.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=4)
            r = await http.post("/stop_profile", json={"model": "tiny"})
            assert r.status_code == 200 and r.json()["models"]["tiny"] == {"profiling": False, "trace_dir": trace_dir}
            assert (await http.post("/stop_profile")).status_code == 400  # not running
        finally:
            server.profile_dir = None
            await http.aclose()
        return trace_dir

    trace_dir = asyncio.run(main())
    events = json.loads(gzip.open(f"{trace_dir}/rank0.trace.json.gz").read())["traceEvents"]
    assert any(str(e.get("name", "")).startswith("aten::") for e in events)
