"""Triton kernels over the paged KV cache.

* ``rope_and_store``: rotate q and k in place (RoPE) and write k, v into their cache slots, one launch;
  ``rope_and_store_partials`` does the same from the QKV layer's unsummed split-K partials (decode with AWQ).
* ``paged_attention``: causal attention of a packed batch of query tokens (prefill chunks and decodes mixed)
  against each sequence's K/V gathered through its block table. One program per (query tile, sequence,
  KV head); the query heads that share a KV head are stacked into the tile's rows (GQA), so each K/V block
  is read once for all of them. Online softmax in fp32.

Cache layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import PDL_LAUNCH, pdl_enter

from .triton_utils import next_pow2


@triton.jit
def _rope_store_kernel(Q, K, V, Pos, CosSin, KC, VC, Slots, stride_qt, stride_kt, stride_vt,
                       HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF_P2: tl.constexpr):
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half: tl.constexpr = D // 2
    j = tl.arange(0, HALF_P2)
    m = j < half
    pos = tl.load(Pos + t).to(tl.int64)
    cos = tl.load(CosSin + pos * D + j, mask=m, other=0.0)
    sin = tl.load(CosSin + pos * D + half + j, mask=m, other=0.0)
    if h < HQ:
        base = Q + t * stride_qt + h * D
        x1 = tl.load(base + j, mask=m, other=0.0)
        x2 = tl.load(base + half + j, mask=m, other=0.0)
        c, s = cos.to(x1.dtype), sin.to(x1.dtype)
        tl.store(base + j, x1 * c - x2 * s, mask=m)
        tl.store(base + half + j, x2 * c + x1 * s, mask=m)
    else:
        hk = h - HQ
        base = K + t * stride_kt + hk * D
        x1 = tl.load(base + j, mask=m, other=0.0)
        x2 = tl.load(base + half + j, mask=m, other=0.0)
        c, s = cos.to(x1.dtype), sin.to(x1.dtype)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        tl.store(base + j, y1, mask=m)
        tl.store(base + half + j, y2, mask=m)
        slot = tl.load(Slots + t).to(tl.int64)
        if slot >= 0:
            dst = slot * (HKV * D) + hk * D
            tl.store(KC + dst + j, y1.to(KC.dtype.element_ty), mask=m)
            tl.store(KC + dst + half + j, y2.to(KC.dtype.element_ty), mask=m)
            vb = V + t * stride_vt + hk * D
            tl.store(VC + dst + j, tl.load(vb + j, mask=m, other=0.0), mask=m)
            tl.store(VC + dst + half + j, tl.load(vb + half + j, mask=m, other=0.0), mask=m)


@triton.jit
def _rope_store_partials_kernel(WS, Bias, Qo, Pos, CosSin, KC, VC, Slots, T, N, SPLIT, stride_qt,
                                HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF_P2: tl.constexpr,
                                SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``rope_and_store`` reading the QKV layer's split-K partials ``WS [SPLIT, T, N]`` (fp32) instead of its
    output: one program per (token, q, k or v head) sums its head's columns over the splits (+ bias), rounds to
    the model dtype as the linear would, then rotates (q, k) and stores (q into ``Qo``, k and v into the cache)."""
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half: tl.constexpr = D // 2
    j = tl.arange(0, HALF_P2)
    m = j < half
    s = tl.arange(0, SPLIT_P2)
    sm = (s[:, None] < SPLIT) & m[None, :]
    dtype = Qo.dtype.element_ty
    col = h * D  # q heads, then k heads, then v heads: the fused layer's column order
    slot = tl.load(Slots + t).to(tl.int64)
    if h < HQ or slot >= 0:
        rows = WS + (s[:, None] * T + t) * N + col
        x1 = tl.sum(tl.load(rows + j[None, :], mask=sm, other=0.0), axis=0)
        x2 = tl.sum(tl.load(rows + half + j[None, :], mask=sm, other=0.0), axis=0)
        if HAS_BIAS:
            x1 += tl.load(Bias + col + j, mask=m, other=0.0).to(tl.float32)
            x2 += tl.load(Bias + col + half + j, mask=m, other=0.0).to(tl.float32)
        x1 = x1.to(dtype)
        x2 = x2.to(dtype)
        if h < HQ + HKV:
            pos = tl.load(Pos + t).to(tl.int64)
            c = tl.load(CosSin + pos * D + j, mask=m, other=0.0).to(dtype)
            sn = tl.load(CosSin + pos * D + half + j, mask=m, other=0.0).to(dtype)
            y1 = x1 * c - x2 * sn
            y2 = x2 * c + x1 * sn
            if h < HQ:
                tl.store(Qo + t * stride_qt + col + j, y1, mask=m)
                tl.store(Qo + t * stride_qt + col + half + j, y2, mask=m)
            else:
                dst = slot * (HKV * D) + (h - HQ) * D
                tl.store(KC + dst + j, y1.to(KC.dtype.element_ty), mask=m)
                tl.store(KC + dst + half + j, y2.to(KC.dtype.element_ty), mask=m)
        else:
            dst = slot * (HKV * D) + (h - HQ - HKV) * D
            tl.store(VC + dst + j, x1.to(VC.dtype.element_ty), mask=m)
            tl.store(VC + dst + half + j, x2.to(VC.dtype.element_ty), mask=m)


