"""OpenAI's logit bias and presence and frequency penalties in the sampler and through the engine."""

import torch

from serving.layers.sampler import Sampler, SamplingBatch


def batch(**kw):
    base = dict(temperatures=[0.0, 0.0], top_ps=[1.0, 1.0], top_ks=[0, 0], repetition_penalties=[1.0, 1.0],
                seeds=[None, None], steps=[0, 0], num_logprobs=[None, None])
    base.update(kw)
    return SamplingBatch(**base)


def test_additive_penalties_are_exact():
    logits = torch.randn(2, 16)
    b = batch(presence_penalties=[0.5, 0.0], frequency_penalties=[0.25, 0.0], outputs=[[3, 3, 7], []])
    out = Sampler._penalise(logits, b)
    expected = logits.clone()
    expected[0, 3] -= 0.5 + 2 * 0.25
    expected[0, 7] -= 0.5 + 0.25
    assert torch.allclose(out, expected)


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[0.0, 1.0, 0.9], [0.0, 1.0, 0.9]])
    b = batch(presence_penalties=[0.2, 0.0], frequency_penalties=[0.0, 0.0], outputs=[[1], []])
    assert Sampler()(logits, b).token_ids == [2, 1]


def test_engine_applies_frequency_penalty(tiny_model_factory):
    from serving.config import EngineConfig
    from serving.engine.llm_engine import LLMEngine
    from serving.sampling_params import GenerationConfig

    eng = LLMEngine(str(tiny_model_factory("llama")), EngineConfig(device="cpu", dtype="float32", progress=False))
    prompt = eng.encode("The cat sat on the")
    plain = eng.generate([prompt], GenerationConfig(max_new_tokens=24, ignore_eos=True))[0].token_ids
    penal = eng.generate([prompt], GenerationConfig(max_new_tokens=24, ignore_eos=True,
                                                     frequency_penalty=2.0, presence_penalty=2.0))[0].token_ids
    assert len(set(penal)) >= len(set(plain))
    assert len(set(penal)) > 12  # a random tiny model repeats itself greedily; the penalties break that


def test_logit_bias_is_added_before_sampling():
    logits = torch.randn(2, 16)
    b = batch(logit_biases=[{3: 2.5, 7: -100.0}, {}])
    out = Sampler._penalise(logits, b)
    expected = logits.clone()
    expected[0, 3] += 2.5
    expected[0, 7] -= 100.0
    assert torch.allclose(out, expected)
    forced = batch(logit_biases=[{5: 100.0}, {11: 100.0}], temperatures=[0.0, 1.0], seeds=[None, 3])
    assert Sampler()(logits, forced).token_ids == [5, 11]  # greedy and sampled rows alike
    assert Sampler().sample(logits, forced).tolist() == [5, 11]  # the device-side (async decode) path too


def test_engine_applies_logit_bias_and_checks_it(tiny_model_factory):
    import pytest

    from serving.config import EngineConfig, InvalidRequestError
    from serving.engine.llm_engine import LLMEngine
    from serving.sampling_params import GenerationConfig

    eng = LLMEngine(str(tiny_model_factory("llama")), EngineConfig(device="cpu", dtype="float32", progress=False))
    prompt = eng.encode("The cat sat on the")
    plain = eng.generate([prompt], GenerationConfig(max_new_tokens=8, ignore_eos=True))[0].token_ids
    banned = {t: -100.0 for t in set(plain)}
    out = eng.generate([prompt, prompt], [GenerationConfig(max_new_tokens=8, ignore_eos=True, logit_bias={42: 100.0}),
                                          GenerationConfig(max_new_tokens=8, ignore_eos=True, logit_bias=banned)])
    assert out[0].token_ids == [42] * 8
    assert not set(out[1].token_ids) & set(banned)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        eng.add_request(prompt, GenerationConfig(logit_bias={10**6: 1.0}))
    with pytest.raises(InvalidRequestError, match=r"\[-100, 100\]"):
        GenerationConfig(logit_bias={3: 150.0}).validate()
    assert not eng.has_unfinished()
