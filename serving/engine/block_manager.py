"""KV blocks: a free list, reference counts, and a hash of every full block so that equal prefixes share blocks."""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


def block_hash(prev: int, tokens: list[int]) -> int:
    """Chained hash: a block's identity is its tokens and everything before them."""
    return hash((prev, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # Free blocks in eviction order (oldest first); a free block may still hold a cached prefix.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_of: dict[int, int] = {}        # block id -> hash (cached blocks only)
        self.block_of: dict[int, int] = {}       # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ---------------------------------------------------------------------------------
    def _take(self) -> int:
        bid, _ = self.free.popitem(last=False)
        h = self.hash_of.pop(bid, None)
        if h is not None and self.block_of.get(h) == bid:
            del self.block_of[h]
        self.ref_count[bid] = 1
        return bid

    def _share(self, bid: int) -> None:
        if self.ref_count[bid] == 0:
            del self.free[bid]
        self.ref_count[bid] += 1

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding this sequence's leading full blocks (never its very last token)."""
        if not self.prefix_caching or seq.params.prompt_logprobs:
            return []
        hits, prev, bs = [], 0, self.block_size
        for i in range((len(seq) - 1) // bs):
            h = block_hash(prev, seq.token_ids[i * bs:(i + 1) * bs])
            bid = self.block_of.get(h)
            if bid is None:
                break
            hits.append(bid)
            prev = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self.match_prefix(seq)
        fresh = self.blocks_needed(len(seq)) - len(hits)
        reusable_free = sum(1 for b in hits if self.ref_count[b] == 0)
        return fresh + reusable_free <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all current tokens of a waiting sequence, shared prefix blocks first."""
        assert not seq.block_table
        hits = self.match_prefix(seq)
        for bid in hits:
            self._share(bid)
        seq.block_table = list(hits)
        seq.block_hashes = [self.hash_of[b] for b in hits]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.ensure(seq, len(seq))

    def can_ensure(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def ensure(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table so that ``num_tokens`` tokens fit."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take())

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks now; cached blocks stay findable until reused."""
        for bid in reversed(seq.block_table):
            self.ref_count[bid] -= 1
            if self.ref_count[bid] == 0:
                self.free[bid] = None
                if bid not in self.hash_of:
                    self.free.move_to_end(bid, last=False)  # uncached blocks are reused first
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    # -- prefix cache -------------------------------------------------------------------------------
    def register_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed in the last step, so later requests can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed_tokens // bs:
            i = len(seq.block_hashes)
            prev = seq.block_hashes[-1] if seq.block_hashes else 0
            h = block_hash(prev, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            bid = seq.block_table[i]
            if h not in self.block_of and bid not in self.hash_of:
                self.block_of[h] = bid
                self.hash_of[bid] = h
