"""Who runs this step, and how many of their tokens: iteration-level scheduling under a token budget.

Running sequences go first (decodes and unfinished prefill chunks), then waiting ones join while the budget
and the KV blocks allow; a prompt longer than what is left of the budget is prefilled in chunks. When a
running sequence needs a block and none is free, the newest running sequence is preempted (its blocks are
freed and it is recomputed later). Knows nothing of tensors.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted below as someone else's victim
            if budget == 0:
                break
            n = min(seq.num_uncomputed, budget)
            while not self.bm.can_ensure(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.bm.ensure(seq, seq.num_computed_tokens + n)
            scheduled.append((seq, n))
            budget -= n
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        """Give a running sequence's blocks back; it waits at the front and is recomputed later."""
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out (finished, aborted or failed) and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
