"""OpenAI's presence and frequency penalties in the sampler and through the engine."""

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
