"""Engine benchmark: Llama-3-8B shape with random weights, AWQ g128 vs the same engine in bf16 vs
transformers' ``generate`` in bf16.

    python benchmarks/engine.py --out DIR            # on a GPU: measures, writes DIR/engine_results.json + PNG
    python benchmarks/engine.py --report FILE.json   # writes the "engine" section of docs/benchmarks.md
    python benchmarks/engine.py --small --device cpu # a tiny config, to check the script itself

Measures: batch 1 (128-token prompt, 256 new tokens) decode tokens/s and ms/token; batch 32 and 128 output
tokens/s (same lengths, all requests submitted at once); TTFT of a 2048-token prompt; GPU memory.
Weights are random (speed does not depend on them) and made on the GPU directly.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
    rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
    eos_token_id=128001, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
SMALL = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def proj_shapes(c):
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # (out, in)


def awq_weights(c, group: int, device, dtype=torch.bfloat16):
    """Random AutoAWQ-layout tensors, one at a time, straight on the device."""
    g = torch.Generator(device=device).manual_seed(0)
    h, v = c["hidden_size"], c["vocab_size"]
    yield "model.embed_tokens.weight", torch.randn(v, h, device=device, dtype=dtype, generator=g) * 0.02
    yield "lm_head.weight", torch.randn(v, h, device=device, dtype=dtype, generator=g) * 0.02
    yield "model.norm.weight", torch.ones(h, device=device, dtype=dtype)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        yield f"{p}.input_layernorm.weight", torch.ones(h, device=device, dtype=dtype)
        yield f"{p}.post_attention_layernorm.weight", torch.ones(h, device=device, dtype=dtype)
        for name, (out, inp) in proj_shapes(c).items():
            mod = "self_attn" if name in PROJ[:4] else "mlp"
            base = f"{p}.{mod}.{name}"
            full = (-2**31, 2**31 - 1)
            yield f"{base}.qweight", torch.randint(*full, (inp, out // 8), device=device, dtype=torch.int32,
                                                   generator=g)
            yield f"{base}.qzeros", torch.randint(*full, (inp // group, out // 8), device=device,
                                                  dtype=torch.int32, generator=g)
            yield f"{base}.scales", (torch.rand(inp // group, out, device=device, generator=g) * 0.004).to(
                torch.float16)


def free_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def prompt_ids(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- transformers ----------------------------------------------------------------------------------------
def build_hf(c, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    cfg.pad_token_id = 0
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device.type == "cuda"
                                                 else torch.float32).eval()
    return model


@torch.inference_mode()
def bench_hf(model, c, device, new_tokens, batches, prompt_len, ttft_len):
    res = {}

    def gen(bs, plen, n):
        ids = torch.tensor(prompt_ids(bs, plen, c["vocab_size"], seed=bs), device=device)
        sync(device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    gen(1, 16, 4)  # warm-up
    t_prefill = gen(1, prompt_len, 1)
    t_total = gen(1, prompt_len, new_tokens)
    res["b1_tok_s"] = (new_tokens - 1) / (t_total - t_prefill)
    res["b1_ms_tok"] = 1000 / res["b1_tok_s"]
    res["b1_new_tokens"] = new_tokens
    for bs in batches:
        res[f"b{bs}_out_tok_s"] = bs * new_tokens / gen(bs, prompt_len, new_tokens)
    res["ttft_ms"] = 1000 * min(gen(1, ttft_len, 1) for _ in range(2))
    return res


# -- our engine ------------------------------------------------------------------------------------------
def build_engine(c, weights, device, max_seqs, fmt, tune=False, dtype: str = "bfloat16", repack: bool = True):
    from serving import EngineConfig, LLMEngine

    cfg = EngineConfig(model_format=fmt, dtype=dtype if device.type == "cuda" else "float32",
                       device=str(device), session_len=4096, max_num_seqs=max_seqs, max_num_batched_tokens=8192,
                       enable_prefix_caching=False, cache_max_entry_count=0.6, progress=False,
                       tune_kernels=tune, repack_weights=repack)
    t = time.perf_counter()
    eng = LLMEngine(hf_config=c, weights=weights, engine_config=cfg)
    sync(device)
    return eng, time.perf_counter() - t


def run_batch(eng, ids, new_tokens):
    """Submit all, step to the end; returns (wall s, first-token times per request, output tokens)."""
    from serving import GenerationConfig

    g = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    rids = [eng.add_request(p, g, stream=True) for p in ids]
    first, n_out = {}, 0
    while eng.has_unfinished():
        for o in eng.step():
            first.setdefault(o.request_id, time.perf_counter() - t0)
            if o.finished:
                n_out += len(o.token_ids)
    return time.perf_counter() - t0, [first[r] for r in rids], n_out


def bench_engine(eng, c, device, new_tokens, batches, prompt_len, ttft_len, diagnose: bool = True):
    """``diagnose``: also time the decode graph's parts (one rank replaying alone: not for tensor parallel)."""
    res = {}
    v = c["vocab_size"]
    run_batch(eng, prompt_ids(2, prompt_len, v, 99), 8)  # warm-up: compile prefill paths
    run_batch(eng, prompt_ids(1, ttft_len, v, 98), 2)
    wall, first, n = run_batch(eng, prompt_ids(1, prompt_len, v, 1), new_tokens)
    res["b1_tok_s"] = (n - 1) / (wall - first[0])
    res["b1_ms_tok"] = 1000 / res["b1_tok_s"]
    res["b1_new_tokens"] = new_tokens
    res["async_scheduling"] = eng.config.async_scheduling
    if eng.config.async_scheduling:  # the same request with each token read before the next step is queued
        eng.config.async_scheduling = False
        try:
            wall, first, n = run_batch(eng, prompt_ids(1, prompt_len, v, 1), new_tokens)
            res["b1_tok_s_sync"] = (n - 1) / (wall - first[0])
        finally:
            eng.config.async_scheduling = True
    for bs in batches:
        wall, _, n = run_batch(eng, prompt_ids(bs, prompt_len, v, bs), new_tokens)
        res[f"b{bs}_out_tok_s"] = n / wall
    res["ttft_ms"] = 1000 * min(run_batch(eng, prompt_ids(1, ttft_len, v, 7 + i), 1)[1][0] for i in range(3))
    if device.type == "cuda" and diagnose:
        try:  # a diagnostic: never lose the measurements above to it
            res.update(breakdown(eng))
        except Exception as e:
            res["breakdown_error"] = repr(e)[:300]
    r = eng.runner
    res["weights_gib"] = r.weight_bytes / 2**30
    res["kv_cache_gib"] = r.kv_cache.numel() * r.kv_cache.element_size() / 2**30
    res["graph_batch_sizes"] = sorted(r.graphs)
    res["preemptions"] = eng.scheduler.num_preemptions
    if device.type == "cuda":
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _replay_ms(graph, reps: int = 20) -> float:
    """GPU time of one replay of a captured CUDA graph (CUDA events around ``reps`` replays)."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _graph_ms(fn, reps: int = 20) -> float:
    """GPU time of ``fn`` captured as one CUDA graph (no Python, no launch gaps)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return _replay_ms(g, reps)


