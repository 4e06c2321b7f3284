"""The quantizer's own decoder block computes what transformers' decoder layer computes, for every family."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant.decoder import BlockSpec, DecoderBlock
from quant.errors import QuantError
from quant.families import family_for
from tests.tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),  # biases on every linear
    ("llama", {"num_key_value_heads": 4}),  # no GQA
    ("mistral", {}),
    ("qwen2", {}),  # q/k/v biases, no o bias
    ("qwen3", {}),  # per-head q/k RMSNorm
]


def _hf_and_ours(arch: str, overrides: dict, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(arch, num_hidden_layers=1, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases too
            p.normal_(0.0, 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    model = model.to(dtype)
    hf_layer = model.model.layers[0]
    ours = DecoderBlock(BlockSpec.from_config(cfg, family_for(cfg))).to(dtype).eval()
    ours.load_state_dict(hf_layer.state_dict(), strict=True)  # the same parameter names, all of them
    return model, hf_layer, ours


@pytest.mark.parametrize("arch,overrides", CASES, ids=[f"{a}{'-' + '-'.join(o) if o else ''}" for a, o in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_matches_transformers_layer(arch, overrides, dtype):
    model, hf_layer, ours = _hf_and_ours(arch, overrides, dtype)
    seq = 24
    x = torch.randn(3, seq, model.config.hidden_size, dtype=dtype)
    pos = torch.arange(seq)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    mask = torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]
    with torch.no_grad():
        want = hf_layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        want = want[0] if isinstance(want, tuple) else want
        got = ours(x, attention_mask=mask, position_embeddings=(cos, sin))
        # the attention module alone is what AWQ's q/k/v scale search inspects
        want_attn = hf_layer.self_attn(hidden_states=x, attention_mask=mask, position_embeddings=(cos, sin))[0]
        got_attn = ours.self_attn(hidden_states=x, attention_mask=mask, position_embeddings=(cos, sin))
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_attn, want_attn, **tol)


def test_unsupported_activation_is_refused():
    cfg = tiny_config("llama", hidden_act="quick_gelu")
    with pytest.raises(QuantError, match="activation 'quick_gelu' is not supported"):
        BlockSpec.from_config(cfg, family_for(cfg))


def test_block_worker_path_does_not_import_transformers(tiny_model_factory):
    """What a block worker runs (open the files, build a block) leaves transformers unimported: its import was
    most of a cold worker's start on the H100 machine."""
    src = tiny_model_factory("qwen3")
    code = f"""
import sys, torch
from quant.decoder import BlockSpec
from quant.model_io import BlockBuilder, ModelSource
source = ModelSource({str(src)!r})
spec = BlockSpec(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32,
                 rms_norm_eps=1e-6, qk_norm=True)
layer = BlockBuilder(source, spec, torch.device("cpu"), torch.float32).block(1)
assert layer.self_attn.q_norm is not None
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
