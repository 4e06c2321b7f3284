"""Every refused input: a clear message, exit code 2, and nothing left behind."""

import json
import shutil

from safetensors.torch import load_file, save_file

from cluster.cli import main


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    return code, capsys.readouterr().err


def assert_refused(capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    code, err = run(capsys, "quantize", *argv, "--work-dir", out, "--calib-samples", "4", "--calib-seqlen", "64")
    assert code == 2, err
    for n in needles:
        assert n in err, err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_unsupported_architecture(tmp_path, capsys, tokenizer_dir, calib_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=512)).save_pretrained(d)
    assert_refused(capsys, tmp_path, [d, "--calib-dataset", calib_file], "unsupported architecture",
                   "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_group_size_that_does_not_divide(tmp_path, capsys, tiny_model_factory, calib_file):
    src = tiny_model_factory("llama", hidden_size=96, intermediate_size=192, head_dim=24)
    assert_refused(capsys, tmp_path, [src, "--calib-dataset", calib_file, "--w-group-size", "64"],
                   "does not divide", "--w-group-size 32")


def test_other_bit_widths_and_group_sizes(tmp_path, capsys, tiny_model_factory, calib_file):
    src = tiny_model_factory("llama")
    assert_refused(capsys, tmp_path, [src, "--calib-dataset", calib_file, "--w-bits", "8"], "--w-bits 8")
    assert_refused(capsys, tmp_path, [src, "--calib-dataset", calib_file, "--w-group-size", "48"], "(32, 64, 128)")


def test_nan_weights(tmp_path, capsys, tiny_model_factory, calib_file):
    src = tmp_path / "nan"
    shutil.copytree(tiny_model_factory("llama"), src)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    assert_refused(capsys, tmp_path, [src, "--calib-dataset", calib_file], "NaN", "block 1")


def test_missing_weight_files(tmp_path, capsys, tiny_model_factory, calib_file):
    src = tmp_path / "noweights"
    shutil.copytree(tiny_model_factory("llama"), src)
    (src / "model.safetensors").unlink()
    assert_refused(capsys, tmp_path, [src, "--calib-dataset", calib_file], "no .safetensors")
    idx = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert_refused(capsys, tmp_path, [src, "--calib-dataset", calib_file], "missing", "model-00001-of-00002")


def test_missing_model_dir(tmp_path, capsys, calib_file):
    assert_refused(capsys, tmp_path, [tmp_path / "nowhere", "--calib-dataset", calib_file], "not a directory")


def test_offline_hub_dataset_says_pass_a_path(tmp_path, capsys, tiny_model_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert_refused(capsys, tmp_path, [tiny_model_factory("llama"), "--calib-dataset", "pileval"],
                   "--calib-dataset PATH")


def test_calibration_text_too_short(tmp_path, capsys, tiny_model_factory):
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    assert_refused(capsys, tmp_path, [tiny_model_factory("llama"), "--calib-dataset", short], "fewer than --calib-samples")


def test_existing_work_dir_needs_overwrite(tmp_path, capsys, tiny_model_factory, calib_file):
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(capsys, "quantize", tiny_model_factory("llama"), "--work-dir", out, "--calib-dataset", calib_file)
    assert code == 2 and "--overwrite" in err
    assert not any(out.iterdir())