def step_kernels(graph, reps: int = 10) -> list[dict]:
    """The kernels of one replay of ``graph`` by GPU time (torch.profiler sees a graph's kernels one by one):
    name, launches per step, µs per step."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = e.cuda_time_total if us is None else us
        if us > 0:
            rows.append({"name": e.key[:90], "per_step": e.count / reps, "us_per_step": us / reps})
    return sorted(rows, key=lambda r: -r["us_per_step"])


@torch.inference_mode()
def breakdown(eng) -> dict:
    """Batch-1 decode step split: the whole captured step vs its linears alone vs the LM head."""
    from serving.layers.linear import Linear

    r = eng.runner
    model = r.model
    out = {}
    if r.cfg.quant is not None:
        try:
            import kernels

            h, i = r.cfg.hidden_size, r.cfg.intermediate_size
            g = r.cfg.quant.group_size
            # what the engine runs: the repacked table's kernel for linears repacked at load (4-D words), else
            # the AutoAWQ-layout dispatcher's
            repacked = {(m.in_local, m.out_local) for m in model.model.modules()
                        if isinstance(m, Linear) and m.quant is not None and m.qweight.dim() == 4}

            def chosen(m: int, k: int, n: int) -> str:
                if (k, n) in repacked:
                    return "repacked " + kernels.repacked_dispatch.select(m, n, k, g, r.cfg.dtype)["kernel"]
                return kernels.select_config(m, n, k, g, r.cfg.dtype, r.device)["kernel"]

            out["awq_kernel_by_m"] = {m: {f"{k}x{n}": chosen(m, k, n) for k, n in ((h, 2 * i), (i, h))}
                                      for m in (1, 32, 128, 2048)}
        except Exception as e:  # the dispatcher's API is the kernel engineer's to change
            out["awq_kernel_by_m"] = repr(e)
    lins = [m for m in model.model.modules() if isinstance(m, Linear)]
    x = {id(m): torch.randn(1, m.in_local, dtype=r.cfg.dtype, device=r.device) for m in lins}
    h = torch.randn(1, r.cfg.hidden_size, dtype=r.cfg.dtype, device=r.device)
    graph, _ = r.graphs[1]
    try:
        out["b1_step_kernels"] = step_kernels(graph)
    except Exception as e:  # a profiler that cannot see inside graphs must not cost the timings
        out["b1_step_kernels"] = repr(e)[:300]
    return {**out, "b1_step_graph_ms": _replay_ms(graph),
            "b1_linears_ms": _graph_ms(lambda: [m(x[id(m)]) for m in lins]),
            "b1_lm_head_ms": _graph_ms(lambda: model.compute_logits(h))}


def measure(args) -> dict:
    device = torch.device(args.device)
    c = SMALL if args.small else LLAMA3_8B
    new, plen, tlen = (16, 32, 128) if args.small else (args.new_tokens, 128, 2048)
    batches = [int(b) for b in args.batches.split(",")]
    from benchmarks._report import git_commit

    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "config": c,
           "commit": git_commit(),
           "torch": torch.__version__, "new_tokens": new, "prompt_len": plen, "ttft_prompt_len": tlen,
           "batches": batches}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        pass
    import transformers
    out["transformers"] = transformers.__version__
    import kernels
    out["awq_kernel"] = "triton" if hasattr(kernels, "select_config") else "torch reference"
    out["awq_tuned_in_process"] = args.tune

    def save():
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "engine_results.json").write_text(json.dumps(out, indent=1))

    hf = None if args.awq_only else build_hf(c, device)
    if args.awq_only:
        pass
    elif args.hf_from:  # transformers numbers of an earlier run on the same kind of card
        out["hf_bf16"] = json.loads(Path(args.hf_from).read_text())["hf_bf16"]
        out["hf_from"] = args.hf_from
    elif not args.skip_hf:
        out["hf_bf16"] = bench_hf(hf, c, device, args.hf_new_tokens if not args.small else new, batches, plen, tlen)
        print("hf", out["hf_bf16"], flush=True)
        save()
    if hf is not None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        eng, t_load = build_engine(c, iter(list(hf.state_dict().items())), device, max(batches), "hf")
        del hf
        free_cuda()
        out["engine_bf16"] = {"build_s": t_load, **bench_engine(eng, c, device, new, batches, plen, tlen)}
        print("engine bf16", out["engine_bf16"], flush=True)
        save()
        del eng
        free_cuda()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    c_awq = {**c, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": args.group,
                                          "zero_point": True, "version": "gemm"}}
    eng, t_load = build_engine(c_awq, awq_weights(c, args.group, device), device, max(batches), "awq",
                               tune=args.tune)
    out["engine_awq"] = {"build_s": t_load, **bench_engine(eng, c, device, new, batches, plen, tlen)}
    print("engine awq", out["engine_awq"], flush=True)
    save()
    if args.awq_fp16:  # fp16 activations (most AutoAWQ checkpoints): repacked, and the AutoAWQ layout beside it
        del eng
        free_cuda()
        for key, repack in (("engine_awq_fp16", True), ("engine_awq_fp16_autoawq", False)):
            eng, t_load = build_engine(c_awq, awq_weights(c, args.group, device, torch.float16), device,
                                       max(batches), "awq", tune=args.tune, dtype="float16", repack=repack)
            out[key] = {"build_s": t_load, **bench_engine(eng, c, device, new, batches, plen, tlen)}
            print(key, out[key], flush=True)
            save()
            del eng
            free_cuda()
    if args.out:
        try:
            plot(out, Path(args.out) / "engine.png")
        except ImportError as e:
            print(f"no plot: {e}", flush=True)
    return out


# -- report ----------------------------------------------------------------------------------------------
def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [("hf_bf16", "transformers bf16"), ("engine_bf16", "engine bf16"), ("engine_awq", "engine AWQ g128"),
               ("engine_awq_fp16", "engine AWQ fp16"), ("engine_awq_fp16_autoawq", "AWQ fp16, AutoAWQ layout")]
    systems = [(k, n) for k, n in systems if k in res]
    metrics = [("b1_tok_s", "batch 1 decode tok/s")] + [(f"b{b}_out_tok_s", f"batch {b} output tok/s")
                                                         for b in res["batches"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, (m, title) in zip(axes, metrics):
        vals = [res[k].get(m, 0) for k, _ in systems]
        bars = ax.bar([n for _, n in systems], vals, color=[COLORS[k] for k, _ in systems])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7, rotation=15)
    fig.suptitle(f"Llama-3-8B shape, random weights, {res['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


COLORS = {"hf_bf16": "#999999", "engine_bf16": "#4c72b0", "engine_awq": "#dd8452", "engine_awq_fp16": "#c44e52",
          "engine_awq_fp16_autoawq": "#e3b8a0"}  # one colour per system, whichever rows a run has
COPY_TBS = {"h100": 3.0, "h200": 4.3}  # device-to-device copy bandwidth measured on each card (read + write)


def report(res: dict, commit: str | None = None) -> str:
    import os

    from benchmarks._report import card_suffix, stamp

    if res.get("commit"):
        os.environ["RAYAWQ_COMMIT"] = res["commit"]

    rows = [("hf_bf16", "transformers `generate`, bf16"), ("engine_bf16", "engine, bf16"),
            ("engine_awq", "engine, AWQ 4-bit g128"), ("engine_awq_fp16", "engine, AWQ 4-bit g128, fp16"),
            ("engine_awq_fp16_autoawq", "engine, AWQ fp16, AutoAWQ layout (`repack_weights=False`)")]
    bs = res["batches"]
    head = "| system | batch 1 tok/s | ms/token | " + " | ".join(f"batch {b} out tok/s" for b in bs) + \
           " | TTFT 2048 (ms) | weights GiB | peak GiB |"
    tag = card_suffix(res["device"])
    card = tag[1:] or "h100"
    lines = ["## Inference engine (`benchmarks/engine.py`" + (f", {res['device']})" if tag else ")"), "",
             stamp(res["device"]), "",
             f"Llama-3-8B shape (random weights), prompt {res['prompt_len']} tokens, {res['new_tokens']} new "
             f"tokens per request (transformers: {res.get('hf_bf16', {}).get('b1_new_tokens', '-')}); "
             f"torch {res['torch']}, triton {res.get('triton', '-')}, transformers {res['transformers']}; "
             f"W4A16 linears: {res['awq_kernel']}"
             + (" (configs missing from kernels/' table autotuned at load)" if res.get("awq_tuned_in_process") else "")
             + ". Decode runs under CUDA graphs."
             + (" The transformers row is from an earlier run on the same card type "
                f"(`{res['hf_from']}`)." if res.get("hf_from") else ""), "", head,
             "|" + "---|" * (6 + len(bs))]
    for k, name in rows:
        r = res.get(k)
        if not r:
            continue
        cells = [f"{r['b1_tok_s']:.0f}", f"{r['b1_ms_tok']:.2f}"] + [f"{r.get(f'b{b}_out_tok_s', 0):.0f}"
                                                                     for b in bs]
        cells += [f"{r['ttft_ms']:.0f}", f"{r['weights_gib']:.1f}" if "weights_gib" in r else "-",
                  f"{r['peak_allocated_gib']:.1f}" if "peak_allocated_gib" in r else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    a, b = res.get("engine_awq", {}), res.get("engine_bf16", {})
    if a and b:
        t1 = "met" if a["b1_tok_s"] >= 250 else "**not met**"
        t2 = "met" if a["b1_tok_s"] >= 2 * b["b1_tok_s"] else "**not met**"
        big = max(bs)
        t3 = "met" if a.get(f"b{big}_out_tok_s", 0) >= 5000 else "**not met**"
        lines += ["", "Targets: batch 1 AWQ ≥ 250 tok/s: " + f"{a['b1_tok_s']:.0f} ({t1}); AWQ ≥ 2× engine bf16: "
                  f"{_ratio_text(a['b1_tok_s'] / b['b1_tok_s'], 2.0)}× ({t2}); batch {big} AWQ ≥ 5,000 out tok/s: "
                  f"{a.get(f'b{big}_out_tok_s', 0):.0f} ({t3}). Published H100 batch-1 AWQ figures: Marlin in vLLM ≈ 193, "
                  "GemLite ≈ 222, PyTorch int4 ≈ 280, memory roofline ≈ 590.", ""]
    for k, name in rows[1:]:
        r = res.get(k, {})
        if "weights_gib" in r:
            lines.append(f"- {name}: weights {r['weights_gib']:.1f} GiB read per decode step at batch 1 in "
                         f"{r['b1_ms_tok']:.2f} ms: {r['weights_gib'] * 2**30 / r['b1_ms_tok'] / 1e9:.2f} TB/s "
                         f"effective ({res['device']} copy bandwidth ≈ {COPY_TBS.get(card, 3.0):.1f} TB/s).")
        if "b1_step_graph_ms" in r:
            rest = r["b1_step_graph_ms"] - r["b1_linears_ms"]
            lines.append(f"  Batch-1 step on the GPU (CUDA graph replay, no Python): {r['b1_step_graph_ms']:.2f} ms, of "
                         f"which decoder linears {r['b1_linears_ms']:.2f} ms, everything else (norms, RoPE, "
                         f"attention, activations) {rest:.2f} ms; LM head + sampling outside the graph "
                         f"(LM head alone {r['b1_lm_head_ms']:.2f} ms); the rest of the "
                         f"{r['b1_ms_tok']:.2f} ms/token is host time not hidden behind the GPU.")
        if "b1_tok_s_sync" in r:
            lines.append(f"  Async scheduling on (step t+1 queued before step t's tokens are read); the same batch-1 "
                         f"request with it off: {r['b1_tok_s_sync']:.0f} tok/s "
                         f"({1000 / r['b1_tok_s_sync']:.2f} ms/token).")
        if isinstance(r.get("awq_kernel_by_m"), dict):
            lines.append("  W4A16 kernel chosen by kernels/ per M (gate_up, down): " + "; ".join(
                f"M={m}: {', '.join(v.values())}" for m, v in r["awq_kernel_by_m"].items()))
    if res.get("note"):
        lines += ["", res["note"]]
    lines += ["", f"![engine benchmark](engine{tag}.png)", "",
              f"Raw numbers: `docs/engine_results_{card}.json`. Reproduce: `python benchmarks/engine.py --out /tmp/bench"
              f"{' --awq-fp16' if 'engine_awq_fp16' in res else ''}` "
              f"on one {card.upper()}, then `python benchmarks/engine.py --report /tmp/bench/engine_results.json`."]
    return "\n".join(lines)


def _ratio_text(ratio: float, target: float) -> str:
    """A ratio to two decimals, or three where two would round a miss up to the target (1.995 -> '1.995', not
    '2.00' beside "not met")."""
    return f"{ratio:.3f}" if ratio < target <= round(ratio, 2) else f"{ratio:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--report", default=None, help="results JSON: write the docs section from it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny config (checks the script, not speed)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--awq-only", action="store_true", help="only the AWQ engine (a quick look, not a report)")
    p.add_argument("--hf-from", default=None, help="take the transformers row from an earlier results JSON")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--hf-new-tokens", type=int, default=64, help="transformers is slow: fewer tokens")
    p.add_argument("--batches", default="32,128")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--note", default=None, help="with --report: a paragraph added to the section")
    p.add_argument("--tune", action="store_true", help="autotune W4A16 shapes missing from kernels/' table")
    p.add_argument("--awq-fp16", action="store_true",
                   help="also the AWQ engine on fp16 activations, repacked and in the AutoAWQ layout")
    args = p.parse_args(argv)
    if args.report:
        from benchmarks._report import card_suffix, write_section

        res = json.loads(Path(args.report).read_text())
        if args.note:
            res["note"] = args.note
        write_section("engine" + card_suffix(res["device"]), report(res))
        return 0
    res = measure(args)
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
