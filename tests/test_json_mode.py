"""response_format json_object (our recogniser) and json_schema (xgrammar) as constrained decoding: the
recogniser, the sampler, the engine, the API."""

import json
import random

import pytest
import torch

from serving.constrain.json_mode import JsonObjectConstraint
from serving.constrain.json_prefix import JsonState
from serving.layers.sampler import Sampler, SamplingBatch

VALID = ['{}', '{"a": 1}', '{"a": [1, 2.5, -3e4, true, null, "x\\n\\u00e9"], "b": {"c": false}} ',
         '{"a":-0.5E+3}', '{"k":"v","l":[[],{}]}']
INVALID = [' {}', '{' + ' ' * 17 + '}', '[]', '1', '"s"', '{"a"}', '{"a":}', '{a:1}', '{"a":01}', '{"a":1,}', '{"a":tru}', '{"a":1}}',
           '{"a":"\x01"}', '{"a":1.}', '{"a" 1}', '{} x']


@pytest.mark.parametrize("text", VALID)
def test_every_prefix_of_an_object_is_accepted(text):
    for i in range(len(text)):
        assert JsonState().feed(text[:i]) is not None, text[:i]
    assert JsonState().feed(text).complete


@pytest.mark.parametrize("text", INVALID)
def test_non_objects_are_refused(text):
    st = JsonState().feed(text)
    assert st is None or not st.complete


def test_agrees_with_json_loads_on_random_strings():
    rnd = random.Random(0)
    alphabet = '{}[]":,0123456789-.eE truefalsnul\\a'
    for _ in range(5000):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12)))
        if s[0] == " ":  # leading whitespace is refused on purpose (json.loads takes it)
            continue
        try:
            good = isinstance(json.loads(s), dict)
        except ValueError:
            good = False
        st = JsonState().feed(s)
        assert (st is not None and st.complete) == good, s


def test_sampler_takes_the_best_allowed_token():
    vocab = ["{", "}", '"', "a", ":", "1", "x", "<eos>"]
    c = JsonObjectConstraint(lambda t: vocab[t], end_ids={7}, special_ids={7})
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 4.0]])  # prefers "x", then <eos>: both refused
    b = SamplingBatch([0.0], [1.0], [0], [1.0], [None], [0], [None], constraints=[c])
    assert Sampler()(logits, b).token_ids == [0]  # "{" is the best allowed start
    for t in (0, 1):
        c.advance(t)
    assert c.complete and c.allows(7) and not c.allows(1)
    assert Sampler()(logits, b).token_ids == [7]  # once complete, only end-of-sequence


def test_engine_json_mode_output_is_always_a_json_prefix(tiny_model_factory):
    from serving.config import EngineConfig
    from serving.engine.llm_engine import LLMEngine
    from serving.sampling_params import GenerationConfig

    eng = LLMEngine(str(tiny_model_factory("qwen3")), EngineConfig(device="cpu", dtype="float32", progress=False))
    prompt = eng.encode("Reply in JSON:")
    for cfg in (GenerationConfig(max_new_tokens=40, json_mode=True),
                GenerationConfig(max_new_tokens=40, json_mode=True, temperature=1.0, random_seed=3)):
        out = eng.generate([prompt], cfg)[0]
        st = JsonState().feed(out.text)
        assert st is not None, out.text
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_forced_tool_call_literals_around_the_object():
    text = {i: ch for i, ch in enumerate('<>tolcaf_{}":n \n/1mesrgu,')}
    inv = {v: k for k, v in text.items()}
    prefix, suffix = '<tool_call>\n{"name": "f", "arguments": ', '}\n</tool_call>'
    c = JsonObjectConstraint(lambda t: text[t], end_ids={99}, special_ids=set(), prefix=prefix, suffix=suffix)
    assert [t for t in text if c.allows(t)] == [inv["<"]]  # the literal is forced, character by character
    for ch in prefix + '{"a": 1}' + suffix:
        assert c.allows(inv[ch]) and not c.allows(99), ch
        c.advance(inv[ch])
    assert c.complete and c.allows(99) and not any(c.allows(t) for t in text)
    # the object may not be left early: '}' closes the arguments, then only the suffix's '}' may follow
    c2 = JsonObjectConstraint(lambda t: text[t], end_ids={99}, special_ids=set(), prefix=prefix, suffix=suffix)
    for ch in prefix + "{}":
        c2.advance(inv[ch])
    assert [t for t in text if c2.allows(t)] == [inv["}"]]


