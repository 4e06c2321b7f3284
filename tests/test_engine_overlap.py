"""Async scheduling: decode step t+1 is queued before step t's tokens are read; outputs must not change."""

from __future__ import annotations

import pytest

from serving import GenerationConfig

from .test_engine import engine, prompts


class _CountLaunches:
    """Wraps the runner's two entry points to count which path each step took (the real methods run)."""

    def __init__(self, runner):
        self.sync = self.queued = self.fed = 0
        execute, launch = runner.execute, runner.launch_decode

        def counted_execute(*a, **kw):
            self.sync += 1
            return execute(*a, **kw)

        def counted_launch(b, sampling, feed=None):
            self.queued += 1
            self.fed += feed is not None
            return launch(b, sampling, feed)

        runner.execute, runner.launch_decode = counted_execute, counted_launch


def _mixed_params(stop_tok: int) -> list[GenerationConfig]:
    return [
        GenerationConfig(max_new_tokens=17, ignore_eos=True),
        GenerationConfig(max_new_tokens=30, ignore_eos=True, stop_token_ids=[stop_tok]),
        GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, random_seed=7, ignore_eos=True),
        GenerationConfig(max_new_tokens=9, min_new_tokens=6, ignore_eos=False),
        GenerationConfig(max_new_tokens=1, ignore_eos=True),
        GenerationConfig(max_new_tokens=20, temperature=1.0, random_seed=3, ignore_eos=True),
    ]


def test_overlapped_decode_gives_the_same_outputs(tiny_model_factory):
    path = tiny_model_factory("llama")
    ps = prompts([5, 19, 8, 11, 7, 13], seed=21)
    probe = engine(path, async_scheduling=False).generate([ps[1]], GenerationConfig(max_new_tokens=30,
                                                                                     ignore_eos=True))[0]
    params = _mixed_params(probe.token_ids[4])  # request 1 stops on its 5th token, mid-batch
    ref = engine(path, async_scheduling=False).generate(ps, params)
    eng = engine(path, block_size=4)
    count = _CountLaunches(eng.runner)
    out = eng.generate(ps, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    assert [o.finish_reason for o in out] == [o.finish_reason for o in ref]
    assert out[1].finish_reason == "stop" and len(out[1].token_ids) == 5
    assert count.fed > 10 and count.sync >= 1  # most decode steps were queued behind the previous one
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_overlap_stays_off_where_the_host_is_needed(tiny_model_factory):
    """Penalties over the output and logprobs need each token on the host before the next step."""
    path = tiny_model_factory("qwen2")
    p = prompts([9], seed=22)[0]
    for g in (GenerationConfig(max_new_tokens=8, repetition_penalty=1.3, ignore_eos=True),
              GenerationConfig(max_new_tokens=8, logprobs=2, ignore_eos=True),
              GenerationConfig(max_new_tokens=8, frequency_penalty=0.5, ignore_eos=True)):
        eng = engine(path)
        count = _CountLaunches(eng.runner)
        out = eng.generate([p], g)[0]
        assert count.queued == 0 and count.sync == 8
        assert out.token_ids == engine(path, async_scheduling=False).generate([p], g)[0].token_ids


def test_abort_while_a_step_is_queued(tiny_model_factory):
    path = tiny_model_factory("llama")
    eng = engine(path, block_size=4, num_kv_blocks=64)
    g = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    a, b = prompts([12, 9], seed=23)
    ra, rb = eng.add_request(a, g), eng.add_request(b, g)
    for _ in range(4):
        eng.step()
    assert eng._pending is not None  # a decode step is in flight
    assert eng.abort(ra)
    done = []
    while eng.has_unfinished():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == [rb]
    assert done[0].token_ids == engine(path, async_scheduling=False).generate([b], g)[0].token_ids
    assert eng.block_manager.num_free_blocks == 64
    # the step queued after the last token (its rows all finished) is drained by the next request
    assert eng.generate([a], GenerationConfig(max_new_tokens=5, ignore_eos=True))[0].token_ids == \
        engine(path, async_scheduling=False).generate([a], GenerationConfig(max_new_tokens=5,
                                                                             ignore_eos=True))[0].token_ids


@pytest.mark.parametrize("blocks", [9, 40])
def test_overlap_with_few_blocks_falls_back_to_the_scheduler(tiny_model_factory, blocks):
    """Out of blocks: no step is queued ahead; the scheduler preempts and the tokens stay the same."""
    path = tiny_model_factory("qwen2")
    ps = prompts([10, 12, 9], seed=24)
    g = GenerationConfig(max_new_tokens=14, ignore_eos=True)
    ref = [engine(path, async_scheduling=False, enable_prefix_caching=False).generate([p], g)[0].token_ids
           for p in ps]
    eng = engine(path, block_size=4, num_kv_blocks=blocks, enable_prefix_caching=False)
    assert [o.token_ids for o in eng.generate(ps, g)] == ref
    assert eng.block_manager.num_free_blocks == blocks
