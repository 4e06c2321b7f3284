"""Per-step attention metadata, set by the runner before a forward and read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    slot_mapping: torch.Tensor      # [T] int, cache slot of each new token (-1: do not store)
    cu_seqlens_q: torch.Tensor      # [B+1] int32, query tokens of sequence i are [cu[i], cu[i+1])
    kv_lens: torch.Tensor           # [B] int32, cached + new tokens of each sequence
    block_tables: torch.Tensor      # [B, max_blocks] int32
    max_q_len: int                  # 1 for a decode-only step
    cpu_cu_seqlens_q: list[int] | None = None  # host copies for the torch path
    cpu_kv_lens: list[int] | None = None


_CTX: AttentionContext | None = None


def set_context(ctx: AttentionContext | None) -> None:
    global _CTX
    _CTX = ctx


def get_context() -> AttentionContext:
    assert _CTX is not None, "attention called outside a runner step"
    return _CTX