def test_prefix_alternatives_pick_one_tool():
    text = {i: ch for i, ch in enumerate('fgx{}')}
    inv = {v: k for k, v in text.items()}
    c = JsonObjectConstraint(lambda t: text[t], end_ids={9}, special_ids=set(), prefix=("fx", "gx"), suffix="")
    assert sorted(text[t] for t in text if c.allows(t)) == ["f", "g"]
    c.advance(inv["g"])
    assert [text[t] for t in text if c.allows(t)] == ["x"]
    c.advance(inv["x"])
    assert [text[t] for t in text if c.allows(t)] == ["{"]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "n", "tags"],
          "properties": {"city": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


def _follows(doc: dict) -> bool:
    return (set(doc) == {"city", "n", "tags"} and isinstance(doc["city"], str) and len(doc["city"]) <= 12
            and isinstance(doc["n"], int) and 0 <= doc["n"] <= 999 and len(doc["tags"]) <= 3
            and set(doc["tags"]) <= {"a", "b"})


def test_engine_json_schema_output_follows_the_schema(tiny_model_factory):
    """A random model under the schema's grammar: greedy, sampled and batched outputs parse and follow it (strings
    may hold raw control characters, which xgrammar's JSON grammar lets through: parsed with strict=False)."""
    pytest.importorskip("xgrammar")
    from serving.config import EngineConfig, InvalidRequestError
    from serving.engine.llm_engine import LLMEngine
    from serving.sampling_params import GenerationConfig

    eng = LLMEngine(str(tiny_model_factory("qwen3")), EngineConfig(device="cpu", dtype="float32", progress=False))
    prompt = eng.encode("Reply in JSON:")
    cfgs = [GenerationConfig(max_new_tokens=120, json_schema=SCHEMA),
            GenerationConfig(max_new_tokens=120, json_schema=json.dumps(SCHEMA), temperature=1.0, random_seed=3),
            GenerationConfig(max_new_tokens=120, json_schema=SCHEMA, temperature=0.8, random_seed=11)]
    outs = eng.generate([prompt] * 3, cfgs)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert _follows(json.loads(out.text, strict=False)), out.text
    # LMDeploy's form of the same request: GenerationConfig(response_format=...)
    lm = eng.generate([prompt], GenerationConfig(max_new_tokens=120, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}))[0]
    assert lm.token_ids == outs[0].token_ids
    with pytest.raises(InvalidRequestError, match="json_schema.schema"):
        GenerationConfig(response_format={"type": "json_schema", "json_schema": {"name": "x"}}).validate()
    with pytest.raises(InvalidRequestError, match="response_format type"):
        GenerationConfig(response_format={"type": "yaml"}).validate()
    with pytest.raises(InvalidRequestError, match='json_schema: Unsupported type "nonsense"'):
        eng.add_request(prompt, GenerationConfig(json_schema={"type": "object",
                                                              "properties": {"a": {"type": "nonsense"}}}))
    assert not eng.requests and not eng.has_unfinished()  # a refused request leaves nothing queued


def test_forced_tool_call_arguments_follow_each_tools_schema(tiny_model_factory):
    """``tool_choice: required`` over two tools: the call is one of them, between the format's literals, and its
    arguments follow that tool's parameters (one schema per prefix alternative)."""
    pytest.importorskip("xgrammar")
    from serving.config import EngineConfig
    from serving.engine.llm_engine import LLMEngine
    from serving.openai.engine_server import forced_call, tool_schemas
    from serving.sampling_params import GenerationConfig

    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
                 "type": "object", "required": ["x"], "additionalProperties": False,
                 "properties": {"x": {"enum": ["red", "blue"]}}}}},
             {"type": "function", "function": {"name": "add", "parameters": {
                 "type": "object", "required": ["a"], "additionalProperties": False,
                 "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}}}]
    names = ["pick", "add"]
    schemas = tool_schemas(tools, names)
    assert schemas == [t["function"]["parameters"] for t in tools]
    assert tool_schemas([{"type": "function", "function": {"name": "f"}}], ["f"]) == [{"type": "object"}]
    eng = LLMEngine(str(tiny_model_factory("qwen3")), EngineConfig(device="cpu", dtype="float32", progress=False))
    pre, suf = forced_call("hermes", names)
    seen = set()
    for seed in range(6):
        out = eng.generate([eng.encode("Call a tool:")], GenerationConfig(
            max_new_tokens=150, temperature=1.0, random_seed=seed, json_mode=True, json_prefix=pre,
            json_suffix=suf, json_schema=schemas))[0]
        assert out.finish_reason == "stop" and out.text.startswith("<tool_call>\n") and out.text.endswith(suf)
        call = json.loads(out.text[len("<tool_call>\n"):-len("\n</tool_call>")])
        seen.add(call["name"])
        args = call["arguments"]
        assert args in ({"x": "red"}, {"x": "blue"}) if call["name"] == "pick" else (
            set(args) == {"a"} and 0 <= args["a"] <= 9), out.text
    assert seen <= {"pick", "add"}


def test_guided_regex_and_choice(tiny_model_factory):
    """vLLM's guided_regex (the whole output matches) and guided_choice (one of the strings), greedy and sampled;
    more than one guide, or a regex xgrammar cannot read, is refused before anything is queued."""
    import re

    pytest.importorskip("xgrammar")
    from serving.config import EngineConfig, InvalidRequestError
    from serving.engine.llm_engine import LLMEngine
    from serving.sampling_params import GenerationConfig

    eng = LLMEngine(str(tiny_model_factory("qwen3")), EngineConfig(device="cpu", dtype="float32", progress=False))
    prompt = eng.encode("Answer:")
    choices = ["yes", "no", "maybe not"]
    for seed in (None, 1, 2):
        t = 0.0 if seed is None else 1.0
        out = eng.generate([prompt, prompt], [
            GenerationConfig(max_new_tokens=40, temperature=t, random_seed=seed, guided_regex=r"[0-9]{3}-[a-z]{2}"),
            GenerationConfig(max_new_tokens=40, temperature=t, random_seed=seed, guided_choice=choices)])
        assert out[0].finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", out[0].text), out[0].text
        assert out[1].finish_reason == "stop" and out[1].text in choices, out[1].text
    with pytest.raises(InvalidRequestError, match="at most one"):
        eng.add_request(prompt, GenerationConfig(guided_regex="a+", guided_choice=["a"]))
    with pytest.raises(InvalidRequestError, match="guided_regex"):
        eng.add_request(prompt, GenerationConfig(guided_regex="(unclosed"))
    assert not eng.requests
