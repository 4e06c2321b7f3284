"""Kernel choice for weights in the fragment-repacked layout (:mod:`kernels.awq_repack`): one copy serves every M.

Why: on an H100 the kernels that read the repacked words are as fast as or faster than the AutoAWQ-layout
kernels at every batch size measured (``docs/benchmarks.md``, repacked section): the register-operand Gluon
kernel up to 16-32 rows (1.05-1.9x), the warpgroup-MMA kernel at 32 rows, the pipelined register-A ``wgmma``
kernel (:mod:`kernels.awq_gluon_pipelined`) from 64 rows up (1.3-2x at 64-128 rows, 0.8-1.1x of cuBLAS from 256),
where dequantize + cuBLAS was 0.5-0.9x.
The measured best config per (K, N, M bucket) at group 128 is kept per card in ``tuned_repacked_<card>.json``
(``h100``, ``h200``: the card's own entries first, then the H100's); other shapes get a rule sized by the number of
programs (the measured winners keep ~400-1800 programs in flight).

Requirements (:func:`supported`): an sm_90 GPU (warpgroup MMA), Triton with Gluon, bf16 or fp16 activations (scales
in the same dtype), N a multiple of 128, K of 64, groups of 32, 64 or 128. The tables were measured in bf16 and
serve fp16 too: the kernels' builds differ only in the unpacking constant and the MMA's input type (same MMAs
and loads, registers equal or fewer: ``tests/test_gluon_builds.py``); where fewer registers changed the winner, fp16
has an entry of its own (a ``/fp16`` key). ``benchmarks/kernels.py --dtype float16`` times the table on fp16. CPU: a torch reference on the unpacked codes.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from .awq_layout import pack_int4
from .awq_repack import fragments_to_codes, repack_awq
from .reference import awq_linear_reference

DTYPES = (torch.bfloat16, torch.float16)  # what the Gluon kernels take (one table serves both)
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)  # the M values benchmarks/kernels.py measures
CARDS = ("h100", "h200")  # cards with a measured table; any other sm_90 GPU reads the H100's
TABLE = Path(__file__).with_name("tuned_repacked_h100.json")  # the reference table (and every other card's fallback)


def table_path(card: str = "h100") -> Path:
    """The measured table of ``card`` (one of :data:`CARDS`)."""
    return Path(__file__).with_name(f"tuned_repacked_{card}.json")


def card_of(device_name: str) -> str:
    """The table card for a CUDA device name ('NVIDIA H200' -> 'h200'); 'h100' for any card without a table."""
    return next((c for c in CARDS if c in device_name.lower()), "h100")


@functools.lru_cache(maxsize=None)
def _current_card() -> str:
    return card_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else "h100"


def bucket(M: int) -> int:
    """The measured row count that stands for ``M`` (the next one up, 1024 beyond)."""
    return next((b for b in BUCKETS if M <= b), BUCKETS[-1])


def parse_key(key: str) -> tuple[int, int, int, str | None]:
    """A table key ``K{K}/N{N}/M{M}`` (or ``.../fp16``, an entry for fp16 activations only) -> ``(K, N, M, dtype
    name or None)``."""
    parts = key.split("/")
    return int(parts[0][1:]), int(parts[1][1:]), int(parts[2][1:]), (parts[3] if len(parts) > 3 else None)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()).get("configs", {}) if path.exists() else {}


@functools.lru_cache(maxsize=None)
def _table(card: str = "h100") -> dict:
    """Entries measured on ``card``, over the H100's (a shape the card's probe has not measured keeps the H100's)."""
    return {**_read(TABLE), **(_read(table_path(card)) if card != "h100" else {})}


@functools.lru_cache(maxsize=None)
def _gluon_ok() -> bool:
    try:
        from . import awq_gluon_mma, awq_gluon_pipelined, awq_gluon_wgmma  # noqa: F401
    except Exception:  # Triton without Gluon, or an API it lacks
        return False
    return True


def supported(K: int, N: int, group_size: int, dtype: torch.dtype, device: torch.device | str) -> bool:
    """True where :func:`repack` + :func:`linear` beat the AutoAWQ-layout kernels (see module doc)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in DTYPES or group_size not in (32, 64, 128):
        return False
    if K % 64 or K % group_size or N % 128:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0) and _gluon_ok()


def repack(qweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ ``qweight [K, N/8]`` -> the repacked ``[N/16, K/64, 32, 4]`` words (same device)."""
    return repack_awq(qweight)


def _split_for(programs_per_split: int, target: int, cap: int = 16) -> int:
    """The smallest split in 1, 2, 4, ... ``cap`` that reaches ``target`` programs."""
    split = 1
    while programs_per_split * split < target and split < cap:
        split *= 2
    return split


