"""The background-thread engine: concurrent streams from threads and asyncio, cancellation, errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving import EngineConfig, GenerationConfig, InvalidRequestError, LLMEngine
from serving.engine.async_engine import AsyncEngine
from tests.test_engine import prompts


def test_async_engine_streams_cancels_and_refuses(tiny_model_factory):
    path = tiny_model_factory("llama")
    eng = LLMEngine(path, EngineConfig(dtype="float32", block_size=8, progress=False))
    ps = prompts([5, 17, 9], seed=30)
    g = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    want = [o.token_ids for o in eng.generate(ps, g)]
    ae = AsyncEngine(eng)
    try:
        got = {}

        def worker(i):
            outs = list(ae.stream(ps[i], g))
            got[i] = outs[-1].token_ids

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()

        async def consume():
            toks = []
            async for o in ae.generate(ps[2], g):
                toks += o.new_token_ids
            return toks

        got[2] = asyncio.run(consume())
        for t in threads:
            t.join(timeout=60)
        assert [got[i] for i in range(3)] == want

        async def cancel_early():
            async for o in ae.generate(ps[0], GenerationConfig(max_new_tokens=400, ignore_eos=True)):
                if len(o.token_ids) >= 3:
                    break  # leaving the loop cancels the request

        asyncio.run(cancel_early())
        with pytest.raises(InvalidRequestError):
            ae.submit([5, 6], GenerationConfig(top_p=2.0))
        for _ in range(100):  # the abort is processed by the loop thread
            if not eng.has_unfinished():
                break
            threading.Event().wait(0.05)
        assert not eng.has_unfinished()
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    finally:
        ae.shutdown()


def test_engine_stream_yields_steps_and_cancels_between_them(tiny_model_factory):
    """``LLMEngine.stream`` (what ``pipeline.stream_infer`` and a tp=N rank 0 host run): each step's outputs
    tagged with their prompt's index, the same tokens as ``generate``; a request aborted between two steps
    leaves the stream; closing the iterator aborts the rest."""
    eng = LLMEngine(tiny_model_factory("llama"), EngineConfig(dtype="float32", block_size=8, progress=False))
    ps = prompts([5, 9], seed=4)
    g = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in eng.generate(ps, g)]
    got: dict[int, list[int]] = {0: [], 1: []}
    for step in eng.stream(ps, g, request_ids=["a", "b"]):
        for i, out in step:
            got[i] += out.new_token_ids
    assert [got[0], got[1]] == want
    seen: dict[int, int] = {0: 0, 1: 0}
    for step in eng.stream(ps, g, request_ids=["c", "d"]):
        for i, out in step:
            seen[i] += len(out.new_token_ids)
        if seen[1] >= 2 and "d" in eng.requests:
            eng.abort("d")  # as a tp=N host's cancel does, between two steps
    assert seen[0] == 12 and 2 <= seen[1] < 12 and not eng.has_unfinished()
    steps = eng.stream(ps, g)
    next(steps)
    steps.close()
    assert not eng.has_unfinished()
