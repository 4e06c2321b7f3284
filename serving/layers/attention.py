"""Attention over the paged KV cache: apply RoPE, store the new K/V, attend (Triton on GPU, torch on CPU)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .context import get_context
from .rotary import RotaryEmbedding
from .triton_utils import use_triton


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.rotary = rotary
        # Set by the runner once the cache exists: [num_blocks, block_size, num_kv_heads, head_dim] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq*D]``."""
        ctx = get_context()
        if use_triton(q):
            from .triton_attention import paged_attention, rope_and_store

            rope_and_store(q, k, v, positions, self.rotary.cos_sin, self.k_cache, self.v_cache, ctx.slot_mapping)
            o = paged_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.kv_lens,
                                ctx.max_q_len, self.scale)
            return o.view(q.shape[0], -1)
        q, k = self.rotary(positions, q, k)
        self._store(k, v, ctx.slot_mapping)
        return self._attend(q, ctx).view(q.shape[0], -1)

    def forward_partials(self, positions: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
        """Like ``forward``, from the QKV layer's split-K partials (GPU only; see ``rope_and_store_partials``)."""
        from .triton_attention import paged_attention, rope_and_store_partials

        ctx = get_context()
        q = rope_and_store_partials(ws, bias, positions, self.rotary.cos_sin, self.k_cache, self.v_cache,
                                    ctx.slot_mapping, self.num_heads, dtype)
        o = paged_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.kv_lens,
                            ctx.max_q_len, self.scale)
        return o.view(q.shape[0], -1)

    def _store(self, k, v, slots):
        kc = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        vc = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        keep = slots >= 0
        kc[slots[keep]] = k[keep].to(kc.dtype)
        vc[slots[keep]] = v[keep].to(vc.dtype)

    def _attend(self, q, ctx):
        """Torch path: gather each sequence's K/V through its block table, causal SDPA (bottom-right aligned)."""
        cu = ctx.cpu_cu_seqlens_q or ctx.cu_seqlens_q.tolist()
        kv_lens = ctx.cpu_kv_lens or ctx.kv_lens.tolist()
        page = self.k_cache.shape[1]
        out = torch.empty_like(q)
        group = self.num_heads // self.num_kv_heads
        for i, kv_len in enumerate(kv_lens):
            s, e = cu[i], cu[i + 1]
            if e == s:
                continue
            blocks = ctx.block_tables[i, : -(-kv_len // page)]
            k = self.k_cache[blocks].flatten(0, 1)[:kv_len].transpose(0, 1)  # [Hkv, L, D]
            v = self.v_cache[blocks].flatten(0, 1)[:kv_len].transpose(0, 1)
            if group > 1:
                k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
            n = e - s
            qi = q[s:e].transpose(0, 1)  # [Hq, n, D]
            if n == kv_len:
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=self.scale)
            else:
                qpos = torch.arange(kv_len - n, kv_len, device=q.device)
                mask = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=self.scale)
            out[s:e] = o.transpose(0, 1)
        return out
