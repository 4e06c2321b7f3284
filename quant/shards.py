"""Staged parts → the checkpoint's ``model-0000k-of-0000n.safetensors`` shards, written while the job runs.

Parts (one per block, plus "extra") are grouped in order, greedily, into shards of at most ``max_shard_size``
bytes. Each part's tensor bytes are appended to its shard's file as soon as the parts before it are in, on
the merger's own thread; the header goes into space reserved at the front of the file when the shard closes
(a safetensors header may be padded with spaces). So the job's last step writes only the last part(s) and the
header, then renames: the whole merge overlaps the search. Bytes go file to file (``os.copy_file_range``): no
tensor is loaded, nothing is held in RAM. The grouping and the reserved sizes depend only on the parts' sizes
and order, so the shards are the same whatever order the parts finish in.
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

# Header bytes reserved at least: a 2 GB shard of a 7B model's blocks has a ~40 KB header (23 tensors a block)
MIN_RESERVE = 64 * 1024


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
        self._open: _ShardFile | None = None
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
            size = _data_bytes(part[2])
            if self._open is not None and self._open.nbytes + size > self.max_shard_size:
                self._close_shard()
            if self._open is None:
                path = self.out_dir / f"shard-{len(self._written) + 1:05d}.safetensors"
                self._open = _ShardFile(path, self._header_reserve(part))
            self._open.append(*part)
            self._pos += 1

    def _header_reserve(self, first: tuple[Path, int, dict]) -> int:
        """Header bytes to reserve for a shard that starts with ``first``, from the parts before it in order
        (never from parts that happen to have arrived early: the shards must not depend on timing). Bounded by
        the parts still to come and by the densest header per data byte seen, and at least ``MIN_RESERVE``
        (the embeddings part that opens the first shard has a tiny header, the blocks after it do not); a
        header that outgrows it costs one copy of the shard (``_ShardFile.close``)."""
        seen = [self._staged[n][2] for n in self.order[: self._pos]] + [first[2]]
        per_part = max(_header_estimate(h) for h in seen)
        density = max(_header_estimate(h) / max(1, _data_bytes(h)) for h in seen)
        bound = min((len(self.order) - self._pos) * per_part,
                    density * max(self.max_shard_size, _data_bytes(first[2])) + per_part)
        return max(MIN_RESERVE, int(bound * 1.25 + 256))

    def _close_shard(self) -> None:
        self._written.append((self._open.path, self._open.close()))
        self._open = None

    def stop(self) -> None:
        """Let the thread finish what it is writing (before the directory is removed or finished)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._open is not None and self._pos < len(self.order):
            self._open.abandon()  # unfinished: its temp file is rewritten by the next merger over this directory

    def finish(self) -> dict[str, str]:
        """Write the last shard, rename every shard to its final name, write the index; the weight map."""
        self.stop()
        if self._error is not None:
            raise self._error
        missing = [n for n in self.order if n not in self._staged]
        if missing:
            raise QuantError(f"cannot merge the checkpoint: parts {missing[:4]} are not staged")
        if self._open is not None:
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


def _data_bytes(header: dict) -> int:
    return sum(e - b for b, e in (t["data_offsets"] for t in header.values()))


def _header_estimate(header: dict) -> int:
    """An upper bound of the bytes a part's entries take in a shard's header (its offsets may grow longer)."""
    return len(json.dumps(header, separators=(",", ":"))) + 24 * len(header)


class _ShardFile:
    """One shard written part by part under a temporary name: the data section is appended as parts come,
    ``reserve`` bytes at the front wait for the header. (safetensors has no API that writes a file from byte
    ranges of others, and loading the tensors to re-save them costs two extra copies.)"""

    def __init__(self, path: Path, reserve: int):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.reserve = reserve + (-reserve % 8)  # the data section starts 8-byte aligned
        self.entries: dict[str, dict] = {}
        self.nbytes = 0
        self.fh = open(self.tmp, "wb")
        self.fh.truncate(8 + self.reserve)
        self.fh.seek(8 + self.reserve)

    def append(self, src: Path, data_start: int, header: dict) -> None:
        with open(src, "rb") as inp:
            for key, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                b, e = t["data_offsets"]
                self.entries[key] = {"dtype": t["dtype"], "shape": t["shape"],
                                     "data_offsets": [self.nbytes, self.nbytes + e - b]}
                _copy_range(inp, self.fh, data_start + b, e - b)
                self.nbytes += e - b
        os.fdatasync(self.fh.fileno())  # on this thread now, so that closing has only the tail to flush

    def close(self) -> dict[str, int]:
        """Write the header, fsync, rename; returns {tensor: bytes}."""
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(head) <= self.reserve:
            self.fh.seek(0)
            self.fh.write(struct.pack("<Q", self.reserve) + head + b" " * (self.reserve - len(head)))
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.tmp.replace(self.path)
        else:  # more tensors than the reservation foresaw: the data moves once, behind an exact header
            head += b" " * (-len(head) % 8)
            self.fh.close()
            exact = self.path.with_name(self.path.name + ".tmp2")
            with open(exact, "wb") as out, open(self.tmp, "rb") as inp:
                out.write(struct.pack("<Q", len(head)) + head)
                out.flush()
                _copy_range(inp, out, 8 + self.reserve, self.nbytes)
                os.fsync(out.fileno())
            exact.replace(self.path)
            self.tmp.unlink()
        return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in self.entries.items()}

    def abandon(self) -> None:
        self.fh.close()


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
