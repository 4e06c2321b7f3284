"""Prompt-token logprobs with their top n, against transformers' own logits."""

import torch


def test_prompt_top_logprobs_match_transformers(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    from serving.config import EngineConfig
    from serving.engine.llm_engine import LLMEngine
    from serving.sampling_params import GenerationConfig

    path = tiny_model_factory("qwen2")
    eng = LLMEngine(str(path), EngineConfig(device="cpu", dtype="float32", progress=False, block_size=16,
                                            max_num_batched_tokens=24))  # chunked: scores span several steps
    ids = list(range(40, 80))
    out = eng.generate([ids], GenerationConfig(max_new_tokens=1, prompt_logprobs=True, prompt_top_logprobs=3,
                                               ignore_eos=True))[0]
    ref = torch.log_softmax(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(
        torch.tensor([ids])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(out.prompt_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-3
        top = out.prompt_top_logprobs[i]
        want = ref[i - 1].topk(3)
        assert list(top) == want.indices.tolist()
        assert all(abs(top[t] - v) < 1e-3 for t, v in zip(want.indices.tolist(), want.values.tolist()))
