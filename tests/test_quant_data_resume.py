"""Calibration sources, activation spilling, and resuming a job that died."""

import json

import pytest
import torch
from safetensors.torch import load_file

from quant import block_quant, pipeline
from quant.calib_data import calibration_windows, read_texts
from quant.config import QuantConfig
from quant.pipeline import quantize_model


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_local_formats_give_the_same_windows(tmp_path, calib_file, tok):
    lines = calib_file.read_text().splitlines()[:3000]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    with open(tmp_path / "c.jsonl", "w") as fh:
        for ln in lines:
            fh.write(json.dumps({"text": ln}) + "\n")
    import datasets

    datasets.Dataset.from_dict({"text": lines}).to_parquet(str(tmp_path / "c.parquet"))
    windows = [calibration_windows(read_texts(tmp_path / f"c.{ext}"), tok, 6, 64, seed=7)
               for ext in ("txt", "jsonl", "parquet")]
    assert windows[0].shape == (6, 64)
    assert torch.equal(windows[0], windows[1]) and torch.equal(windows[0], windows[2])
    again = calibration_windows(read_texts(tmp_path / "c.txt"), tok, 6, 64, seed=7)
    assert torch.equal(again, windows[0])  # fixed seed, repeatable
    other = calibration_windows(read_texts(tmp_path / "c.txt"), tok, 6, 64, seed=8)
    assert not torch.equal(other, windows[0])


def test_jsonl_without_text_field(tmp_path):
    from quant.errors import QuantError

    (tmp_path / "x.jsonl").write_text('{"content": "a"}\n')
    with pytest.raises(QuantError, match="'text' field"):
        read_texts(tmp_path / "x.jsonl")


def cfg(calib_file, **kw):
    return QuantConfig(group_size=64, calib_dataset=str(calib_file), calib_samples=4, calib_seqlen=64, **kw)


def test_activations_spilled_to_disk_give_the_same_checkpoint(tiny_model_factory, calib_file, tmp_path):
    src = str(tiny_model_factory("qwen3"))
    quantize_model(src, tmp_path / "mem", cfg(calib_file), progress=False)
    quantize_model(src, tmp_path / "disk", cfg(calib_file), act_budget_gb=1e-9, progress=False)
    a, b = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "disk" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_job_that_dies_resumes_from_finished_blocks(tiny_model_factory, calib_file, tmp_path, monkeypatch):
    src = str(tiny_model_factory("llama", num_hidden_layers=3))
    reference = tmp_path / "ref"
    quantize_model(src, reference, cfg(calib_file), progress=False)

    real = block_quant.quantize_block
    calls = []

    def dies_on_block_2(layer, index, *a, **k):
        calls.append(index)
        if index == 2:
            raise RuntimeError("worker lost")
        return real(layer, index, *a, **k)

    monkeypatch.setattr(pipeline, "quantize_block", dies_on_block_2)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        quantize_model(src, out, cfg(calib_file), progress=False)
    assert not out.exists() and (tmp_path / "out.partial" / "manifest.json").exists()

    calls.clear()
    monkeypatch.setattr(pipeline, "quantize_block", real)
    summary = quantize_model(src, out, cfg(calib_file), progress=False)
    assert summary.skipped == [0, 1] and [b.index for b in summary.blocks] == [2]
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "out.partial").exists()


def test_resume_with_other_settings_is_refused(tiny_model_factory, calib_file, tmp_path, monkeypatch):
    from quant.errors import QuantError

    src = str(tiny_model_factory("llama"))
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("die")))
    with pytest.raises(RuntimeError):
        quantize_model(src, tmp_path / "o", cfg(calib_file), progress=False)
    monkeypatch.undo()
    with pytest.raises(QuantError, match="different job"):
        quantize_model(src, tmp_path / "o", cfg(calib_file, clip=False), progress=False)
