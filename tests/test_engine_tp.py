"""Tensor parallelism on CPU (gloo): ranks built from shard specs give the tokens of the single-rank engine."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest

from tests.test_engine import make_awq_checkpoint, prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, path: str, ps, max_new: int, q, profile_dir=None) -> None:
    """Rank 0 runs the engine; the others follow its steps (what serving.tp_group does with Ray actors)."""
    import torch

    from serving import EngineConfig, GenerationConfig, LLMEngine
    from serving.config import ModelConfig
    from serving.engine.model_runner import ModelRunner
    from serving.layers.parallel import TPContext

    torch.set_num_threads(1)
    try:
        tp = TPContext.init(rank, world, f"tcp://127.0.0.1:{port}", "gloo", timeout_s=300)
        ecfg = EngineConfig(dtype="float32", block_size=8, progress=False, tp=world)
        if rank == 0:
            eng = LLMEngine(path, ecfg, tp=tp)
            if profile_dir:
                eng.start_profile(profile_dir)
            outs = eng.generate(ps, GenerationConfig(max_new_tokens=max_new))
            if profile_dir:
                eng.stop_profile()
            eng.runner.stop_followers()
            q.put((rank, [o.token_ids for o in outs], _shapes(eng.runner.model)))
        else:
            runner = ModelRunner(ModelConfig.from_path(path, "auto", "float32"), ecfg, model_path=path, tp=tp)
            runner.follow()
            q.put((rank, None, _shapes(runner.model)))
        tp.destroy()
    except Exception as e:  # report, do not hang the parent
        q.put((rank, repr(e), None))


def _shapes(model) -> tuple[int, int]:
    """(KV heads, LM-head rows) this rank holds."""
    return model.model.layers[0].self_attn.num_kv_heads, model.lm_head.out_local


def run_tp(path, world: int, ps, max_new: int = 12, profile_dir=None):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(path), ps, max_new, q, profile_dir))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict((r, (toks, kv)) for r, toks, kv in (q.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.mark.parametrize("world,awq,cfg", [(2, False, {}), (2, True, {}), (4, False, {}),
                                            (2, False, {"tie_word_embeddings": True}), (4, False, {"vocab_size": 510})])
def test_tensor_parallel_matches_single_rank(tiny_model_factory, tmp_path, world, awq, cfg):
    from serving import EngineConfig, GenerationConfig, LLMEngine

    path = tiny_model_factory("qwen2", **cfg)  # q/k/v biases: column-parallel bias shards too
    if awq:
        path = make_awq_checkpoint(path, tmp_path / "awq", group_size=32)
    ps = prompts([6, 19], seed=21)
    want = [o.token_ids for o in LLMEngine(path, EngineConfig(dtype="float32", block_size=8, progress=False))
            .generate(ps, GenerationConfig(max_new_tokens=12))]
    results = run_tp(path, world, ps)
    assert results[0][0] == want, results[0]
    vocab = cfg.get("vocab_size", 512)
    for rank in range(world):
        toks, shapes = results[rank]
        assert shapes is not None and (rank == 0 or toks is None), (rank, toks)  # a failed rank: its error
        kv_heads, head_rows = shapes
        assert kv_heads == (1 if world >= 2 else 2)  # 2 KV heads: split at tp=2, replicated at tp=4
        # the LM head splits by vocabulary where it divides (tied or not), else every rank holds all of it
        assert head_rows == (vocab // world if vocab % world == 0 else vocab), (rank, head_rows)


def test_profile_writes_a_trace_per_rank(tiny_model_factory, tmp_path):
    """start/stop_profile on rank 0 reaches the follower: both ranks write a trace of the same steps."""
    import gzip
    import json

    path = tiny_model_factory("llama")
    results = run_tp(path, 2, prompts([5], seed=3), max_new=4, profile_dir=str(tmp_path / "prof"))
    assert results[0][0] is not None and results[1][0] is None, results
    for rank in (0, 1):
        trace = json.loads(gzip.open(tmp_path / "prof" / f"rank{rank}.trace.json.gz").read())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert any(str(n).startswith("aten::") for n in names), sorted(map(str, names))[:20]
    assert not list((tmp_path / "prof").glob(".*tmp*"))


def _channel_rank(rank: int, world: int, port: int, path: str, msgs, q) -> None:
    from serving.engine import step_channel
    from serving.layers.parallel import TPContext

    try:
        step_channel.PAYLOAD_BYTES = 256  # so that some messages go through gloo
        tp = TPContext.init(rank, world, f"tcp://127.0.0.1:{port}", "gloo", timeout_s=120, channel=path)
        assert tp.channel is not None and tp.channel.capacity == 256
        got = [tp.broadcast_object(m if rank == 0 else None) for m in msgs]
        q.put((rank, got))
        tp.destroy()
    except Exception as e:
        q.put((rank, repr(e)))


def test_step_channel_delivers_in_order_to_every_rank_big_messages_through_gloo(tmp_path):
    """Rank 0's messages reach ranks 1 and 2 in order through shared memory; those over the payload area (256
    bytes here) are announced there and sent over gloo, without losing their place in the sequence."""
    from serving.engine import step_channel

    msgs = [("decode", list(range(i % 7))) for i in range(200)]
    msgs[5] = msgs[150] = ("execute", list(range(500)))  # pickled: ~1.5 KB, over the 256-byte slot
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    path = step_channel.StepChannel.new_path()
    port = _free_port()
    procs = [ctx.Process(target=_channel_rank, args=(r, 3, port, path, msgs, q)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    step_channel.unlink(path)
    assert all(results[r] == msgs for r in range(3)), {r: str(v)[:200] for r, v in results.items()}
