"""Rank 0's steps to the other ranks of one node through shared memory, not a socket.

Every step of a tensor-parallel engine starts with rank 0 telling the other ranks what to run; the others cannot
start their part (and rank 0's first all-reduce waits for them) before the message is there. Over gloo that is
two socket broadcasts per message (size, then bytes). Here it is one pickled message in a shared mapping: the
writer waits until every reader took the previous one, copies the bytes in, then bumps a sequence number; each
reader spins briefly on that number (then sleeps in growing steps while the engine is idle), copies the bytes out
and acknowledges. One slot is enough: a reader acknowledges as soon as it has copied, before it runs the step.

Layout: ``[seq u64][size i64][ack u64 x world]`` then the payload. A message larger than the payload area is
announced with size -1 and sent through the fallback (gloo) instead.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import threading
import time
import uuid
from typing import Any, Callable

_HEAD = struct.Struct("<Qq")
_ACK = struct.Struct("<Q")
_SHM_DIR = "/dev/shm"
PAYLOAD_BYTES = 4 << 20  # the payload area rank 0 creates; larger messages go through the fallback
_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier (a lock's acquire and release): bytes before the sequence number, on any CPU."""
    with _lock:
        pass


def _wait(ready: Callable[[], bool], timeout_s: float | None = None, spin_s: float = 2e-4,
          max_sleep_s: float = 1e-3) -> bool:
    """Spin on ``ready`` for ``spin_s``, then sleep in doubling steps up to ``max_sleep_s`` (an idle engine);
    False if ``timeout_s`` passed first."""
    start = time.perf_counter()
    sleep = 1e-5
    while not ready():
        waited = time.perf_counter() - start
        if timeout_s is not None and waited > timeout_s:
            return False
        if waited > spin_s:
            time.sleep(sleep)
            sleep = min(2 * sleep, max_sleep_s)
    return True


class StepChannel:
    """One writer (rank 0) and ``world_size - 1`` readers on one node; ``send`` / ``recv`` pickled objects."""

    def __init__(self, path: str, rank: int, world_size: int, fallback: Callable[[Any], Any] | None,
                 create: bool = False):
        self.path, self.rank, self.world_size, self.fallback = path, rank, world_size, fallback
        self.base = _HEAD.size + _ACK.size * world_size
        if create:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, self.base + PAYLOAD_BYTES)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self.buf = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.capacity = len(self.buf) - self.base
        self.seq = 0  # messages sent (writer) or taken (reader)

    @staticmethod
    def new_path() -> str:
        """A fresh name in /dev/shm (memory, not disk) for rank 0 to create and the readers to open."""
        return os.path.join(_SHM_DIR if os.path.isdir(_SHM_DIR) else "/tmp", f"rayawq-tp-{uuid.uuid4().hex}")


    def _seq(self) -> int:
        return _HEAD.unpack_from(self.buf, 0)[0]

    def _acked(self) -> bool:
        return all(_ACK.unpack_from(self.buf, _HEAD.size + _ACK.size * r)[0] == self.seq
                   for r in range(1, self.world_size))

    def send(self, obj: Any, timeout_s: float | None = None) -> None:
        """Raises ``TimeoutError`` (sending nothing) when a reader has not taken the previous message within
        ``timeout_s``: a rank that died."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if not _wait(self._acked, timeout_s):  # every reader has copied the previous message out
            raise TimeoutError(f"a rank has not taken step message {self.seq} in {timeout_s:.0f} s")
        fits = len(data) <= self.capacity
        if fits:
            self.buf[self.base:self.base + len(data)] = data
        _fence()
        self.seq += 1
        _HEAD.pack_into(self.buf, 0, self.seq, len(data) if fits else -1)
        if not fits:
            self.fallback(obj)

    def recv(self) -> Any:
        want = self.seq + 1
        _wait(lambda: self._seq() == want)
        _fence()
        size = _HEAD.unpack_from(self.buf, 0)[1]
        data = bytes(self.buf[self.base:self.base + size]) if size >= 0 else None
        self.seq = want
        _ACK.pack_into(self.buf, _HEAD.size + _ACK.size * self.rank, want)
        return pickle.loads(data) if data is not None else self.fallback(None)


def unlink(path: str) -> None:
    """Remove a channel's file once every rank has mapped it (or failed to): the mappings live on, no name is
    left behind in /dev/shm."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