def select(M: int, N: int, K: int, group_size: int, dtype: torch.dtype = torch.bfloat16,
           card: str | None = None) -> dict:
    """The kernel and config for ``M`` rows: the measured table's entry of ``card`` (default: this process's GPU;
    group 128), else the rule. bf16 and fp16 share both (fp16 reads a ``K../N../M../fp16`` entry first, where one
    was measured); other dtypes get the ``tl.dot`` kernel / dequantize + cuBLAS."""
    if dtype not in DTYPES:
        return {"kernel": "dot", "BM": 64, "BN": 64, "split_k": 1} if M <= 128 else {"kernel": "dequant"}
    b = bucket(M)
    if group_size == 128:
        table, key = _table(card or _current_card()), f"K{K}/N{N}/M{b}"
        # an fp16 entry where fp16 measured another winner (its build can take fewer registers than bf16's)
        cfg = table.get(key + "/fp16") if dtype == torch.float16 else None
        cfg = cfg if cfg is not None else table.get(key)
        if cfg is not None:
            return {k: v for k, v in cfg.items() if k != "us"}
    if b <= 8:
        return {"kernel": "gluon", "T": 2, "num_warps": 4, "SCALED": True, "TAIL": False,
                "split_k": _split_for(N // 128, 800)}
    if b <= 16:  # the H200 winners on all four probed shapes: 4 warps, split 8 (16 where K >= 14336)
        return {"kernel": "gluon", "BM": 16, "T": 1, "num_warps": 4, "SCALED": True, "TAIL": False,
                "split_k": 16 if K >= 14336 else 8}
    if b <= 32:
        return {"kernel": "wgmma", "BN": 64, "split_k": _split_for(N // 64 * math.ceil(M / 64), 400)}
    if b <= 128:  # 64-row tiles up to 64 rows, 128 above; split until ~400 / ~200 programs (probe winners)
        bb = 64 if b <= 64 else 128
        return _paired(_register_tail({"kernel": "pipelined", "BB": bb, "W": 4, "T": 1, "STAGES": 4, "DEPTH": 0,
                                       "split_k": _split_for(N // 64 * math.ceil(M / bb), 400 if b <= 64 else 200,
                                                             cap=8)}), group_size)
    if b <= 256:  # one warpgroup per program, two programs per SM
        return _register_tail({"kernel": "pipelined", "BB": 256, "W": 4, "T": 1, "STAGES": 3, "DEPTH": 1,
                               "split_k": _split_for(N // 64, 200, cap=2)})
    # prefill: two warpgroups share each x tile; no bf16 copy of the weights (dequantize + cuBLAS needs K x N
    # bf16 of scratch and was within 1-3 % either way at 4096 rows)
    return {"kernel": "pipelined", "BB": 256, "W": 8, "T": 1, "STAGES": 4, "DEPTH": 1, "split_k": 1}


def _register_tail(cfg: dict) -> dict:
    """A split pipelined config sums its splits in the last split's registers (``TAIL = 2``: in the H200 probes
    0.6-12 us ahead of a second launch at 64 and 256 rows wherever a split won, and on 3 of 4 shapes at 128)."""
    return {**cfg, "TAIL": 2} if cfg["split_k"] > 1 else cfg


def _paired(cfg: dict, group_size: int) -> dict:
    """A one-warpgroup pipelined config at 64-128 rows fills x's buffers two steps at a time (``PAIR``, group 128:
    64-feature steps) -- in the H200 probe 2.5-3.9 % faster at 128 rows on all four shapes, within 1 % at 64; the
    two-warpgroup tiles lost 2-45 % with it and keep one step per buffer."""
    return {**cfg, "PAIR": True} if group_size == 128 else cfg


def _staged(cfg: dict) -> dict:
    """A small-M Gluon config with x staged in shared memory (``XGROUPS``: the split at once where it fits): in
    the H200 probe 6-28 % faster for one and four tiles per warp at M = 1, 2-20 % slower for two (a program per SM
    lost to registers or shared memory), either way by config at 16 rows (docs/kernels_notes.md)."""
    return {**cfg, "XGROUPS": 64}


def pipelined_slots(BB: int, W: int, STAGES: int) -> int:
    """Programs of a pipelined config one SM holds (its ``SLOTS``, for the last-wave split): two for one warpgroup
    on 256-row tiles with three x buffers (253 registers, 98 KB of shared memory: Nsight Compute's block limit on
    the H200), else one, the count that is sure (a config that fits more splits fewer tiles than it could)."""
    return 2 if (BB, W, STAGES) == (256, 4, 3) else 1


def candidates(M: int, N: int, K: int, group_size: int) -> list[dict]:
    """The pruned config space ``benchmarks/kernels.py`` times for ``M`` rows (bf16 or fp16; the families and ranges
    that won in ``benchmarks/gluon_probe.py``), :func:`select`'s choice first; every entry fits ``N``."""
    b = bucket(M)
    out = [select(M, N, K, group_size)]
    if b <= 8:
        out += [{"kernel": "gluon", "T": t, "num_warps": w, "split_k": s, "SCALED": sc, "TAIL": False}
                for t, w in ((2, 4), (4, 4), (1, 8)) for s in (4, 8, 16) for sc in (True, False)]
        out += [{"kernel": "gluon", "T": t, "num_warps": 4, "split_k": s, "SCALED": True, "TAIL": tail}
                for t, s in ((1, 8), (1, 16), (2, 28)) for tail in (True, False)]
        out += [{"kernel": "gluon", "T": t, "num_warps": 4, "split_k": s, "SCALED": True, "TAIL": 2}
                for t in (1, 2) for s in (4, 8, 16)]
    elif b <= 16:
        out += [{"kernel": "gluon", "BM": 16, "T": t, "num_warps": w, "split_k": s, "SCALED": sc}
                for t, w in ((2, 4), (1, 8)) for s in (2, 4, 8, 16) for sc in (True, False)]
        out += [{"kernel": "gluon", "BM": 16, "T": t, "num_warps": w, "split_k": s, "SCALED": True, "TAIL": False}
                for t, w in ((1, 4), (1, 8)) for s in (8, 16)]
        out += [{"kernel": "gluon", "BM": 16, "T": t, "num_warps": 4, "split_k": s, "SCALED": True, "TAIL": 2}
                for t in (1, 2) for s in (4, 8, 16)]
        out += [{"kernel": "wgmma", "BN": 64, "split_k": s} for s in (4, 8)]
    if b <= 16:
        staged = [_staged(c) for c in out if c["kernel"] == "gluon" and c["T"] != 2]
        if b <= 8:  # unscaled, the next step's words requested early: three of the H200 table's M = 1 winners
            staged += [{**_staged(c), "PREFETCH": True} for c in out if c["kernel"] == "gluon" and not c["SCALED"]]
        out += staged
    elif b <= 128:
        if b <= 32:
            out += [{"kernel": "gluon", "BM": 32, "T": t, "num_warps": 4, "split_k": s, "SCALED": True}
                    for t in (1, 2) for s in (1, 2, 4)]
            out += [{"kernel": "wgmma", "BN": bn, "split_k": s} for bn in (64, 128) for s in (1, 2, 4, 8, 16)]
        else:
            out += [{"kernel": "wgmma", "BN": 64, "split_k": s} for s in (2, 4, 8)]
        tiles = ((64, 4, 1, 4), (64, 8, 1, 4), (64, 4, 2, 4)) if b <= 64 else ((128, 4, 1, 4), (128, 8, 1, 4),
                                                                                 (128, 4, 2, 4))
        pipe = [{"kernel": "pipelined", "BB": bb, "W": w, "T": t, "STAGES": st, "DEPTH": d, "split_k": s,
                 **({"TAIL": tail} if tail else {})}
                for bb, w, t, st in tiles for s in (1, 2, 4, 8) for d in (0, 1)
                for tail in ((0, 1, 2) if s > 1 else (0,))]
        out += pipe + [_paired(c, group_size) for c in pipe if c["W"] == 4]
    else:
        out += [{"kernel": "dequant"}] + [{"kernel": "dequant", "NK": 1, "BN": bn, "num_warps": w}
                                          for bn, w in ((64, 4), (128, 8))]
        tiles = ((256, 4, 1, 3), (256, 8, 1, 4), (128, 8, 1, 4), (128, 4, 2, 4)) if b <= 256 else (
            (256, 8, 1, 4), (256, 8, 1, 3), (128, 8, 2, 3), (128, 4, 2, 4))
        out += [{"kernel": "pipelined", "BB": bb, "W": w, "T": t, "STAGES": st, "DEPTH": 1, "split_k": s,
                 **({"TAIL": tail} if tail else {})}
                for bb, w, t, st in tiles for s in ((1, 2, 4) if b <= 256 else (1,))
                for tail in ((0, 1, 2) if s > 1 else (0,))]
        out += [{"kernel": "pipelined", "BB": bb, "W": w, "T": t, "STAGES": st, "DEPTH": 1, "split_k": 1,
                 "SLOTS": pipelined_slots(bb, w, st)} for bb, w, t, st in tiles]
    fits = [c for c in out if (c["kernel"] != "gluon" or N % (16 * c["num_warps"] * c["T"]) == 0)
            and (c["kernel"] != "wgmma" or N % c["BN"] == 0)
            and (c["kernel"] != "pipelined" or N % (16 * c["W"] * c["T"]) == 0)]
    return list({json.dumps(c, sort_keys=True): c for c in fits}.values())


def run(cfg: dict, x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
        group_size: int, bias: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
    """Launch ``cfg`` (from :func:`select`) on ``x2 [M, K]``; ``act`` (``"silu_mul"`` or ``"partials"``, only where
    :func:`leaves_partials`): see :func:`kernels.awq_triton.finish_split`."""
    kw = {k: v for k, v in cfg.items() if k != "kernel"}
    kernel = cfg["kernel"]
    if kernel == "gluon":
        from .awq_gluon_mma import gluon_mma

        return gluon_mma(x2, packed, qzeros, scales, group_size, bias, act=act, **kw)
    if kernel == "wgmma":
        from .awq_gluon_wgmma import gluon_wgmma

        return gluon_wgmma(x2, packed, qzeros, scales, group_size, bias, act=act, **kw)
    if kernel == "pipelined":
        from .awq_gluon_pipelined import gluon_pipelined

        return gluon_pipelined(x2, packed, qzeros, scales, group_size, bias, act=act, **kw)
    from .awq_repacked_dot import dequant_matmul_repacked, dot_repacked
    from .awq_triton import finish_split

    if kernel == "dot":
        return dot_repacked(x2, packed, qzeros, scales, group_size, bias, act=act, **kw)
    if kernel == "dequant":
        y = dequant_matmul_repacked(x2, packed, qzeros, scales, group_size, bias, **kw)
        return finish_split(y, y, bias, False, act)
    raise ValueError(f"unknown kernel {kernel!r} for repacked weights (gluon, wgmma, pipelined, dot or "
                     "dequant)")


def leaves_partials(cfg: dict, K: int, group_size: int) -> bool:
    """Whether ``cfg`` sums its split-K partials in a launch of its own (so ``act="partials"`` can hand them to the
    output's consumer instead)."""
    from .awq_triton import _split_args

    default_tail = {"gluon": 1, "pipelined": 0, "wgmma": 0, "dot": 0}
    if cfg["kernel"] not in default_tail or cfg.get("TAIL", default_tail[cfg["kernel"]]):
        return False
    if cfg["kernel"] == "dot" and not (cfg.get("SCALE_AFTER", True) and group_size >= 64):
        return _split_args(K // 64, cfg.get("split_k", 1))[0] > 1
    return _split_args(K // group_size, cfg.get("split_k", 1))[0] > 1


def linear(x2: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
           bias: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W (+ bias)`` on repacked weights, the kernel chosen by ``M`` (CUDA); ``act`` as in :func:`run`."""
    M, K = x2.shape
    cfg = select(M, scales.shape[1], K, group_size, x2.dtype)
    return run(cfg, x2, packed, qzeros, scales, group_size, bias, act)


def reference(x: torch.Tensor, packed: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference (CPU inference, tests): the AutoAWQ reference on the words packed back, so both layouts
    give the same result bit for bit."""
    return awq_linear_reference(x, pack_int4(fragments_to_codes(packed)), qzeros, scales, group_size, bias)


def warmup(shapes, group_size: int, device: torch.device | str = "cuda", max_rows: int = 4096,
           dtype: torch.dtype = torch.bfloat16) -> int:
    """Compile every kernel config :func:`select` picks for the repacked ``(K, N)`` ``shapes`` at each measured
    row count up to ``max_rows`` (prefill included), for activations of ``dtype``, so no Gluon kernel compiles on
    a request; returns the number of launches. Weights and inputs are random: only the launches matter."""
    from .dispatch import random_awq

    device = torch.device(device)
    launches = 0
    for K, N in shapes:
        qw, qz, sc = random_awq(K, N, group_size, dtype, device)
        packed, seen = repack(qw), set()
        for b in [b for b in BUCKETS if b <= max(1, max_rows)]:
            cfg = select(b, N, K, group_size, dtype)
            if json.dumps(cfg, sort_keys=True) in seen:
                continue
            seen.add(json.dumps(cfg, sort_keys=True))
            for m in {b, max(1, b - 1)}:  # kernels outside Gluon specialize on M % 16: both kinds of M
                run(cfg, torch.randn(m, K, dtype=dtype, device=device), packed, qz, sc, group_size)
                launches += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launches
