"""Tensor parallelism over Ray actors on CPU (gloo): this process is rank 0, the other ranks are TPWorker actors."""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from serving import EngineConfig, GenerationConfig, LLMEngine  # noqa: E402
from serving.openai.engine_server import EngineServer  # noqa: E402
from serving.pipeline import pipeline  # noqa: E402
from serving.tp_group import start_tp_engine  # noqa: E402
from tests.test_engine import make_awq_checkpoint, prompts  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _all_cpus_free(timeout_s: float = 60.0) -> bool:
    """Placement groups and actors are released asynchronously: wait for the cluster's CPUs to come back."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.5)
    return False


def _cfg(**kw) -> EngineConfig:
    return EngineConfig(dtype="float32", block_size=8, progress=False, **kw)


def test_ray_ranks_give_the_single_rank_tokens(cluster, tiny_model_factory, tmp_path):
    path = make_awq_checkpoint(tiny_model_factory("qwen2"), tmp_path / "awq", group_size=32)
    ps = prompts([5, 17, 9], seed=3)
    greedy = GenerationConfig(max_new_tokens=10)
    sampled = GenerationConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, random_seed=7)
    single = LLMEngine(path, _cfg())
    want = [[o.token_ids for o in single.generate(ps, g)] for g in (greedy, sampled)]

    engine = start_tp_engine(path, _cfg(tp=2))
    try:
        workers = engine.followers.workers
        assert len(workers) == 1
        channel = engine.runner.tp.channel  # one node: steps through shared memory, its file already unlinked
        assert channel is not None and not os.path.exists(channel.path)
        got = [[o.token_ids for o in engine.generate(ps, g)] for g in (greedy, sampled)]
        assert got == want
        # unseeded sampling: rank 0 draws, the follower takes its tokens; the engine keeps going afterwards
        outs = engine.generate(ps, GenerationConfig(max_new_tokens=6, temperature=1.0))
        assert all(len(o.token_ids) == 6 for o in outs)
        assert [o.token_ids for o in engine.generate(ps, greedy)] == want[0]
    finally:
        engine.close()
    assert engine.followers is None and _all_cpus_free()
    with pytest.raises(Exception):  # the follower's actor is gone
        ray.get(workers[0].build.remote("x", _cfg(tp=2), "tcp://127.0.0.1:1", "gloo"), timeout=30)


def test_a_model_that_does_not_split_fails_clearly_and_frees_the_ranks(cluster, tiny_model_factory):
    path = tiny_model_factory("qwen2")
    heads = LLMEngine(path, _cfg()).model_config.num_heads
    tp = next(t for t in (3, 5, 7) if heads % t)
    with pytest.raises(Exception, match="does not divide over tp"):
        start_tp_engine(path, _cfg(tp=tp), ready_timeout_s=30)
    assert _all_cpus_free()


def test_closing_with_a_dead_rank_returns_and_frees_the_cluster(cluster, tiny_model_factory):
    """A follower that died (out of memory, a lost node) must not hang rank 0's close(): the stop message
    times out, the rest of the teardown goes on."""
    engine = start_tp_engine(tiny_model_factory("qwen2"), _cfg(tp=2))
    assert [o.finished for o in engine.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=2))] == [True]
    followers = engine.followers
    assert followers.dead() is None
    ray.kill(followers.workers[0])
    deadline = time.monotonic() + 30  # the health check sees it before any step does (on GPU none would fail)
    while followers.dead() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "rank 1 died" in (followers.dead() or ""), followers.dead()
    # the next step reaches nobody: its collective fails (gloo sees the peer gone), the request ends in error
    out = engine.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=2))[0]
    assert out.finish_reason == "error" and out.error
    server = EngineServer(engine, "tiny")
    with pytest.raises(RuntimeError, match="rank 1 died"):
        server.healthy(stuck_after_s=300)  # a Serve replica reports this and is replaced
    start = time.monotonic()
    server.shutdown()  # the stop message finds the last step message never taken: it times out instead of hanging
    assert time.monotonic() - start < 60
    assert engine.followers is None and _all_cpus_free()


def test_tp_needs_ray_and_two_ranks(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    with pytest.raises(ValueError, match="tp >= 2"):
        start_tp_engine(path, _cfg(tp=1))


def test_pipeline_with_tp_runs_every_rank_as_a_ray_actor(cluster, tiny_model_factory):
    """``pipeline(model, EngineConfig(tp=2))`` from a plain process: rank 0 is an actor too (on GPU a driver holds
    no Ray GPU), and generate / stream_infer / get_ppl give what one rank gives."""
    path = tiny_model_factory("qwen2")
    g = GenerationConfig(max_new_tokens=8)
    texts = ["the city of", "a river runs"]
    single = pipeline(str(path), _cfg())
    want = single(texts, g, do_preprocess=False)
    want_nll = single.get_ppl([3, 14, 15, 92, 65, 35])
    with pipeline(str(path), _cfg(tp=2)) as pipe:
        assert ray.available_resources().get("CPU", 0) == 0  # both bundles taken: rank 0 and rank 1
        got = pipe(texts, g, do_preprocess=False)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        pieces = list(pipe.stream_infer(texts[0], g, do_preprocess=False))
        assert "".join(p.text for p in pieces) == want[0].text and pieces[-1].finish_reason == want[0].finish_reason
        assert pipe.get_ppl([3, 14, 15, 92, 65, 35]) == pytest.approx(want_nll, abs=1e-4)
        # leaving a stream early cancels its requests on rank 0 before the next call (one streaming actor call,
        # not one per step; 200 tokens are far from done after three pieces)
        long = GenerationConfig(max_new_tokens=200, ignore_eos=True)
        for n, _ in enumerate(pipe.stream_infer(texts, long, do_preprocess=False)):
            if n == 2:
                break
        assert not pipe.engine.has_unfinished()
        assert [r.token_ids for r in pipe(texts, g, do_preprocess=False)] == [r.token_ids for r in want]
    assert _all_cpus_free() and ray.is_initialized()  # the caller's Ray stays up
    with pytest.raises(RuntimeError, match="closed"):
        pipe("again", g)


def test_pipeline_with_more_ranks_than_the_cluster_holds_fails_clearly(cluster, tiny_model_factory):
    with pytest.raises(RuntimeError, match=r"tp=3 needs .* lower tp or add resources"):
        pipeline(str(tiny_model_factory("qwen2")), _cfg(tp=3))
    assert _all_cpus_free()


def test_pipeline_with_a_lost_rank_closes_instead_of_waiting(cluster, tiny_model_factory):
    """On GPU a step whose peer rank died waits in NCCL for good; a ``RemoteEngine`` call that waits checks the
    ranks and, one being gone, closes the engine and raises instead (here every wait is checked at once)."""
    pipe = pipeline(str(tiny_model_factory("qwen2")), _cfg(tp=2))
    engine = pipe.engine
    assert engine.followers.dead() is None
    ray.kill(engine.followers.workers[0])
    deadline = time.monotonic() + 30
    while engine.followers.dead() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    engine.watch_s = 0.0
    with pytest.raises(RuntimeError, match="rank 1 died.*engine is closed"):
        pipe("the city of", GenerationConfig(max_new_tokens=4))
    assert engine.host is None and _all_cpus_free()
