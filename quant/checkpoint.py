"""Write an AWQ checkpoint: finished blocks land as files in a staging directory, then merge into shards.

Nothing half-written is ever visible: each file is written under a temporary name and renamed, and the
checkpoint directory itself appears with one rename at the end. A staging directory that survives a
crash is what a resumed job continues from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import QuantError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None,
                digest: bool = True) -> str | None:
    """Save safetensors under a temp name, fsync, rename; returns the file's sha256 (``digest``), else None.

    The digest (read back in chunks from the page cache) is what the resume manifest checks parts against;
    the final shards need none, and skipping it saves a pass over the whole checkpoint in ``finish``.
    """
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"})
    sha = file_sha256(tmp) if digest else None
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return sha


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class StagingDir:
    """``<work_dir>.partial/``: finished parts (``parts/*.safetensors``) and ``manifest.json``."""

    def __init__(self, work_dir: Path, fingerprint: str, overwrite: bool = False):
        self.work_dir = Path(work_dir)
        self.root = self.work_dir.with_name(self.work_dir.name + ".partial")
        self.parts = self.root / "parts"
        self.manifest_path = self.root / "manifest.json"
        self.fingerprint = fingerprint
        if self.work_dir.exists() and not overwrite:
            raise QuantError(f"{self.work_dir} already exists; pass --overwrite or choose another --work-dir")
        self.manifest = {"fingerprint": fingerprint, "parts": {}}

    def open(self) -> None:
        if self.manifest_path.exists():
            manifest = json.loads(self.manifest_path.read_text())
            if manifest.get("fingerprint") != self.fingerprint:
                raise QuantError(
                    f"{self.root} holds blocks of a different job (model or settings differ); "
                    f"delete it or use another --work-dir"
                )
            self.manifest = manifest
            # A part whose file is gone or altered is redone.
            for name, entry in list(self.manifest["parts"].items()):
                p = self.parts / entry["file"]
                if not p.exists() or file_sha256(p) != entry["sha256"]:
                    del self.manifest["parts"][name]
        self.parts.mkdir(parents=True, exist_ok=True)
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1))

    def done(self, name: str) -> bool:
        return name in self.manifest["parts"]

    def save_part(self, name: str, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
        fname = f"{name}.safetensors"
        digest = atomic_save(tensors, self.parts / fname)
        self.manifest["parts"][name] = {"file": fname, "sha256": digest, **(info or {})}
        self._write_manifest()

    def part_info(self, name: str) -> dict:
        return self.manifest["parts"][name]

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def merge_parts(part_files: list[Path], out_dir: Path, max_shard_size: int) -> dict[str, str]:
    """Concatenate part files, in order, into ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_size``.

    Streams bytes file to file (``os.copy_file_range``: in the kernel, no tensor is loaded), so merging a
    checkpoint costs one pass over it instead of load, serialise and write. Returns the weight map.
    """
    parts = [_read_layout(f) for f in part_files]
    shards: list[list[tuple[Path, int, dict]]] = [[]]
    acc = 0
    for f, (data_start, header) in zip(part_files, parts):
        size = sum(e - b for b, e in (t["data_offsets"] for t in header.values()))
        if shards[-1] and acc + size > max_shard_size:
            shards.append([])
            acc = 0
        shards[-1].append((f, data_start, header))
        acc += size
    weight_map: dict[str, str] = {}
    n = len(shards)
    total = 0
    for k, files in enumerate(shards, 1):
        name = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        names = _concat_safetensors(files, out_dir / name)
        for key, nbytes in names.items():
            if key in weight_map:
                raise QuantError(f"tensor {key} is in two parts of the staging directory; delete it and rerun")
            weight_map[key] = name
            total += nbytes
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
    return weight_map


def _read_layout(path: Path) -> tuple[int, dict]:
    """(offset of the data section, tensor entries) of a safetensors file: an 8-byte little-endian header
    length, the JSON header, then the data; each entry's ``data_offsets`` are relative to the data section."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _concat_safetensors(files: list[tuple[Path, int, dict]], path: Path) -> dict[str, int]:
    """Write one safetensors file holding every tensor of ``files`` (temp name, fsync, rename); returns
    {name: bytes}. Tensors keep their bytes; only the header is new (safetensors itself has no API that
    writes a file from ranges of others, and loading the tensors to re-save them costs two extra copies)."""
    entries, copies, pos = {}, [], 0
    for src, data_start, header in files:
        for key, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if key in entries:
                raise QuantError(f"tensor {key} is in two parts of the staging directory; delete it and rerun")
            b, e = t["data_offsets"]
            entries[key] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [pos, pos + e - b]}
            copies.append((src, data_start + b, e - b))
            pos += e - b
    head = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(head)) + head)
        out.flush()
        for src, offset, nbytes in copies:
            with open(src, "rb") as inp:
                _copy_range(inp, out, offset, nbytes)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in entries.items()}


def _copy_range(inp, out, offset: int, nbytes: int) -> None:
    """Append ``nbytes`` of ``inp`` from ``offset`` to ``out``: in the kernel where it can, else by chunks."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                step = os.copy_file_range(inp.fileno(), out.fileno(), nbytes - done, offset + done)
                if step == 0:
                    break
                done += step
        except OSError:  # e.g. a file system without it: the loop below finishes the copy
            out.seek(0, os.SEEK_END)
    inp.seek(offset + done)
    while done < nbytes:
        chunk = inp.read(min(1 << 24, nbytes - done))
        if not chunk:
            raise QuantError(f"{inp.name} is shorter than its header says; delete the staging directory and rerun")
        out.write(chunk)
        done += len(chunk)
    out.flush()


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation config travel with the checkpoint."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def write_config(src_config, dst: Path, quantization_config: dict, dtype: torch.dtype) -> None:
    cfg = src_config.to_dict()
    cfg["quantization_config"] = quantization_config
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("dtype", None)
    cfg["dtype"] = cfg["torch_dtype"]
    atomic_write_text(dst / "config.json", json.dumps(cfg, indent=2, sort_keys=True))


def publish(staged: Path, work_dir: Path, overwrite: bool) -> None:
    """Move the finished checkpoint into place with one rename (replacing an old one only if asked)."""
    if work_dir.exists():
        if not overwrite:
            raise QuantError(f"{work_dir} already exists; pass --overwrite")
        old = work_dir.with_name(work_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        work_dir.rename(old)
        staged.rename(work_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work_dir.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(work_dir)
