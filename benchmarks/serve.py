"""Serving benchmark: the Ray Serve OpenAI server against the engine called in process, same model, same load.

    python benchmarks/serve.py --out DIR           # on a GPU (Llama-3-8B shape, random AWQ weights):
                                                   #   DIR/serve_results.json, DIR/serve.md, docs section
    python benchmarks/serve.py --report FILE.json  # writes the "serve" section of docs/benchmarks.md
    python benchmarks/serve.py --small --device cpu --out /tmp/s   # a tiny model, to check the script

Load (like ``vllm bench serve``, closed loop): random ``--prompt-len``-token prompts (token ids, so no
tokenizer is involved), ``--output-len`` new tokens each (``ignore_eos``), at each concurrency of
``--concurrency`` a fixed number of clients each sending its next request when the last one finished.
Per level: TTFT p50/p99, TPOT p50 ((latency - TTFT) / (tokens - 1)), ITL p50, output tokens/s, requests/s,
failures. Two paths on one machine, one after the other:

* ``engine``: ``AsyncEngine.generate`` in this process (what the Serve replica runs, minus Ray and HTTP);
* ``serve``:  HTTP ``POST /v1/completions`` with ``stream: true`` through the Serve proxy, the ingress and the
  engine deployment (``serving.app.run_local``), read with aiohttp.

The model is written once to ``--model-dir`` (random weights; speed does not depend on values).
On the GPU machine, Ray comes from the device bundle: ``source .devbundle/setup.sh && python3 benchmarks/serve.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- the model -------------------------------------------------------------------------------------------
def write_model(path: Path, small: bool, group: int) -> Path:
    """A random-weight AWQ checkpoint (Llama-3-8B shape, or the small one) without a tokenizer."""
    import torch
    from safetensors.torch import save_file

    from benchmarks.engine import LLAMA3_8B, SMALL, awq_weights

    c = dict(SMALL if small else LLAMA3_8B)
    if small:
        c["max_position_embeddings"] = 4096
    cfg = {**c, "torch_dtype": "float16",
           "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                   "version": "gemm", "modules_to_not_convert": []}}
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()) == cfg:
        return path
    path.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shard, size, n, names = {}, 0, 0, {}
    files = []

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            files.append(name)
            for k in shard:
                names[k] = name
            shard, size, n = {}, 0, n + 1

    for k, t in awq_weights(c, group, dev, dtype=torch.float16):
        shard[k] = t.cpu().contiguous()
        size += t.numel() * t.element_size()
        if size > 2 << 30:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


# -- load generators -------------------------------------------------------------------------------------
class Result:
    def __init__(self):
        self.ttft, self.latency, self.itl, self.tokens, self.ok, self.error = None, None, [], 0, False, None
        self.chunks = 0  # streamed messages that carried output (several tokens each when coalesced)
        self._last: float | None = None

    def chunk(self, now: float, t0: float) -> None:
        """A streamed message with output arrived at ``now`` (request sent at ``t0``): TTFT, then gaps."""
        self.chunks += 1
        if self.ttft is None:
            self.ttft = now - t0
        elif self._last is not None:
            self.itl.append(now - self._last)
        self._last = now


async def closed_loop(send, reqs: list, concurrency: int) -> tuple[list[Result], float]:
    """``concurrency`` clients; each takes the next prompt when its last request finished."""
    it = iter(range(len(reqs)))
    results: list[Result] = [None] * len(reqs)  # type: ignore[list-item]

    async def client():
        for i in it:
            r = Result()
            try:
                await send(reqs[i], r)
            except Exception as e:  # counted as a failure, the run goes on
                r.ok, r.error = False, f"{type(e).__name__}: {e}"
            results[i] = r

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - t


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    q = lambda xs, p: (statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else  # noqa
                       (xs[0] if xs else float("nan")))
    ttft = sorted(r.ttft for r in ok)
    tpot = sorted((r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1)
    itl = sorted(x for r in ok for x in r.itl)
    out_tokens = sum(r.tokens for r in ok)
    errors = sorted({r.error for r in results if not r.ok})
    chunks = sum(r.chunks for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
            "ttft_p50_ms": 1e3 * q(ttft, 50), "ttft_p99_ms": 1e3 * q(ttft, 99),
            "tpot_p50_ms": 1e3 * q(tpot, 50), "itl_p50_ms": 1e3 * q(itl, 50),
            "output_tok_s": out_tokens / wall, "req_s": len(ok) / wall,
            "tokens_per_chunk": out_tokens / chunks if chunks else float("nan"), "errors": errors[:3]}


def engine_sender(ae, output_len: int):
    from serving.sampling_params import GenerationConfig

    g = GenerationConfig(max_new_tokens=output_len, ignore_eos=True, temperature=0.0)

    async def send(ids, r: Result):
        t0 = time.perf_counter()
        async for out in ae.generate(ids, g):
            now = time.perf_counter()
            if out.new_token_ids:
                r.chunk(now, t0)
            if out.finished:
                r.tokens = len(out.token_ids)
                r.ok = out.finish_reason == "length" and r.tokens == output_len
                if not r.ok:
                    r.error = f"finish {out.finish_reason}: {out.error}"
        r.latency = time.perf_counter() - t0

    return send


def http_sender(session, url: str, model: str, output_len: int):
    async def send(ids, r: Result):
        body = {"model": model, "prompt": ids, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            buf = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                buf += data
                while b"\n\n" in buf:
                    line, buf = buf.split(b"\n\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    obj = json.loads(payload)
                    if "error" in obj:
                        r.error = obj["error"]["message"]
                        return
                    if obj.get("usage"):
                        r.tokens = obj["usage"]["completion_tokens"]
                    if obj.get("choices") and obj["choices"][0].get("finish_reason") is None:
                        r.chunk(now, t0)
        r.latency = time.perf_counter() - t0
        r.ok = r.tokens == output_len and r.ttft is not None
        if not r.ok and r.error is None:
            r.error = f"{r.tokens} tokens"

    return send


# -- the two paths ---------------------------------------------------------------------------------------
def levels_plan(args) -> list[tuple[int, int]]:
    return [(c, max(args.min_requests, args.requests_per_client * c)) for c in args.concurrency]


def bench_engine(model: Path, args, vocab: int) -> dict:
    from serving import LLMEngine
    from serving.engine.async_engine import AsyncEngine

    eng = LLMEngine(model, engine_config(args))
    ae = AsyncEngine(eng)
    res = {}
    try:
        send = engine_sender(ae, args.output_len)
        asyncio.run(closed_loop(send, prompts(4, args.prompt_len, vocab, 99), 4))  # warm-up
        for c, n in levels_plan(args):
            results, wall = asyncio.run(closed_loop(send, prompts(n, args.prompt_len, vocab, c), c))
            res[str(c)] = summarize(results, wall)
            print("engine", c, res[str(c)], flush=True)
    finally:
        ae.shutdown()
        del ae, eng
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
    return res


def engine_config(args):
    from serving import EngineConfig

    return EngineConfig(device=args.device, max_num_seqs=max(args.concurrency), progress=False,
                        cache_max_entry_count=args.cache_max_entry_count,
                        session_len=args.prompt_len + args.output_len + 16)


def bench_serve(model: Path, args, vocab: int) -> dict:
    import aiohttp

    from serving.app import run_local

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    cfg = engine_config(args)
    server = run_local(model, port=args.port, name="bench", device=cfg.device,
                       max_batch_size=cfg.max_num_seqs, cache_max_entry_count=cfg.cache_max_entry_count,
                       session_len=cfg.session_len, num_cpus=1 if not args.small else 0.5,
                       stream_messages_per_s=args.stream_messages_per_s,
                       ready_timeout_s=1800)
    url = server.base_url + "/completions"
    res = {}

    async def run(c, reqs):
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=3600)) as s:
            return await closed_loop(http_sender(s, url, "bench", args.output_len), reqs, c)

    try:
        asyncio.run(run(4, prompts(4, args.prompt_len, vocab, 99)))  # warm-up
        for c, n in levels_plan(args):
            results, wall = asyncio.run(run(c, prompts(n, args.prompt_len, vocab, c)))
            res[str(c)] = summarize(results, wall)
            print("serve", c, res[str(c)], flush=True)
    finally:
        server.shutdown()
    return res


# -- report ----------------------------------------------------------------------------------------------
def report(res: dict) -> str:
    from benchmarks._report import stamp

    lines = ["## OpenAI server over Ray Serve (`benchmarks/serve.py`)", "", stamp(res["device"]), "",
             f"Model: {res['model']}, random AWQ weights. Load: random {res['prompt_len']}-token prompts, "
             f"{res['output_len']} output tokens (ignore_eos), closed loop at each concurrency. `engine`: "
             "`AsyncEngine.generate` in process; `serve`: streaming `POST /v1/completions` through the Ray Serve "
             "proxy, the OpenAI ingress and the engine deployment (one replica).", "",
             "| path | concurrency | requests | failed | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms "
             "| output tok/s | req/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in res["concurrency"]:
        for path in ("engine", "serve"):
            r = res.get(path, {}).get(str(c))
            if r:
                lines.append(f"| {path} | {c} | {r['requests']} | {r['failed']} | {r['ttft_p50_ms']:.1f} | "
                             f"{r['ttft_p99_ms']:.1f} | {r['tpot_p50_ms']:.2f} | {r['itl_p50_ms']:.2f} | "
                             f"{r['output_tok_s']:.0f} | {r['req_s']:.2f} |")
    e, s = res.get("engine", {}).get("64"), res.get("serve", {}).get("64")
    if e and s:
        tpot = 100 * (s["tpot_p50_ms"] / e["tpot_p50_ms"] - 1)
        tput = 100 * (1 - s["output_tok_s"] / e["output_tok_s"])
        lines += ["", f"At concurrency 64 Serve adds {tpot:+.1f}% to TPOT p50 (target ≤ 10%) and costs "
                      f"{tput:.1f}% of output tokens/s (target ≤ 10%)."]
    s256 = res.get("serve", {}).get("256")
    if s256:
        lines.append(f"Failed requests at concurrency 256 through Serve: {s256['failed']} (target 0).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for serve_results.json and serve.md")
    p.add_argument("--report", default=None, help="write the docs section from this results JSON and exit")
    p.add_argument("--small", action="store_true", help="a tiny model and light load (checks the script)")
    p.add_argument("--device", default=None)
    p.add_argument("--model-dir", default=None, help="where the random model is written (default under /tmp)")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--cache-max-entry-count", type=float, default=0.8)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--stream-messages-per-s", type=float, default=1000.0,
                   help="the engine replica's message budget (ModelConfig.stream_messages_per_s; 0: per token)")
    p.add_argument("--paths", nargs="+", default=["engine", "serve"], choices=["engine", "serve"])
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.report:
        from benchmarks._report import write_section

        write_section("serve", report(json.loads(Path(args.report).read_text())))
        return 0
    if args.small:
        if args.prompt_len == 512:
            args.prompt_len, args.output_len = 64, 16
        if args.concurrency == [1, 16, 64, 256]:
            args.concurrency = [1, 8]
        args.requests_per_client, args.min_requests = 2, 4
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    model_dir = Path(args.model_dir or f"/tmp/rayawq-bench/{'small' if args.small else 'llama3-8b'}-awq")
    t = time.perf_counter()
    model = write_model(model_dir, args.small, args.group if not args.small else 64)
    print(f"model at {model} ({time.perf_counter() - t:.0f} s)", flush=True)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    res = {"device": device_name, "model": "small test shape" if args.small else "Llama-3-8B shape, AWQ g128",
           "prompt_len": args.prompt_len, "output_len": args.output_len, "concurrency": args.concurrency}
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def save():
        if out:
            (out / "serve_results.json").write_text(json.dumps(res, indent=1))

    for path in args.paths:
        res[path] = (bench_engine if path == "engine" else bench_serve)(model, args, vocab)
        save()
    md = report(res)
    print(md)
    if out:
        (out / "serve.md").write_text(md)
    if not args.no_docs:
        from benchmarks._report import write_section

        write_section("serve", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
