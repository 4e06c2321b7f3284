"""The Serve app end to end: a local Ray cluster, real HTTP on 127.0.0.1, the official ``openai`` client.

One cluster and one app for the module (Ray and Serve start slowly on the 2-core CI machine); the app has an
API key, so every call below also checks that auth lets the right key through. The replica-kill test runs last.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request

import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from serving.app import run_local  # noqa: E402

PORT = 8123
KEY = "test-key-123"
MODEL = "tiny-chat"
MODEL_TP = "tiny-chat-tp2"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# A Qwen-style template that renders tools itself (so the server passes them to the template).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "</tools>\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    import shutil

    src = tiny_model_factory("qwen2", max_position_embeddings=4096)
    model = tmp_path_factory.mktemp("served") / MODEL
    shutil.copytree(src, model)
    (model / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    common = dict(model=str(model), num_cpus=0.2, dtype="float32", block_size=8, num_kv_blocks=1024,
                  session_len=4096, max_batch_size=32, health_check_period_s=2, health_check_timeout_s=30)
    srv = run_local(port=PORT, ray_num_cpus=2, ready_timeout_s=900, config={
        "api_keys": [KEY], "ingress_num_cpus": 0.1,
        "models": [common, {**common, "name": MODEL_TP, "tp": 2,  # the same weights over two ranks
                            "profile_dir": str(tmp_path_factory.mktemp("traces"))}]})
    yield srv
    srv.shutdown()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, timeout=120, max_retries=0)


def _get(url, key=KEY):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read().decode()


def _metric(text: str, name: str) -> float:
    vals = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    return sum(vals)


def test_models_health_auth_and_errors(server, client):
    assert _get(server.url + "/health", None)[0] == 200
    assert [m.id for m in client.models.list().data] == [MODEL, MODEL_TP]
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as e:  # no key at all
        _get(server.base_url + "/models", None)
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    for bad in ({"temperature": 3.0}, {"top_p": 0}, {"n": 0}, {"max_tokens": -1}, {"top_logprobs": 3},
                {"presence_penalty": 2.5}, {"stop": [""]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **bad)
        assert set(e.value.body) == {"message", "type", "param", "code"} and e.value.body["param"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 4200, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


def test_chat_completions_n_stop_and_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Tell me more"}],
        max_tokens=6, n=2, temperature=0.9, seed=1)
    assert r.object == "chat.completion" and len(r.choices) == 2 and r.model == MODEL
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens and r.usage.completion_tokens <= 12
    greedy = client.completions.create(model=MODEL, prompt="The city of", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == 12
    stop = text.strip()[3:6] or text[:1]
    cut = client.completions.create(model=MODEL, prompt="The city of", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_streaming_with_usage(client):
    s = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=8,
                                       stream=True, stream_options={"include_usage": True}, temperature=0)
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=8,
                                          temperature=0)
    assert text == full.choices[0].message.content
    s = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, n=2, stream=True, temperature=0,
                                  stream_options={"include_usage": True})
    chunks = list(s)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].usage.completion_tokens == 10


def test_tensor_parallel_replica_answers_like_the_single_rank_one(server, client):
    """``tp: 2``: the replica is rank 0 and one TPWorker actor holds the other half of every layer, both in the
    replica's placement group; the answers are the single-rank model's, token for token, also when batched."""
    bundles = [p["bundles"] for p in ray.util.placement_group_table().values() if p["state"] == "CREATED"]
    assert bundles == [{0: {"CPU": 0.2}, 1: {"CPU": 0.2}}]  # the replica's own: the worker made none of its own

    async def both(prompts):
        c = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, timeout=120, max_retries=0)
        rs = await asyncio.gather(*(c.completions.create(model=m, prompt=p, max_tokens=10, temperature=0,
                                                         logprobs=2) for m in (MODEL, MODEL_TP) for p in prompts))
        return rs[:len(prompts)], rs[len(prompts):]

    single, tp = asyncio.run(both(["The city of", "Once upon a time", "A long story:", "hi"]))
    for a, b in zip(single, tp):
        assert b.model == MODEL_TP and b.choices[0].text == a.choices[0].text
        assert b.choices[0].logprobs.tokens == a.choices[0].logprobs.tokens
        assert b.choices[0].logprobs.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-4)
    s = client.chat.completions.create(model=MODEL_TP, messages=[{"role": "user", "content": "Count"}],
                                       max_tokens=8, stream=True, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    assert text == client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}],
                                                  max_tokens=8, temperature=0).choices[0].message.content


def _post(url, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_profile_routes_trace_both_ranks_of_a_replica(server, client):
    """POST /start_profile and /stop_profile through Serve: the model without a profile_dir refuses; the tp = 2
    one writes a trace for rank 0 (the replica) and rank 1 (its worker actor) of the steps in between."""
    import gzip

    code, body = _post(server.url + "/start_profile", {"model": MODEL})
    assert code == 400 and "profiling is off" in body["error"]["message"]
    code, body = _post(server.url + "/start_profile", {"model": MODEL_TP})
    assert code == 200, body
    client.completions.create(model=MODEL_TP, prompt="The city of", max_tokens=4)
    code, body = _post(server.url + "/stop_profile", {"model": MODEL_TP})
    assert code == 200 and body["models"][MODEL_TP]["profiling"] is False, body
    trace_dir = body["models"][MODEL_TP]["trace_dir"]
    for rank in (0, 1):
        events = json.loads(gzip.open(f"{trace_dir}/rank{rank}.trace.json.gz").read())["traceEvents"]
        assert any(str(e.get("name", "")).startswith("aten::") for e in events), rank


def test_completions_echo_logprobs_for_scoring(client):
    r = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "the quick brown fox" and lp.token_logprobs[0] is None
    assert len(lp.tokens) == r.usage.prompt_tokens and all(x <= 0 for x in lp.token_logprobs[1:])
    r = client.completions.create(model=MODEL, prompt=[[10, 20, 30, 40]], max_tokens=2, echo=True, logprobs=2,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.top_logprobs[-1]) == 2
    for i in (1, 2, 3):  # echoed prompt positions carry the top 2 as well (lm-eval's is_greedy needs them)
        top = lp.top_logprobs[i]
        assert 2 <= len(top) <= 3 and lp.tokens[i] in top
        assert max(top.values()) >= lp.token_logprobs[i] - 1e-6


def test_tools_and_json_mode(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, tools=TOOLS, tool_choice="auto")
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the template rendered the tools
    ch = r.choices[0]
    if ch.finish_reason == "tool_calls":  # a random model rarely writes one; the parser tests cover it
        assert ch.message.tool_calls[0].function.name
    else:
        assert ch.message.tool_calls is None and isinstance(ch.message.content, str)
    follow = client.chat.completions.create(model=MODEL, max_tokens=3, tools=TOOLS, messages=msgs + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens
    j = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12,
                                       response_format={"type": "json_object"})
    assert j.choices[0].message.role == "assistant" and isinstance(j.choices[0].message.content, str)
    assert j.usage.prompt_tokens > plain.usage.prompt_tokens  # the JSON instruction reached the prompt
    # constrained decoding: even a random model writes (the start of) one JSON object
    from serving.constrain.json_prefix import JsonState

    content = j.choices[0].message.content
    assert content.startswith("{") and JsonState().feed(content) is not None, content
    if j.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    # json_schema: the schema's grammar (xgrammar) holds the output to it
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    s = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert s.choices[0].finish_reason == "stop" and json.loads(s.choices[0].message.content) in (
        {"ok": True}, {"ok": False}), s.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert "json_schema.schema" in e.value.body["message"]


def test_named_tool_choice_forces_the_call(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, tools=TOOLS,
                                           tool_choice=choice)
        ch = r.choices[0]
        if ch.finish_reason == "tool_calls":  # the model closed the call within max_tokens
            assert [c.function.name for c in ch.message.tool_calls] == ["get_weather"]
        else:  # cut by max_tokens: the text is the start of the forced call, nothing else
            head = '<tool_call>\n{"name": "get_weather", "arguments": {'
            assert ch.finish_reason == "length" and ch.message.content.startswith(head), ch.message.content
    # the arguments are held to the tool's parameters schema (xgrammar): bounded ones close within max_tokens
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                       "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}}
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, tools=TOOLS + [add],
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           temperature=1.0, seed=seed)
        call = r.choices[0].message.tool_calls[0].function
        args = json.loads(call.arguments)
        assert call.name == "add" and set(args) == {"a", "b"} and all(0 <= v <= 99 for v in args.values()), args


def test_mixed_load_no_lost_or_duplicated_responses(server):
    prompts = [f"Story number {i} begins" for i in range(8)]
    c = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, timeout=300, max_retries=0)

    async def one(kind: str, p: str):
        if kind == "chat":
            r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                max_tokens=6, temperature=0)
            return r.id, r.choices[0].message.content
        if kind == "cmpl":
            r = await c.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
            return r.id, r.choices[0].text
        stream = await c.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0, stream=True)
        ids, text = set(), ""
        async for ch in stream:
            ids.add(ch.id)
            text += "".join(x.text for x in ch.choices)
        assert len(ids) == 1
        return ids.pop(), text

    async def main():
        want = {}
        for p in prompts:
            want[("chat", p)] = (await one("chat", p))[1]
            want[("cmpl", p)] = (await one("cmpl", p))[1]
        jobs = [(("chat", "cmpl", "stream")[i % 3], prompts[i % len(prompts)]) for i in range(200)]
        sem = asyncio.Semaphore(32)

        async def run(job):
            async with sem:
                return await one(*job)

        t = time.monotonic()
        got = await asyncio.wait_for(asyncio.gather(*(run(j) for j in jobs)), timeout=600)
        ids = [g[0] for g in got]
        assert len(set(ids)) == 200  # every request answered once, under its own id
        for (kind, p), (_, text) in zip(jobs, got):
            assert text == want[("cmpl" if kind == "stream" else kind, p)], (kind, p)
        return time.monotonic() - t

    print(f"200 requests at concurrency 32 in {asyncio.run(main()):.1f} s")


def test_metrics_endpoint(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    status, text = _get(server.url + "/metrics", None)
    assert status == 200
    assert _metric(text, "rayawq_requests_total") > 0
    assert _metric(text, "rayawq_generation_tokens_total") >= 3
    assert _metric(text, "rayawq_time_to_first_token_seconds_count") > 0
    assert _metric(text, "rayawq_time_per_output_token_seconds_count") > 0
    for name in ("rayawq_num_requests_running", "rayawq_num_requests_waiting", "rayawq_kv_cache_usage_perc"):
        assert re.search(rf"^{name}{{", text, re.M), name


def test_client_disconnect_frees_the_request(server):
    import httpx2 as httpx

    body = {"model": MODEL, "prompt": "A long story:", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.base_url + "/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data:")
                if n >= 3:  # still reading: the request runs
                    running = _metric(_get(server.url + "/metrics", None)[1], "rayawq_num_requests_running")
                    assert running == 1
                    break  # leaving iter_lines closes the connection
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = _get(server.url + "/metrics", None)[1]
        if _metric(text, "rayawq_num_requests_running") == 0 and _metric(text, "rayawq_kv_cache_usage_perc") == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the disconnected request still runs")


def test_killed_replica_is_replaced(server, client):
    h = serve.get_deployment_handle(f"LLMServer:{MODEL}", app_name=server.app_name)
    name = h.replica_actor_name.remote().result(timeout_s=60)
    before = h.stats.remote().result(timeout_s=60)["replica"]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 300
    last = None
    while time.monotonic() < deadline:
        try:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2, timeout=30)
            after = h.stats.remote().result(timeout_s=30)["replica"]
            if after != before and r.choices:
                break
        except Exception as e:  # while the replacement starts
            last = e
        time.sleep(2)
    else:
        pytest.fail(f"no replacement replica answered ({last})")
    for _ in range(3):
        assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices
