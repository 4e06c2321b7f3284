"""Engine on a GPU: Triton kernels natively, CUDA graphs vs eager, equality with transformers, AWQ.

Run: ``PYTHONPATH=. python -m pytest tests/gpu/test_engine_gpu.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from serving import EngineConfig, GenerationConfig, LLMEngine
from tests.test_engine import make_awq_checkpoint, prompts
from tests.test_engine_triton import check_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def gpu_engine(path, **kw):
    kw.setdefault("block_size", 16)
    kw.setdefault("progress", False)
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("max_num_seqs", 16)
    return LLMEngine(path, EngineConfig(device="cuda", **kw))


def test_kernels_native_fp32_and_bf16():
    check_kernels("cuda", torch.float32, atol=2e-4)
    check_kernels("cuda", torch.bfloat16, atol=3e-2)


def test_fp32_graphs_match_transformers(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    eng = gpu_engine(path, dtype="float32")
    assert eng.runner.graphs, "CUDA graphs were not captured"
    ps = prompts([3, 11, 29])
    outs = eng.generate(ps, GenerationConfig(max_new_tokens=24))
    for p, o in zip(ps, outs):
        ids = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
        eos = 4
        ref = ids[: ids.index(eos) + 1] if eos in ids else ids
        assert o.token_ids == ref
    eager = gpu_engine(path, dtype="float32", enforce_eager=True)
    assert [o.token_ids for o in eager.generate(ps, GenerationConfig(max_new_tokens=24))] == \
        [o.token_ids for o in outs]


def _graphs_equal_eager(awq, **engine_kw) -> list[list[int]]:
    """Greedy tokens of the fp16 AWQ engine under CUDA graphs, checked equal to the eager engine's."""
    g = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    ps = prompts([5, 21, 40], seed=1)
    graphs = [o.token_ids for o in gpu_engine(awq, dtype="float16", **engine_kw).generate(ps, g)]
    eager = [o.token_ids for o in gpu_engine(awq, dtype="float16", enforce_eager=True, **engine_kw).generate(ps, g)]
    assert graphs == eager
    return graphs


def _share_agreeing_with_reference(awq, outs: list[list[int]]) -> float:
    """Share of the engine's tokens in the leading run they have in common with the reference loader's greedy
    decode (fp16 on different kernels: a common prefix, not equality)."""
    from quant.awq_model import load_awq_model

    ref = load_awq_model(awq, device="cuda", dtype=torch.float16)
    same = total = 0
    for p, o in zip(prompts([5, 21, 40], seed=1), outs):
        r = ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, min_new_tokens=16,
                         do_sample=False)[0, len(p):].tolist()
        k = next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(o))
        same, total = same + k, total + len(o)
    return same / total


def test_awq_fp16_graphs_match_eager_and_reference(tiny_model_factory, tmp_path):
    awq = make_awq_checkpoint(tiny_model_factory("qwen2"), tmp_path / "awq", group_size=32)
    assert _share_agreeing_with_reference(awq, _graphs_equal_eager(awq)) >= 0.6


def test_continuous_batching_and_cancel_on_gpu(tiny_model_factory):
    path = tiny_model_factory("llama")
    ps = prompts([4, 37, 12, 23], seed=4)
    g = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    solo = [gpu_engine(path, dtype="float32").generate([p], g)[0].token_ids for p in ps]
    eng = gpu_engine(path, dtype="float32", max_num_batched_tokens=16, block_size=4, num_kv_blocks=40)
    rid = {eng.add_request(ps[0], g): 0, eng.add_request(ps[1], g): 1}
    doomed = None
    done = {}
    for step in range(300):
        if step == 2:
            rid[eng.add_request(ps[2], g)] = 2
            doomed = eng.add_request(ps[3], GenerationConfig(max_new_tokens=200, ignore_eos=True))
        if step == 5:
            rid[eng.add_request(ps[3], g)] = 3
        if step == 8:
            assert eng.abort(doomed)
        for o in eng.step():
            if o.finished and o.request_id in rid:
                done[rid[o.request_id]] = o.token_ids
        if not eng.has_unfinished():
            break
    match = sum(done[i] == solo[i] for i in range(4))
    assert match >= 3, [(done[i], solo[i]) for i in range(4)]
    assert eng.block_manager.num_free_blocks == 40


