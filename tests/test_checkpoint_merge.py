"""Merging staged parts into shards by byte copy: the shards load with safetensors and hold every tensor exactly."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant.shards import ShardMerger, merge_parts
from quant.errors import QuantError


def _parts(tmp_path, n=5):
    g = torch.Generator().manual_seed(0)
    parts, tensors = [], {}
    for i in range(n):
        t = {
            f"model.layers.{i}.mlp.qweight": torch.randint(-2**31, 2**31 - 1, (64, 24), dtype=torch.int32, generator=g),
            f"model.layers.{i}.mlp.scales": torch.randn(3, 17, generator=g).to(torch.bfloat16),  # odd byte count
            f"model.layers.{i}.norm.weight": torch.randn(33, generator=g).half(),
            f"model.layers.{i}.flag": torch.tensor([True, False, True]),
        }
        save_file(t, str(tmp_path / f"part{i}.safetensors"), metadata={"format": "pt"})
        parts.append(tmp_path / f"part{i}.safetensors")
        tensors.update(t)
    return parts, tensors


@pytest.mark.parametrize("max_shard", [1 << 30, 7000])
def test_merged_shards_hold_every_tensor(tmp_path, max_shard):
    parts, tensors = _parts(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    weight_map = merge_parts(parts, out, max_shard)
    files = sorted(out.glob("*.safetensors"))
    assert not list(out.glob("*.tmp"))
    if max_shard > 1 << 20:
        assert [f.name for f in files] == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == dict(sorted(weight_map.items()))
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
        part = load_file(str(f))
        assert all(weight_map[k] == f.name for k in part)
        loaded.update(part)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k


def test_same_tensor_in_two_parts_is_refused(tmp_path):
    parts, _ = _parts(tmp_path, n=2)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QuantError, match="two parts"):
        merge_parts([parts[0], parts[1], parts[0]], out, 1 << 30)


def test_truncated_part_is_a_clear_error(tmp_path):
    parts, _ = _parts(tmp_path, n=2)
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[:-10])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QuantError, match="shorter than its header"):
        merge_parts(parts, out, 1 << 30)


def test_shards_written_as_parts_arrive_equal_the_all_at_once_merge(tmp_path):
    parts, _ = _parts(tmp_path, n=6)
    ref = tmp_path / "ref"
    ref.mkdir()
    merge_parts(parts, ref, 7000)
    out = tmp_path / "live"
    out.mkdir()
    names = [f"p{i}" for i in range(6)]
    merger = ShardMerger(names, out, 7000)
    for i in (1, 0, 3, 2):  # out of order, as blocks finish on several workers
        merger.part_ready(names[i], parts[i])
    merger.stop()  # let the thread catch up: the shards whose end is known are written already
    assert sorted(f.name for f in out.glob("shard-*.safetensors")), "no shard written before finish"
    merger = ShardMerger(names, out, 7000)  # a fresh merger over the same directory, fed everything
    for i in (5, 1, 0, 3, 2, 4):
        merger.part_ready(names[i], parts[i])
    merger.finish()
    got = sorted(f.name for f in out.glob("*.safetensors"))
    assert got == sorted(f.name for f in ref.glob("*.safetensors"))
    for name in got + ["model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_finish_with_a_part_missing_is_a_clear_error(tmp_path):
    parts, _ = _parts(tmp_path, n=2)
    merger = ShardMerger(["a", "b"], tmp_path, 1 << 30, background=False)
    merger.part_ready("a", parts[0])
    with pytest.raises(QuantError, match="not staged"):
        merger.finish()


def test_the_open_shard_is_written_as_its_parts_arrive(tmp_path):
    """Before finish, every staged part's bytes are in the last shard's file already: finishing writes only
    the header into the space reserved for it."""
    parts, tensors = _parts(tmp_path, n=4)
    out = tmp_path / "out"
    out.mkdir()
    names = [f"p{i}" for i in range(4)]
    merger = ShardMerger(names, out, 1 << 30)
    for name, part in zip(names, parts):
        merger.part_ready(name, part)
    merger._queue.put(None)  # let the thread drain without finishing
    merger._thread.join()
    (tmp,) = out.glob("shard-*.tmp")
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    reserve = merger._open.reserve
    assert tmp.stat().st_size == 8 + reserve + data
    merger.finish()
    raw = (out / "model.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") == reserve  # the header went into the reserved space
    loaded = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())


def test_a_header_larger_than_its_reservation_still_makes_a_valid_shard(tmp_path):
    """A shard that starts with one big tensor (few header bytes per data byte) and then takes many small
    ones outgrows its reserved header: the data moves once behind an exact header, nothing is left over."""
    g = torch.Generator().manual_seed(1)
    big = {"lm_head.weight": torch.randn(256, 256, generator=g)}
    save_file(big, str(tmp_path / "big.safetensors"))
    files, want = [tmp_path / "big.safetensors"], dict(big)
    for i in range(60):  # 60 x 24 entries of ~90 bytes: beyond MIN_RESERVE
        t = {f"model.layers.{i}.a_rather_long_module_name.weight_{j}": torch.randn(2, generator=g) for j in range(24)}
        save_file(t, str(tmp_path / f"small{i}.safetensors"))
        files.append(tmp_path / f"small{i}.safetensors")
        want.update(t)
    out = tmp_path / "out"
    out.mkdir()
    merge_parts(files, out, 1 << 30)
    assert sorted(f.name for f in out.iterdir()) == ["model.safetensors"]
    raw = (out / "model.safetensors").read_bytes()
    head = raw[8: 8 + int.from_bytes(raw[:8], "little")]
    assert len(head) - len(head.rstrip(b" ")) < 8  # the exact header, not the (outgrown) reservation
    loaded = load_file(str(out / "model.safetensors"))
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], t) for k, t in want.items())
