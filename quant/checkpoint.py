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