def rope_and_store_partials(ws, bias, positions, cos_sin, k_cache, v_cache, slot_mapping, num_heads: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """``rope_and_store`` fed by the QKV layer's split-K partials ``ws [split, T, (Hq + 2 Hkv) D]`` (fp32, no bias;
    ``kernels.awq_linear_partials``): the sum over splits happens here, so the linear needs no second launch.
    Returns the rotated q ``[T, Hq, D]``; k and v go to the cache only."""
    split, T, N = ws.shape
    _, _, hkv, d = k_cache.shape
    q = torch.empty(T, num_heads, d, dtype=dtype, device=ws.device)
    if T == 0:
        return q
    # four warps: a program reads split x head_dim fp32 partials (16 KB at split 32), one warp took ~5 us (H100)
    _rope_store_partials_kernel[(T, num_heads + 2 * hkv)](
        ws, bias if bias is not None else ws, q, positions, cos_sin, k_cache, v_cache, slot_mapping, T, N, split,
        q.stride(0), HQ=num_heads, HKV=hkv, D=d, HALF_P2=next_pow2(d // 2), SPLIT_P2=next_pow2(split),
        HAS_BIAS=bias is not None, num_warps=4, **PDL_LAUNCH)
    return q


def rope_and_store(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping):
    """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (views with unit stride inside a token); q, k rotated in place."""
    T, hq, d = q.shape
    hkv = k.shape[1]
    if T == 0:
        return
    _rope_store_kernel[(T, hq + hkv)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, q.stride(0), k.stride(0), v.stride(0),
        HQ=hq, HKV=hkv, D=d, HALF_P2=next_pow2(d // 2), num_warps=1, **PDL_LAUNCH)


@triton.jit
def _online_softmax_block(q, KC, VC, bt, kvh, k_pos, k_ok, allowed, d, d_ok, m_i, l_i, acc, qk_scale,
                          HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    """One block of cached positions ``k_pos`` (``k_ok``: inside the range) gathered through the block table
    ``bt`` into the running (max, sum, output) of an online softmax; ``allowed`` masks scores (causality)."""
    page = tl.load(bt + k_pos // PAGE, mask=k_ok, other=0).to(tl.int64)
    off = (page * PAGE + k_pos % PAGE) * (HKV * D) + kvh * D
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(KC + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(VC + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_attn_kernel(Q, KC, VC, O, BlockTables, CuQ, KvLens, sm_scale,
                       stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                       GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
    pdl_enter()
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(CuQ + seq)
    q_len = tl.load(CuQ + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    kv_len = tl.load(KvLens + seq)
    ctx = kv_len - q_len
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // GROUP_P2
    g = rows % GROUP_P2
    head = kvh * GROUP + g
    row_ok = (tok < q_len) & (g < GROUP)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_ptr = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    kv_end = tl.minimum(kv_len, ctx + (tile + 1) * BLOCK_Q)
    bt = BlockTables + seq.to(tl.int64) * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < kv_end
        m_i, l_i, acc = _online_softmax_block(q, KC, VC, bt, kvh, k_pos, k_ok,
                                              (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :], d, d_ok,
                                              m_i, l_i, acc, qk_scale, HKV, D, PAGE, PRECISION)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptr = O + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_decode_split_kernel(Q, KC, VC, PartO, PartML, BlockTables, KvLens, sm_scale,
                               stride_qt, stride_qh, stride_bt,
                               GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                               BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_Q: tl.constexpr,
                               BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Decode (one query token per sequence), the KV range split ``SPLITS`` ways: program (seq, kv head, split)
    writes its unnormalised output, running max and sum per query head; ``_combine_splits_kernel`` merges them.
    Rows of the ``tl.dot`` tile beyond the group's heads (it needs 16) are padding."""
    pdl_enter()
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    kv_len = tl.load(KvLens + seq)
    per = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), SPLITS) * BLOCK_N  # whole BLOCK_N chunks per split
    start = sp * per
    end = tl.minimum(kv_len, start + per)
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    rows = tl.arange(0, BLOCK_M)
    g = rows % GROUP_P2
    row_ok = (rows < GROUP_P2) & (g < GROUP)
    head = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    bt = BlockTables + seq.to(tl.int64) * stride_bt
    for s0 in range(start, end, BLOCK_N):
        k_pos = s0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < end
        m_i, l_i, acc = _online_softmax_block(q, KC, VC, bt, kvh, k_pos, k_ok, k_ok[None, :], d, d_ok,
                                              m_i, l_i, acc, qk_scale, HKV, D, PAGE, PRECISION)
    part = (seq * (HKV * GROUP) + head).to(tl.int64) * SPLITS + sp  # [T, Hq, SPLITS] flattened
    tl.store(PartO + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(PartML + part * 2, m_i, mask=row_ok)
    tl.store(PartML + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(PartO, PartML, O, stride_ot, stride_oh, HQ: tl.constexpr, D: tl.constexpr,
                           BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """One program per (sequence, query head): the splits' partial softmax sums rescaled to the common max."""
    pdl_enter()  # launched early; the o_proj W4A16 kernel loads its weights meanwhile (kernels/pdl.py)
    seq = tl.program_id(0)
    h = tl.program_id(1)
    base = (seq * HQ + h).to(tl.int64) * SPLITS
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m = tl.load(PartML + (base + sp) * 2)
    l = tl.load(PartML + (base + sp) * 2 + 1)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_all)  # empty splits (max -inf) weigh 0
    l_all = tl.sum(l * w, axis=0)
    l_all = tl.where(l_all == 0.0, 1.0, l_all)
    o = tl.load(PartO + (base + sp)[:, None] * D + d[None, :], mask=d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / l_all
    tl.store(O + seq.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(O.dtype.element_ty), mask=d_ok)


def decode_splits(num_seqs: int, num_kv_heads: int, sms: int) -> int:
    """KV splits for a decode batch: enough programs for about two per SM, at most 16 (1: no split)."""
    want = 2 * sms // max(1, num_seqs * num_kv_heads)
    return 1 if want < 2 else min(16, 1 << (want.bit_length() - 1))


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, max_q_len, scale, out=None,
                    splits: int | None = None):
    """q ``[T, Hq, D]`` packed by sequence (``cu_seqlens_q``); ``kv_lens`` count cached + new tokens.

    ``max_q_len`` only sizes the grid: pass 1 for a decode-only batch (what CUDA graphs capture). A decode
    batch with fewer (sequence, KV head) pairs than SMs splits each KV range (``splits``, default from
    ``decode_splits``): at batch 1, 8 KV heads would keep 8 of 132 SMs busy.
    """
    T, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = hq // hkv
    gp2 = next_pow2(group)
    if out is None:
        out = torch.empty(T, hq, d, dtype=q.dtype, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if max_q_len <= 1 and T == cu_seqlens_q.numel() - 1:
        if splits is None:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
            splits = decode_splits(T, hkv, sms)
        if splits > 1:
            splits = next_pow2(splits)
            part_o = torch.empty(T * hq * splits * d, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(T * hq * splits * 2, dtype=torch.float32, device=q.device)
            _paged_decode_split_kernel[(T, hkv, splits)](
                q, k_cache, v_cache, part_o, part_ml, block_tables, kv_lens, scale,
                q.stride(0), q.stride(1), block_tables.stride(0),
                GROUP=group, GROUP_P2=gp2, HKV=hkv, D=d, BLOCK_D=next_pow2(d), PAGE=page,
                BLOCK_Q=next_pow2(max(1, 16 // gp2)), BLOCK_N=64, SPLITS=splits, PRECISION=precision, num_warps=4,
                num_stages=2, **PDL_LAUNCH)
            _combine_splits_kernel[(T, hq)](part_o, part_ml, out, out.stride(0), out.stride(1), HQ=hq, D=d,
                                            BLOCK_D=next_pow2(d), SPLITS=splits, num_warps=1,
                                            **PDL_LAUNCH)
            return out
    if max_q_len <= 1:
        block_q, block_n, warps = max(1, 16 // gp2), 64, 4
    else:
        block_q, block_n, warps = max(1, 64 // gp2), 64, 4
    block_q = next_pow2(block_q)
    grid = (triton.cdiv(max_q_len, block_q), cu_seqlens_q.numel() - 1, hkv)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, kv_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, GROUP_P2=gp2, HKV=hkv, D=d, BLOCK_D=next_pow2(d), PAGE=page, BLOCK_Q=block_q,
        BLOCK_N=block_n, PRECISION=precision, num_warps=warps, num_stages=2, **PDL_LAUNCH)
    return out