def test_awq_split_sums_fused_into_rope_and_silu(tiny_model_factory, tmp_path):
    """Decode configs that leave their split-K partials to a second launch (TAIL 0, as the H100 table's do):
    QKV's partials are summed by the RoPE + cache kernel, gate/up's by the SiLU-mul sum. The engine must take
    that path and still agree with the reference loader as the default configs do."""
    import json

    import kernels
    from kernels import dispatch

    awq = make_awq_checkpoint(tiny_model_factory("qwen2"), tmp_path / "awq", group_size=32)
    c = json.loads((awq / "config.json").read_text())
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
    shapes = [(h, (hq + 2 * hkv) * d), (hq * d, h), (h, 2 * i), (i, h)]
    dispatch.clear_cache()
    try:
        for K, N in shapes:
            dispatch.set_config(1, N, K, 32, torch.float16, {"kernel": "decode", "ROWS": True, "BLOCK_M": 1,
                                                             "BLOCK_J": 32, "DEPTH": 1, "num_warps": 1,
                                                             "split_k": K // 32, "TAIL": 0})
            for m in (2, 4, 8, 16):
                dispatch.set_config(m, N, K, 32, torch.float16, {"kernel": "swap", "BLOCK_M": 16, "BLOCK_N": 64,
                                                                 "num_warps": 4, "split_k": K // 32, "TAIL": 0})
        x = torch.randn(1, h, device="cuda", dtype=torch.float16)
        qw = torch.zeros(h, shapes[0][1] // 8, dtype=torch.int32, device="cuda")
        sc = torch.ones(h // 32, shapes[0][1], dtype=torch.float16, device="cuda")
        assert kernels.awq_linear_partials(x, qw, qw[: h // 32], sc, 32).shape == (h // 32, 1, shapes[0][1])
        outs = _graphs_equal_eager(awq, repack_weights=False)  # (on sm_90 the repacked kernels would run)
    finally:
        dispatch.clear_cache()
    assert _share_agreeing_with_reference(awq, outs) >= 0.6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_awq_engine_on_repacked_weights(tiny_model_factory, tmp_path, dtype):
    """bf16 or fp16 AWQ on an sm_90 GPU: the engine repacks every linear at load (one 4-D copy), its CUDA graphs
    decode what its eager path does, and its greedy tokens agree with the AutoAWQ-layout engine's (other kernels: a
    common prefix, as against the reference loader)."""
    import kernels
    from serving.layers.linear import Linear

    if not kernels.repacked_dispatch.supported(128, 128, 32, getattr(torch, dtype), "cuda"):
        pytest.skip("repacked kernels need an sm_90 GPU and Gluon")
    awq = make_awq_checkpoint(tiny_model_factory("qwen2"), tmp_path / "awq", group_size=32)
    g = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    ps = prompts([5, 21, 40], seed=1)
    eng = gpu_engine(awq, dtype=dtype)
    linears = [m for m in eng.runner.model.modules() if isinstance(m, Linear) and m.quant is not None]
    assert linears and all(m.qweight.dim() == 4 for m in linears)
    graphs = [o.token_ids for o in eng.generate(ps, g)]
    eager = [o.token_ids for o in gpu_engine(awq, dtype=dtype, enforce_eager=True).generate(ps, g)]
    assert graphs == eager
    plain = [o.token_ids for o in gpu_engine(awq, dtype=dtype, repack_weights=False).generate(ps, g)]
    same = sum(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(o)) for o, r in zip(graphs, plain))
    assert same / sum(map(len, graphs)) >= 0.6, (graphs, plain)
