"""Staged parts → the checkpoint's ``model-0000k-of-0000n.safetensors`` shards, written while the job runs.

Parts (one per block, plus "extra") are grouped in order, greedily, into shards of at most ``max_shard_size``
bytes. Shard *k*'s end is decided as soon as the part after it is staged, so ``ShardMerger`` writes each shard
then, on its own thread, and the job's last step only writes the last shard and renames: on a 7B model that
is half the merge, on a 70B one nearly all of it. Bytes go file to file (``os.copy_file_range``): no tensor is
loaded, nothing is held in RAM. The grouping depends only on the parts' sizes and order, so the shards are the
same whatever order the parts finish in.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from pathlib import Path

from .checkpoint import atomic_write_text
from .errors import QuantError


def merge_parts(part_files: list[Path], out_dir: Path, max_shard_size: int) -> dict[str, str]:
    """All at once: the shards of ``part_files`` (in order) in ``out_dir``; returns the weight map."""
    names = [str(i) for i in range(len(part_files))]
    merger = ShardMerger(names, out_dir, max_shard_size, background=False)
    for name, f in zip(names, part_files):
        merger.part_ready(name, f)
    return merger.finish()


class ShardMerger:
    """Writes shards as soon as their parts are staged (``part_ready``, any order); ``finish`` writes the rest,
    gives the shards their final names and writes the index. A failure is raised by ``finish``."""

    def __init__(self, order: list[str], out_dir: Path, max_shard_size: int, background: bool = True):
        self.order, self.out_dir, self.max_shard_size = list(order), Path(out_dir), max_shard_size
        self._staged: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data offset, header)
        self._tensors: set[str] = set()  # every tensor name staged so far: each may come from one part only
        self._pos = 0  # parts before this index of ``order`` are in a closed or the open shard
        self._open: list[tuple[Path, int, dict]] = []
        self._open_bytes = 0
        self._written: list[tuple[Path, dict[str, int]]] = []  # (temporary file, {tensor: bytes}) per shard
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = queue.Queue() if background else None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="rayawq-shard-merger", daemon=True)
            self._thread.start()

    def part_ready(self, name: str, path: Path) -> None:
        """Part ``name`` is complete on disk at ``path``."""
        if self._queue is None:
            self._take(name, Path(path))
        else:
            self._queue.put((name, Path(path)))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._take(*item)
                except BaseException as exc:  # noqa: BLE001 - raised by finish()
                    self._error = exc

    def _take(self, name: str, path: Path) -> None:
        if name not in self.order:
            raise QuantError(f"part {name!r} is not one of this checkpoint's parts")
        if name in self._staged:
            return
        data_start, header = _read_layout(path)
        twice = self._tensors.intersection(header)
        if twice:
            raise QuantError(f"tensor {min(twice)} is in two parts of the staging directory; delete it and rerun")
        self._tensors.update(header)
        self._staged[name] = (path, data_start, header)
        while self._pos < len(self.order) and self.order[self._pos] in self._staged:
            part = self._staged[self.order[self._pos]]
            size = sum(e - b for b, e in (t["data_offsets"] for t in part[2].values()))
            if self._open and self._open_bytes + size > self.max_shard_size:
                self._close_shard()
            self._open.append(part)
            self._open_bytes += size
            self._pos += 1

    def _close_shard(self) -> None:
        tmp = self.out_dir / f"shard-{len(self._written) + 1:05d}.safetensors"
        self._written.append((tmp, _concat_safetensors(self._open, tmp)))
        self._open, self._open_bytes = [], 0

    def stop(self) -> None:
        """Let the thread finish what it is writing (before the directory is removed or finished)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> dict[str, str]:
        """Write the last shard, rename every shard to its final name, write the index; the weight map."""
        self.stop()
        if self._error is not None:
            raise self._error
        missing = [n for n in self.order if n not in self._staged]
        if missing:
            raise QuantError(f"cannot merge the checkpoint: parts {missing[:4]} are not staged")
        if self._open:
            self._close_shard()
        n = len(self._written)
        weight_map: dict[str, str] = {}
        for k, (tmp, sizes) in enumerate(self._written, 1):
            name = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
            tmp.replace(self.out_dir / name)
            weight_map.update(dict.fromkeys(sizes, name))
        if n > 1:
            total = sum(sum(sizes.values()) for _, sizes in self._written)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(self.out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
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
