"""Engine correctness on CPU with tiny random models: equality with transformers, AWQ, batching, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from serving import CheckpointError, EngineConfig, GenerationConfig, InvalidRequestError, LLMEngine

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


# -- helpers (also used by tests/gpu/test_engine_gpu.py) -----------------------------------------------
def make_awq_checkpoint(src: Path, dst: Path, group_size: int = 32, scale_dtype=torch.float16) -> Path:
    """Round-to-nearest AWQ checkpoint (AutoAWQ GEMM layout) of an FP model directory."""
    from safetensors.torch import load_file, save_file

    from quant.quantizer import pack_awq

    dst.mkdir(parents=True, exist_ok=True)
    state = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in state.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            base = name[: -len(".weight")]
            for k, v in pack_awq(t.float(), 4, group_size, scale_dtype).items():
                out[f"{base}.{k}"] = v
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": []}
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    return dst


def hf_greedy(model, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **kw)
    toks = out[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(toks):
        if t in eos:
            return toks[: i + 1]
    return toks


def prompts(n_list, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (n,), generator=g).tolist() for n in n_list]


def engine(path, **kw) -> LLMEngine:
    kw.setdefault("dtype", "float32")
    kw.setdefault("block_size", 8)
    kw.setdefault("progress", False)
    return LLMEngine(path, EngineConfig(**kw))


GREEDY = GenerationConfig(max_new_tokens=24)


# -- equality with transformers ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = engine(path)
    ps = prompts([3, 11, 29])
    outs = eng.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, 24), arch


def test_tied_embeddings_and_bias(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama", tie_word_embeddings=True, attention_bias=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p = prompts([9])[0]
    assert engine(path).generate([p], GREEDY)[0].token_ids == hf_greedy(hf, p, 24)


def test_llama3_rope_scaling(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import make_tiny_model

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = make_tiny_model(tmp_path / "m", "llama", tokenizer_dir=tokenizer_dir, rope_parameters=rope)
    assert json.loads((path / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p = prompts([70])[0]  # past the original context, where the scaling matters
    assert engine(path).generate([p], GREEDY)[0].token_ids == hf_greedy(hf, p, 24)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_matches_reference_loader(tiny_model_factory, tmp_path, arch):
    from quant.awq_model import load_awq_model

    awq = make_awq_checkpoint(tiny_model_factory(arch), tmp_path / "awq")
    ref = load_awq_model(awq, device="cpu", dtype=torch.float32)
    eng = engine(awq)  # model_format auto-detects AWQ
    assert eng.model_config.quant is not None and eng.model_config.quant.group_size == 32
    ps = prompts([5, 21], seed=1)
    for p, o in zip(ps, eng.generate(ps, GREEDY)):
        assert o.token_ids == hf_greedy(ref, p, 24)


def test_awq_sharded_checkpoint_and_not_converted(tiny_model_factory, tmp_path):
    """A sharded AWQ checkpoint with one layer kept dense (modules_to_not_convert) loads and matches."""
    from safetensors.torch import load_file, save_file

    from quant.awq_model import load_awq_model

    src = tiny_model_factory("llama")
    awq = make_awq_checkpoint(src, tmp_path / "awq")
    state = load_file(str(awq / "model.safetensors"))
    fp = load_file(str(src / "model.safetensors"))
    for k in [k for k in state if k.startswith("model.layers.1.mlp.down_proj.")]:
        del state[k]
    state["model.layers.1.mlp.down_proj.weight"] = fp["model.layers.1.mlp.down_proj.weight"]
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    (awq / "model.safetensors").unlink()
    for f, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(awq / f))
    (awq / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    cfg = json.loads((awq / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["layers.1.mlp.down_proj"]
    (awq / "config.json").write_text(json.dumps(cfg))
    ref = load_awq_model(awq, device="cpu", dtype=torch.float32)
    p = prompts([13], seed=2)[0]
    assert engine(awq).generate([p], GREEDY)[0].token_ids == hf_greedy(ref, p, 24)


def test_awq_fp16_scales_close_logits(tiny_model_factory, tmp_path):
    """fp16 scales, fp32 compute: same greedy tokens as the reference for a short run."""
    from quant.awq_model import load_awq_model

    awq = make_awq_checkpoint(tiny_model_factory("qwen3"), tmp_path / "awq16", scale_dtype=torch.float16)
    ref = load_awq_model(awq, device="cpu", dtype=torch.float32)
    p = prompts([7], seed=3)[0]
    assert engine(awq).generate([p], GenerationConfig(max_new_tokens=8))[0].token_ids == hf_greedy(ref, p, 8)


# -- continuous batching, preemption, prefix cache, cancellation ---------------------------------------
def _solo(path, p, params=GREEDY, **kw):
    return engine(path, **kw).generate([p], params)[0].token_ids


def test_requests_joining_mid_decode_match_solo(tiny_model_factory):
    path = tiny_model_factory("llama")
    ps = prompts([4, 37, 12, 23, 6], seed=4)
    lens = [20, 9, 24, 14, 17]
    params = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in lens]
    solo = [_solo(path, p, g) for p, g in zip(ps, params)]
    # small token budget: prompts are prefilled in chunks, mixed with running decodes
    eng = engine(path, max_num_batched_tokens=10, block_size=4)
    done = {}
    rid = {eng.add_request(ps[0], params[0]): 0, eng.add_request(ps[1], params[1]): 1}
    for step in range(200):
        if step == 3:
            rid[eng.add_request(ps[2], params[2])] = 2
        if step == 6:
            rid[eng.add_request(ps[3], params[3])] = 3
            rid[eng.add_request(ps[4], params[4])] = 4
        for o in eng.step():
            if o.finished:
                done[rid[o.request_id]] = o.token_ids
        if len(done) == 5:
            break
    assert [done[i] for i in range(5)] == solo
    assert [len(t) for t in solo] == lens


def test_preemption_recomputes_same_tokens(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    ps = prompts([10, 12, 9, 11], seed=5)
    g = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    solo = [_solo(path, p, g) for p in ps]
    eng = engine(path, block_size=4, num_kv_blocks=16, enable_prefix_caching=False)  # 64 tokens for 4 x ~31
    outs = eng.generate(ps, g)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == solo
    assert eng.block_manager.num_free_blocks == 16


def test_prefix_cache_reuses_blocks(tiny_model_factory):
    path = tiny_model_factory("llama")
    base = prompts([40], seed=6)[0]
    eng = engine(path, block_size=8)
    first = eng.generate([base + [7, 8]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second = eng.generate([base + [9]], GREEDY)[0]
    assert second.num_cached_tokens == 40
    assert second.token_ids == _solo(path, base + [9], enable_prefix_caching=False)


def test_cancel_frees_blocks_at_once(tiny_model_factory):
    path = tiny_model_factory("llama")
    eng = engine(path, block_size=4, num_kv_blocks=64)
    g = GenerationConfig(max_new_tokens=50, ignore_eos=True)
    a = eng.add_request(prompts([20])[0], g)
    b = eng.add_request(prompts([15], seed=1)[0], g)
    for _ in range(3):
        eng.step()
    seq_a = eng.requests[a].seq
    held = len(seq_a.block_table)
    assert held > 0
    before = eng.block_manager.num_free_blocks
    assert eng.abort(a)
    assert eng.block_manager.num_free_blocks == before + held
    assert not eng.abort(a)
    c = eng.add_request(prompts([5])[0], g)
    assert eng.abort(c)  # still waiting: nothing held, nothing leaks
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in outs] == [b]
    assert eng.block_manager.num_free_blocks == 64


# -- sampling ------------------------------------------------------------------------------------------
def test_sampling_seeded_reproducible_and_batch_independent(tiny_model_factory):
    path = tiny_model_factory("llama")
    eng = engine(path)
    p, other = prompts([6, 14], seed=7)
    g = GenerationConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, random_seed=1234,
                         ignore_eos=True)
    alone = eng.generate([p], g)[0].token_ids
    batched = eng.generate([other, p], [GenerationConfig(max_new_tokens=5, temperature=1.0), g])[1].token_ids
    assert alone == batched
    different = eng.generate([p], GenerationConfig(**{**g.__dict__, "random_seed": 99}))[0].token_ids
    assert different != alone
    assert eng.generate([p], GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=1, ignore_eos=True))[0] \
        .token_ids == eng.generate([p], GenerationConfig(max_new_tokens=16, ignore_eos=True))[0].token_ids


def test_repetition_penalty_matches_transformers(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p = prompts([12], seed=8)[0]
    out = engine(path).generate([p], GenerationConfig(max_new_tokens=24, repetition_penalty=1.5))[0]
    assert out.token_ids == hf_greedy(hf, p, 24, repetition_penalty=1.5)


def test_logprobs(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p = prompts([10], seed=9)[0]
    out = engine(path).generate([p], GenerationConfig(max_new_tokens=3, logprobs=4))[0]
    assert len(out.logprobs) == 3
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert list(first)[0] == out.token_ids[0] and len(first) == 4  # chosen token (also the top one) + 3 more
    top = ref.topk(4)
    for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
        assert abs(first[tid] - lp) < 1e-4


def test_stop_strings_and_stop_token_ids(tiny_model_factory):
    path = tiny_model_factory("llama")
    eng = engine(path)
    p = prompts([8], seed=10)[0]
    full = eng.generate([p], GenerationConfig(max_new_tokens=30, ignore_eos=True))[0]
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    o = eng.generate([p], GenerationConfig(max_new_tokens=30, ignore_eos=True, stop_token_ids=[stop_tok]))[0]
    assert o.finish_reason == "stop" and o.token_ids == full.token_ids[: first + 1]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text.index(stop)
    o = eng.generate([p], GenerationConfig(max_new_tokens=30, ignore_eos=True, stop_words=[stop]))[0]
    assert o.finish_reason == "stop" and o.text == text[:cut]
    o = eng.generate([p], GenerationConfig(max_new_tokens=4, ignore_eos=True))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 4


def test_eos_stops_generation(tiny_model_factory):
    path = tiny_model_factory("llama")
    eng = engine(path)
    p = prompts([8], seed=11)[0]
    first = eng.generate([p], GenerationConfig(max_new_tokens=1))[0].token_ids[0]
    eng.eos_ids = {first}  # pretend the model's eos is what it says first
    o = eng.generate([p], GenerationConfig(max_new_tokens=10))[0]
    assert o.token_ids == [first] and o.finish_reason == "stop"
    o = eng.generate([p], GenerationConfig(max_new_tokens=10, ignore_eos=True))[0]
    assert len(o.token_ids) == 10
    o = eng.generate([p], GenerationConfig(max_new_tokens=10, min_new_tokens=3))[0]
    assert len(o.token_ids) >= 3 and first not in o.token_ids[:3]


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-5), dict(max_new_tokens=0),
    dict(repetition_penalty=0.0), dict(logprobs=50), dict(stop_words=[""]),
])
def test_impossible_sampling_values_are_refused(tiny_model_factory, bad):
    eng = engine(tiny_model_factory("llama"))
    with pytest.raises(InvalidRequestError):
        eng.add_request([5, 6, 7], GenerationConfig(**bad))
    assert not eng.has_unfinished()


def test_too_long_prompt_refused_others_served(tiny_model_factory):
    path = tiny_model_factory("llama")
    eng = engine(path, session_len=64)
    good = eng.add_request(prompts([10])[0], GenerationConfig(max_new_tokens=100, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="context"):
        eng.add_request(prompts([64])[0])
    with pytest.raises(InvalidRequestError):
        eng.add_request([])
    with pytest.raises(InvalidRequestError):
        eng.add_request([5, 100000])
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in outs] == [good]
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 64 - 10  # capped by the context


def test_checkpoint_errors(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama")
    # shapes that disagree with the config
    bad = tmp_path / "bad_shape"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 384
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="proj.weight: shape .* does not match the config"):
        engine(bad)
    # a shard named by the index is missing
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    (missing / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        engine(missing)
    # a tensor is missing
    from safetensors.torch import load_file, save_file

    lacking = tmp_path / "lacking"
    shutil.copytree(src, lacking)
    state = load_file(str(lacking / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(lacking / "model.safetensors"))
    with pytest.raises(CheckpointError, match="k_proj|qkv_proj"):
        engine(lacking)
    # no weights at all, forced AWQ on an FP model, an unknown architecture
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(src / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="safetensors"):
        engine(empty)
    with pytest.raises(CheckpointError, match="quantization_config"):
        engine(src, model_format="awq")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        engine(empty)


# -- pipeline ------------------------------------------------------------------------------------------
def test_pipeline_batch_stream_and_chat(tiny_model_factory):
    from serving.pipeline import pipeline

    pipe = pipeline(str(tiny_model_factory("llama")), EngineConfig(dtype="float32", progress=False))
    g = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    single = pipe("the city of", g, do_preprocess=False)
    assert single.generate_token_len == 12 and single.input_token_len > 0
    batch = pipe(["the city of", "in the"], g, do_preprocess=False)
    assert batch[0].text == single.text and batch[1].index == 1
    pieces: dict[int, list] = {0: [], 1: []}
    for r in pipe.stream_infer(["the city of", "in the"], g, do_preprocess=False):
        pieces[r.index].append(r.text)
    assert "".join(pieces[0]) == single.text and "".join(pieces[1]) == batch[1].text
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "and then?"}]
    chat = pipe(msgs, g)
    ids = pipe.tokenizer.encode(pipe.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                                   tokenize=False), add_special_tokens=False)
    assert chat.input_token_len == len(ids)
    assert pipe("hello", g).input_token_len == len(pipe.tokenizer.encode(pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False))


def test_step_failure_fails_its_requests_not_the_engine(tiny_model_factory, monkeypatch):
    eng = engine(tiny_model_factory("llama"))
    rid = eng.add_request([5, 6, 7], GenerationConfig(max_new_tokens=4))
    real = eng.runner.execute
    monkeypatch.setattr(eng.runner, "execute", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    outs = eng.step()
    assert outs[0].request_id == rid and outs[0].finish_reason == "error" and "boom" in outs[0].error
    monkeypatch.setattr(eng.runner, "execute", real)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert len(eng.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=4))[0].token_ids) >= 1


def test_prompt_logprobs_and_ppl_match_transformers(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    from quant.awq_model import load_awq_model

    path = tiny_model_factory("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = prompts([50, 9, 33], seed=40)
    eng = engine(path, max_num_batched_tokens=24, block_size=4)  # chunked: scores cross chunk borders
    eng.generate([seqs[0]], GREEDY)  # fills the prefix cache, which scoring must not use
    nll = eng.get_ppl(seqs)
    with torch.no_grad():
        want = [hf(torch.tensor([s]), labels=torch.tensor([s])).loss.item() for s in seqs]
    assert all(abs(a - b) < 1e-4 for a, b in zip(nll, want)), (nll, want)
    out = eng.generate([seqs[1]], GenerationConfig(max_new_tokens=2, prompt_logprobs=True))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 9
    awq = make_awq_checkpoint(path, tmp_path / "awq")
    ref = load_awq_model(awq, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([seqs[2]]), labels=torch.tensor([seqs[2]])).loss.item()
    assert abs(engine(awq).get_ppl([seqs[2]])[0] - want) < 1e-4
