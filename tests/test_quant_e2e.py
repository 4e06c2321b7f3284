"""End to end: `rayawq quantize` on tiny real-architecture models, reload, compare with FP and RTN."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from cluster.cli import main
from quant.awq_model import load_awq_model

ARGS = ["--calib-samples", "8", "--calib-seqlen", "128", "--batch-size", "4"]


def quantize(model, out, calib, *extra):
    return main(["quantize", str(model), "--work-dir", str(out), "--calib-dataset", str(calib), *ARGS, *extra])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch,gs", [("llama", 64), ("qwen2", 32), ("qwen3", 128)])
def test_quantize_reload_close_to_fp_and_better_than_rtn(tiny_model_factory, calib_file, tmp_path, arch, gs):
    from transformers import AutoModelForCausalLM

    src = tiny_model_factory(arch)
    assert quantize(src, tmp_path / "awq", calib_file, "--w-group-size", str(gs)) == 0
    assert quantize(src, tmp_path / "rtn", calib_file, "--w-group-size", str(gs), "--method", "rtn") == 0

    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    awq = load_awq_model(tmp_path / "awq")(ids).logits
    rtn = load_awq_model(tmp_path / "rtn")(ids).logits
    assert rel_err(awq, ref) < 0.5
    assert rel_err(awq, ref) < rel_err(rtn, ref)


def test_checkpoint_layout_is_autoawq_gemm(tiny_model_factory, calib_file, tmp_path):
    src = tiny_model_factory("qwen2")  # qkv biases must survive
    out = tmp_path / "ckpt"
    assert quantize(src, out, calib_file, "--w-group-size", "32", "--dtype", "float16") == 0
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                 "modules_to_not_convert": []}
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file()
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        keys = set(fh.keys())
        p = "model.layers.1.self_attn.k_proj"
        assert f"{p}.weight" not in keys and f"{p}.bias" in keys
        qw, qz, sc = fh.get_tensor(f"{p}.qweight"), fh.get_tensor(f"{p}.qzeros"), fh.get_tensor(f"{p}.scales")
        assert qw.dtype == torch.int32 and qw.shape == (128, 64 // 8)
        assert qz.dtype == torch.int32 and qz.shape == (128 // 32, 64 // 8)
        assert sc.dtype == torch.float16 and sc.shape == (128 // 32, 64)
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert "lm_head.weight" in keys and "lm_head.qweight" not in keys
    assert not (tmp_path / "ckpt.partial").exists()


def test_sharded_checkpoint_with_index(tiny_model_factory, calib_file, tmp_path):
    from quant.config import QuantConfig
    from quant.pipeline import quantize_model

    cfg = QuantConfig(group_size=64, calib_dataset=str(calib_file), calib_samples=4, calib_seqlen=64,
                      max_shard_size=200_000, method="rtn")
    quantize_model(str(tiny_model_factory("llama")), tmp_path / "sh", cfg, progress=False)
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    load_awq_model(tmp_path / "sh")  # every tensor found through the index


def test_console_script_and_eval(tiny_model_factory, calib_file, eval_file, tmp_path):
    src = tiny_model_factory("llama")
    out = tmp_path / "c"
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "quantize", str(src), "--work-dir", str(out),
                        "--calib-dataset", str(calib_file), "--w-group-size", "64", *ARGS],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "mse(RTN)" in r.stdout and "AWQ blocks" in r.stderr  # summary table and per-block progress
    for m in (src, out):
        ppls = []
        for backend in ("engine", "reference"):  # the serving engine and transformers agree
            e = subprocess.run([sys.executable, "-m", "cluster.cli", "eval", str(m), "--dataset", str(eval_file),
                                "--seqlen", "128", "--max-windows", "2", "--backend", backend],
                               capture_output=True, text=True, timeout=300)
            assert e.returncode == 0, e.stderr
            ppls.append(float(e.stdout.split("perplexity")[1].split()[0]))
        assert 1.0 < ppls[0] < 1e4
        assert abs(ppls[0] - ppls[1]) / ppls[1] < 1e-3
