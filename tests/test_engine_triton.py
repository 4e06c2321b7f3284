"""The engine's Triton kernels (paged attention, RoPE + cache store, RMSNorm, SiLU-mul) checked on CPU
through Triton's interpreter (``TRITON_INTERPRET=1``, set in a subprocess before triton is imported)
against the torch paths; on a GPU the same checks run natively (tests/gpu/test_engine_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def check_kernels(device: str = "cpu", dtype=torch.float32, atol: float = 1e-4) -> None:
    from serving.layers import triton_attention as ta
    from serving.layers.activation import silu_and_mul
    from serving.layers.attention import PagedAttention
    from serving.layers.context import AttentionContext, set_context
    from serving.layers.norm import rms_norm
    from serving.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    for hq, hkv, d, page in [(9, 3, 64, 4), (4, 2, 32, 16), (8, 8, 128, 64)]:
        rot = RotaryEmbedding(d, 256, 10000.0, None).to(device)
        nblocks = 64
        # three sequences: a fresh prefill, a chunk after 13 cached tokens, a decode after 40
        q_lens, ctx_lens = [7, 5, 1], [0, 13, 40]
        tables, nxt = [], 1
        for ql, cl in zip(q_lens, ctx_lens):
            n = -(-(ql + cl) // page)
            tables.append(list(range(nxt, nxt + n)))
            nxt += n
        width = max(map(len, tables))
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
        T = sum(q_lens)
        q, k, v = rnd(T, hq, d), rnd(T, hkv, d), rnd(T, hkv, d)
        pos = torch.cat([torch.arange(c, c + ql) for ql, c in zip(q_lens, ctx_lens)]).to(device)
        slots = torch.cat([torch.tensor([tables[i][p // page] * page + p % page for p in range(c, c + ql)])
                           for i, (ql, c) in enumerate(zip(q_lens, ctx_lens))]).to(device)
        cu = torch.tensor([0, 7, 12, 13], dtype=torch.int32, device=device)
        kv_lens = torch.tensor([ql + c for ql, c in zip(q_lens, ctx_lens)], dtype=torch.int32, device=device)
        kc0, vc0 = rnd(nblocks, page, hkv, d), rnd(nblocks, page, hkv, d)
        ctx = AttentionContext(slots, cu, kv_lens, bt, max(q_lens), cu.tolist(), kv_lens.tolist())
        set_context(ctx)
        # torch path
        ref = PagedAttention(hq, hkv, d, rot)
        ref.k_cache, ref.v_cache = kc0.clone(), vc0.clone()
        qr, kr = rot(pos, q, k)
        ref._store(kr, v, slots)
        want = ref._attend(qr, ctx)
        # triton path
        qt, kt = q.clone(), k.clone()
        kc, vc = kc0.clone(), vc0.clone()
        ta.rope_and_store(qt, kt, v, pos, rot.cos_sin, kc, vc, slots)
        assert torch.allclose(qt, qr, atol=atol) and torch.allclose(kc, ref.k_cache, atol=atol)
        assert torch.equal(vc, ref.v_cache)
        # the same from the QKV layer's split-K partials (fp32, 5 splits, bias added in the kernel); the last
        # token's slot is -1 (a padded graph row: nothing written)
        n_qkv = (hq + 2 * hkv) * d
        ws = torch.randn(5, T, n_qkv, generator=g).to(device)
        bias = rnd(n_qkv)
        y = (ws.sum(0) + bias.float()).to(dtype)
        qp, kp, vp = (t.reshape(T, -1, d).clone() for t in y.split([hq * d, hkv * d, hkv * d], dim=-1))
        pad_slots = slots.clone()
        pad_slots[-1] = -1
        kc1, vc1, kc2, vc2 = kc0.clone(), vc0.clone(), kc0.clone(), vc0.clone()
        ta.rope_and_store(qp, kp, vp, pos, rot.cos_sin, kc1, vc1, pad_slots)
        qf = ta.rope_and_store_partials(ws, bias, pos, rot.cos_sin, kc2, vc2, pad_slots, hq, dtype)
        assert qf.shape == (T, hq, d) and torch.allclose(qf, qp, atol=atol, rtol=1e-2)
        assert torch.allclose(kc2, kc1, atol=atol, rtol=1e-2) and torch.allclose(vc2, vc1, atol=atol, rtol=1e-2)
        blk, off = divmod(int(slots[-1]), page)  # the padded row's slot kept what was there
        assert torch.equal(kc2[blk, off], kc0[blk, off]) and torch.equal(vc2[blk, off], vc0[blk, off])
        got = ta.paged_attention(qt, kc, vc, bt, cu, kv_lens, max(q_lens), d ** -0.5)
        assert torch.allclose(got, want, atol=atol * 10, rtol=1e-3), (hq, hkv, d, (got - want).abs().max())
        # decode-only grid (what CUDA graphs capture) on the decode row alone
        one = ta.paged_attention(qt[12:], kc, vc, bt[2:], torch.tensor([0, 1], dtype=torch.int32, device=device),
                                 kv_lens[2:], 1, d ** -0.5)
        assert torch.allclose(one, want[12:], atol=atol * 10, rtol=1e-3)
        # the KV range split 1, 2 and 8 ways (8: more splits than 64-token chunks, so some are empty), and a
        # padded graph row (kv length 0: zeros, not NaN)
        cu2 = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
        for sp in (1, 2, 8):
            two = ta.paged_attention(torch.cat([qt[12:], qt[12:]]), kc, vc, torch.cat([bt[2:], bt[2:]]), cu2,
                                     torch.tensor([int(kv_lens[2]), 0], dtype=torch.int32, device=device), 1,
                                     d ** -0.5, splits=sp)
            assert torch.allclose(two[:1], want[12:], atol=atol * 10, rtol=1e-3), sp
            assert torch.isfinite(two[1]).all() and not two[1].any(), sp
        set_context(None)
    x, r, w = rnd(5, 96), rnd(5, 96), rnd(96)
    y, r2 = rms_norm(x, w, 1e-6, r.clone())
    xs = (x + r).float()
    assert torch.allclose(r2, x + r, atol=atol)
    assert torch.allclose(y.float(), w.float() * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-6)),
                          atol=atol * 10, rtol=1e-2)
    check_reduce_add_rms_norm(device, dtype, g)
    gu = rnd(5, 2 * 80)
    assert torch.allclose(silu_and_mul(gu).float(), (torch.nn.functional.silu(gu[:, :80]) * gu[:, 80:]).float(),
                          atol=atol * 10, rtol=1e-2)


def check_reduce_add_rms_norm(device: str, dtype: torch.dtype, g: torch.Generator) -> None:
    """A row layer's split-K partials (or its output as it is) summed, added to the residual and normed in one
    launch (one rank), against float64; several programs a row twice over (the row tickets reset)."""
    from serving.layers.norm import RMSNorm
    from serving.layers.reduce_norm import RowOutput, reduce_add_rms_norm

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows, n, split in [(1, 96, 5), (3, 200, 1), (16, 264, 28), (33, 136, 3)]:
        parts = torch.randn(split, rows, n, generator=g).to(device)
        parts = parts.to(dtype) if split == 1 else parts
        res = torch.randn(rows, n, generator=g).to(device, dtype)
        w = torch.randn(n, generator=g).to(device, dtype)
        h = (parts.double().sum(0).to(dtype).double() + res.double())
        want = w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        for block_n, warps in [(None, None), (128, 1), (128, 1)]:  # default shape; several programs a row
            r = res.clone()
            y, r2 = reduce_add_rms_norm(parts, r, w, 1e-6, block_n=block_n, num_warps=warps)
            assert r2 is r and torch.allclose(r.double(), h, atol=tol, rtol=tol)
            assert torch.allclose(y.double(), want, atol=tol * 4, rtol=tol * 2), (rows, n, split)
            if block_n is None:
                y_default, r_default = y, r
    # the model's norm takes a row layer's RowOutput the same way (one rank: no peers)
    norm = RMSNorm(n, 1e-6, dtype).to(device)
    norm.weight.data.copy_(w)
    y2, r3 = norm(RowOutput(parts), res.clone())
    assert torch.equal(y2, y_default) and torch.equal(r3, r_default)
    z = torch.zeros(1, 2, 8, device=device)
    for res_rows, slot, why in [(3, 0, "must agree on [M, N]"), (2, 2, "slot must be 0 or 1")]:
        try:
            reduce_add_rms_norm(z, torch.zeros(res_rows, 8, device=device), torch.ones(8, device=device), 1e-6,
                                None, slot)
        except ValueError as e:
            assert why in str(e), e
        else:
            raise AssertionError(f"accepted: {why}")


def check_engine(model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from serving import EngineConfig, GenerationConfig, LLMEngine
    from tests.test_engine import hf_greedy, prompts

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eng = LLMEngine(model_dir, EngineConfig(dtype="float32", block_size=4, max_num_batched_tokens=16,
                                            progress=False))
    ps = prompts([3, 21, 9], seed=12)
    for p, o in zip(ps, eng.generate(ps, GenerationConfig(max_new_tokens=12))):
        assert o.token_ids == hf_greedy(hf, p, 12)


def test_triton_kernels_in_interpreter(tiny_model_factory):
    model = tiny_model_factory("qwen3")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = ("import sys; from tests.test_engine_triton import check_kernels, check_engine; "
            "check_kernels(); check_engine(sys.argv[1]); print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(model)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
