"""Input checks, kernel choice by M, the tuned-config table, autotuning and warm-up.

Configs are data: a dict ``{"kernel": "gemv" | "splitk" | "gemm" | "dequant", <launch parameters>}``.
They are looked up per key ``(M bucket, N, K, group, dtype)``:

1. the in-process cache (filled by :func:`warmup` / :func:`autotune` or by earlier look-ups),
2. the measured table ``kernels/tuned_h100.json`` (written by ``benchmarks/kernels.py`` on an H100),
3. a default built from the table's measured per-bucket kernel choice (``bucket_kernels``) and default
   launch parameters.

Nothing on the request path ever benchmarks: autotuning happens only in :func:`warmup` (``tune=True``),
:func:`autotune` or the benchmark script.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

Config = dict[str, Any]
Key = tuple[int, int, int, int, str]

TABLE_PATH = Path(os.environ.get("RAYAWQ_KERNEL_TABLE", Path(__file__).with_name("tuned_h100.json")))
M_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
KERNEL_NAMES: tuple[str, ...] = ("gemv", "lanes", "decode", "swap", "splitk", "gemm", "dequant")

# Used only when no table is present (e.g. another card with RAYAWQ_KERNEL_TABLE pointing nowhere); copied from
# the H100 measurement (tuned_h100.json, bucket_kernels), which overrides it whenever it is present.
FALLBACK_BUCKET_KERNELS: dict[int, str] = {
    1: "splitk", 2: "splitk", 4: "splitk", 8: "splitk", 16: "splitk", 32: "splitk", 64: "splitk",
    128: "splitk", 256: "dequant", 512: "dequant", 1024: "dequant", 2048: "dequant", 4096: "dequant",
}

_lock = threading.Lock()
_cache: dict[Key, Config] = {}
_table: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------------------
def check_inputs(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    for_triton: bool = False,
) -> tuple[int, int]:
    """Raise ``TypeError``/``ValueError`` with a clear message for inputs the op can't take; return (K, N)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError("awq_linear: x must be a torch.Tensor")
    allowed = (torch.float16, torch.bfloat16) if for_triton else (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in allowed:
        raise TypeError(f"awq_linear: x must be one of {allowed}, got {x.dtype}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError(f"awq_linear: qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"awq_linear: scales must be fp16, bf16 or fp32, got {scales.dtype}")
    repacked = qweight.dim() == 4  # kernels.awq_repack's fragment order, [N/16, K/64, 32, 4]
    if qzeros.dim() != 2 or scales.dim() != 2 or not (qweight.dim() == 2 or repacked and qweight.shape[2:] == (32, 4)):
        raise ValueError("awq_linear: qzeros and scales must be 2-D, qweight 2-D (AutoAWQ) or [N/16, K/64, 32, 4] "
                         f"(repacked), got qweight {tuple(qweight.shape)}")
    if x.dim() < 1:
        raise ValueError("awq_linear: x must have at least one dimension")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"awq_linear: group_size must be a positive int, got {group_size!r}")
    K, N8 = (qweight.shape[1] * 64, qweight.shape[0] * 2) if repacked else qweight.shape
    N = N8 * 8
    if K % group_size:
        raise ValueError(f"awq_linear: K={K} is not a multiple of group_size={group_size}")
    if x.shape[-1] != K:
        raise ValueError(f"awq_linear: x has {x.shape[-1]} input features, the packed weight has K={K}")
    G = K // group_size
    if tuple(qzeros.shape) != (G, N8):
        raise ValueError(f"awq_linear: qzeros must be [{G}, {N8}] for K={K}, N={N}, group {group_size}; "
                         f"got {tuple(qzeros.shape)}")
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"awq_linear: scales must be [{G}, {N}] for K={K}, N={N}, group {group_size}; "
                         f"got {tuple(scales.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"awq_linear: bias must be [{N}], got {tuple(bias.shape)}")
    devs = {t.device for t in (x, qweight, qzeros, scales) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"awq_linear: all tensors must be on one device, got {sorted(map(str, devs))}")
    if for_triton:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"awq_linear: the Triton kernels take group sizes {GROUP_SIZES}, got {group_size}")
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            if not t.is_contiguous():
                raise ValueError(f"awq_linear: {name} must be contiguous (make it so once, at load time)")
        if bias is not None and not bias.is_contiguous():
            raise ValueError("awq_linear: bias must be contiguous")
    return K, N


# ---------------------------------------------------------------------------------------------------------
# table and configs
# ---------------------------------------------------------------------------------------------------------
def m_bucket(M: int) -> int:
    """Smallest bucket >= M (the last bucket takes everything above it)."""
    for b in M_BUCKETS:
        if M <= b:
            return b
    return M_BUCKETS[-1]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def key_str(key: Key) -> str:
    mb, N, K, g, dt = key
    return f"{dt}/g{g}/K{K}/N{N}/M{mb}"


def load_table(path: Path | None = None) -> dict[str, Any]:
    """The measured table (``{}`` when absent). Cached after the first read."""
    global _table
    if path is not None:
        return json.loads(Path(path).read_text()) if Path(path).exists() else {}
    if _table is None:
        _table = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
    return _table


def bucket_kernels() -> dict[int, str]:
    """Measured kernel choice per M bucket (majority over the benchmark shapes), else the fallback."""
    t = load_table().get("bucket_kernels")
    if not t:
        return dict(FALLBACK_BUCKET_KERNELS)
    return {int(k): v for k, v in t.items()}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_for(tiles: int, num_groups: int, sms: int, waves: float) -> int:
    """Split-K that brings the grid to about ``waves * sms`` programs (each split >= 1 group)."""
    want = max(1, round(waves * sms / max(1, tiles)))
    return max(1, min(want, num_groups))


def default_config(kernel: str, M: int, N: int, K: int, group: int, sms: int) -> Config:
    """Launch parameters used when the table has no entry for the key."""
    G = K // group
    mb = m_bucket(M)
    if kernel == "gemv":
        bn = 128
        tiles = -(-N // bn) * M
        return {"kernel": "gemv", "BLOCK_N": bn, "split_k": split_for(tiles, G, sms, 4), "num_warps": 8}
    if kernel == "lanes":
        tiles = -(-N // 256)
        return {"kernel": "lanes", "BLOCK_J": 32, "BLOCK_K": 16, "split_k": split_for(tiles, G, sms, 4),
                "num_warps": 4}
    if kernel == "decode":
        tiles = -(-N // 512) * M
        return {"kernel": "decode", "ROWS": True, "BLOCK_M": min(2, M), "BLOCK_J": 64, "DEPTH": 1,
                "split_k": split_for(tiles, G, sms, 8), "num_warps": 2}
    if kernel == "swap":
        bm = min(64, max(16, mb))
        tiles = -(-N // 128) * -(-M // bm)
        return {"kernel": "swap", "BLOCK_M": bm, "BLOCK_N": 128, "split_k": split_for(tiles, G, sms, 2),
                "num_warps": 8}
    if kernel == "splitk":
        bm = min(64, max(16, mb))
        bn = 128
        tiles = -(-N // bn) * -(-M // bm)
        return {"kernel": "splitk", "BLOCK_M": bm, "BLOCK_N": bn, "split_k": split_for(tiles, G, sms, 2),
                "SCALE_AFTER": True, "PREFETCH": 1, "X_IN_REGS": True, "num_warps": 8, "num_stages": 1}
    if kernel == "gemm":
        bm = 64 if mb <= 64 else 128
        return {"kernel": "gemm", "BLOCK_M": bm, "BLOCK_N": 128, "split_k": 1, "SCALE_AFTER": False,
                "PREFETCH": 0, "X_IN_REGS": True, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    if kernel == "dequant":
        return {"kernel": "dequant", "BLOCK_N": 128, "num_warps": 4}
    raise ValueError(f"unknown kernel {kernel!r}")


def candidates(M: int, N: int, K: int, group: int, sms: int) -> list[Config]:
    """The pruned search space for one key: a few tile shapes per kernel, split-K set by target waves.

    Pruned with the sm_90 compiler's resource report: tiles that spill (e.g. 128x256, or 128x128 with the
    factored scale) are not offered.
    """
    G = K // group
    mb = m_bucket(M)
    out: list[Config] = []
    # Pruned by the H100 runs (fd50715, a0b5208; docs/benchmarks.md): the CUDA-core GEMV (``gemv``) and the
    # lane-layout GEMV (``lanes``) lost on every shape and M <= 8, the decode kernel lost to ``swap`` at
    # M = 2 and 4, the tiled decode variant with per-row sums (ACC2D) never won, and ``gemm`` lost to ``splitk``
    # at M = 64. They stay runnable through an explicit config (and are tested), but the tuning space, which
    # every benchmark run and ``--tune`` walks, no longer pays for them.
    if mb == 1:
        # the register-only decode GEMV (awq_gemv_decode): one packed word per thread, K down the rows
        # (BLOCK_J = 32 x num_warps). ROWS: one 1-D load per K row, FMA chains, ~64 registers (many warps per
        # SM); otherwise a [BLOCK_K, BLOCK_J] tile per step with a per-step reduction. Each config compiles
        # once per N (N8 is a compile-time constant, for immediate row offsets). DEPTH 2 keeps two steps of
        # loads in flight (within 5% of DEPTH 1 on the H100, either way).
        # Narrow shapes (N = 4096: 512 words) get few column tiles, so more programs (BLOCK_J 64, 16 waves)
        # are offered to put more loads in flight per SM; DEPTH 2 only with the widest tile.
        # Several adjacent words per thread (BLOCK_J 128 or 64 on one warp, 16- / 8-byte loads) lost 1.3-2.4x
        # on every shape (7a48f0d); splitting inside groups for more programs lost too (f5f0a8a, reverted).
        # Split-K partials are summed by a second launch (TAIL 0): on the H100 that beat the in-kernel tail (the
        # last program of each column tile summing in rounds) on every shape and config tried, by 4-9 us
        # (benchmarks/decode_tail.py); the old tail is kept as one reference config.
        for bj, warps in ((128, 4), (64, 2), (32, 1)):
            tiles = -(-N // (8 * bj))
            for waves in (4, 8, 16):
                for depth in ((1, 2) if bj == 128 and waves < 16 else (1,)):
                    out.append({"kernel": "decode", "ROWS": True, "BLOCK_M": 1, "BLOCK_J": bj, "DEPTH": depth,
                                "split_k": split_for(tiles, G, sms, waves), "num_warps": warps, "TAIL": 0})
        out.append({"kernel": "decode", "ROWS": True, "BLOCK_M": 1, "BLOCK_J": 32, "DEPTH": 1,
                    "split_k": split_for(-(-N // 256), G, sms, 16), "num_warps": 1, "TAIL": 4})
        tiles = -(-N // (8 * 128))
        out.append({"kernel": "decode", "BLOCK_J": 128, "BLOCK_K": 16, "ACC2D": False, "PREFETCH": True,
                    "split_k": split_for(tiles, G, sms, 2), "num_warps": 4})
    if mb <= 2:
        # KW warps share each group's rows (one reduction across warps per program): KW times the warps of a
        # ROWS program at the same split. Nsight Compute put the one-warp ROWS winners at 3.2 active warps per
        # scheduler and 1.29 TB/s on 4096x14336 (0c00891 table); with the in-kernel tail KW 2 won three of six
        # shapes by 2-7 % (038a857), KW 8 lost everywhere; with the two-launch sum KW 2/4 won 4 of 6.
        for kw in (2, 4):
            if group % (8 * kw) == 0:
                tiles = -(-N // 256)
                for waves in ((4, 8, 16) if mb == 1 else (8, 16)):
                    out.append({"kernel": "decode", "KW": kw, "BLOCK_J": 32,
                                "split_k": split_for(tiles, G, sms, waves), "TAIL": 0})
    # Measured on the H100 and left out of the space (runnable through an explicit config, tested):
    # * ``swap`` with ZSUB (zero points off per pair before the MMA): 25-35 % fewer instructions per weight in
    #   the sm_90 SASS, but 1.9-2.2 us slower than plain ``swap`` at M = 16 and slower than ``decode`` at M = 1
    #   (kernels_results_h100_zsub_m1-64.json): the swap kernel's time is its per-group latency chain.
    if 2 <= mb <= 64:
        # operands swapped (W^T x^T): wgmma with the batch as its N and the weight tile as A (awq_dot_swap);
        # the H100 winner at M = 2..32 on every shape measured (a0b5208)
        bm = min(64, max(16, mb))
        for bn in (128, 256):
            tiles = -(-N // bn) * -(-M // bm)
            for waves in (1, 2):
                # the split-K sum as a second launch: within 2 % of the in-kernel tail for swap at M = 2-64
                # (34eb598), slightly ahead on 10 of 14 shapes at M = 2 and 16
                out.append({"kernel": "swap", "BLOCK_M": bm, "BLOCK_N": bn,
                            "split_k": split_for(tiles, G, sms, waves), "num_warps": 8, "TAIL": 0})
    if mb <= 128:
        bm = min(64, max(16, mb))
        # (BLOCK_N, warps, lookahead): lookahead L keeps L groups of loads in flight per program; registers
        # (sm_90 report) allow 1 CTA/SM at BLOCK_N 256 with L=3, i.e. 48 KB in flight per SM.
        # below M = 64 it is a fallback behind decode/swap: two tile shapes instead of five
        shapes = ((128, 8, 1), (256, 8, 2)) if mb <= 32 and bm <= 16 else \
            ((128, 8, 1), (128, 8, 2), (256, 8, 2), (256, 8, 3), (64, 4, 3)) if bm <= 16 else \
            ((64, 4, 1), (64, 4, 2), (128, 8, 1), (128, 8, 2))
        for bn, warps, la in shapes:
            tiles = -(-N // bn) * -(-M // bm)
            for waves in (1, 2):
                # ZSUB (q - z per pair before the MMA, no per-group sum over x across threads): 4-9 % faster at
                # M = 64-128, 1-2 us slower at M <= 16 on the H100 (kernels_results_h100_zsub_*.json)
                for zsub in ((False, True) if bm >= 32 else (False,)):
                    out.append({"kernel": "splitk", "BLOCK_M": bm, "BLOCK_N": bn,
                                "split_k": split_for(tiles, G, sms, waves), "SCALE_AFTER": True, "PREFETCH": la,
                                "X_IN_REGS": True, "num_warps": warps, "num_stages": 1, "ZSUB": zsub})
        tiles = -(-N // 64) * -(-M // bm)
        out.append({"kernel": "splitk", "BLOCK_M": bm, "BLOCK_N": 64, "split_k": split_for(tiles, G, sms, 2),
                    "SCALE_AFTER": True, "PREFETCH": 1, "X_IN_REGS": False, "num_warps": 4, "num_stages": 3})
    if mb >= 128:
        for bm, bn, warps, stages, sa, pf, xr in ((128, 128, 8, 3, False, 0, True), (128, 128, 8, 3, False, 1, False),
                                                  (128, 128, 8, 3, False, 2, False), (64, 128, 8, 3, False, 2, False),
                                                  (64, 128, 8, 3, True, 2, False), (64, 128, 8, 3, False, 0, True)):
            # ZSUB: the weight made as (q - z) * s by paired 16-bit instructions; won only 8192x8192 at M = 128
            # among gemm configs (102.5 vs 132.6 us), lost 3-5 % at M = 256-1024
            for zsub in ((False, True) if mb == 128 else (False,)):
                out.append({"kernel": "gemm", "BLOCK_M": bm, "BLOCK_N": bn, "split_k": 1, "SCALE_AFTER": sa,
                            "PREFETCH": pf, "X_IN_REGS": xr, "GROUP_M": 8, "num_warps": warps, "num_stages": stages,
                            "ZSUB": zsub})
    if mb >= 128:
        out.append({"kernel": "dequant", "BLOCK_N": 128, "num_warps": 4})
    uniq: list[Config] = []
    for c in out:
        if c not in uniq:
            uniq.append(c)
    return uniq


def select_config(M: int, N: int, K: int, group: int, dtype: torch.dtype, device: torch.device) -> Config:
    """Config for one call: cache → measured table → default. Never benchmarks. fp16 reads the table's bf16 entry
    where it has none of its own: the kernels are the same but for the unpacking constant and the MMA's input type,
    and the table is measured in bf16."""
    key: Key = (m_bucket(M), N, K, group, _dtype_name(dtype))
    cfg = _cache.get(key)
    if cfg is not None:
        return cfg
    with _lock:
        configs = load_table().get("configs", {})
        cfg = configs.get(key_str(key)) or configs.get(key_str((*key[:4], "bf16")))
        if cfg is None:
            kernel = bucket_kernels().get(key[0], "dequant")
            cfg = default_config(kernel, M, N, K, group, num_sms(device))
        _cache[key] = dict(cfg)
    return _cache[key]


def set_config(M: int, N: int, K: int, group: int, dtype: torch.dtype, cfg: Config) -> None:
    """Pin a config in the in-process cache (used by autotuning and tests)."""
    _cache[(m_bucket(M), N, K, group, _dtype_name(dtype))] = dict(cfg)


def clear_cache() -> None:
    global _table
    _cache.clear()
    _table = None


def split_partials(cfg: Config, K: int, group: int) -> int:
    """How many fp32 split-K partials ``cfg`` leaves for a second launch to sum (0: it writes the output)."""
    from .awq_triton import _split_args

    if cfg["kernel"] not in ("decode", "swap", "splitk", "gemm") or cfg.get("TAIL", 4) != 0:
        return 0
    split = _split_args(K // group, cfg.get("split_k", 1))[0]
    return split if split > 1 else 0


def run_config(cfg: Config, x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               act: str | None = None) -> torch.Tensor:
    """Launch one config on a 2-D ``x2`` (unit column stride); ``act`` see :mod:`kernels.epilogue`."""
    from . import awq_triton as at
    from .epilogue import silu_mul

    kw = {k: v for k, v in cfg.items() if k != "kernel"}
    kernel = cfg["kernel"]
    if kernel == "swap":
        from .awq_dot_swap import dot_swap

        return dot_swap(x2, qweight, qzeros, scales, group_size, bias, out=out, act=act, **kw)
    if kernel == "decode":
        from .awq_gemv_decode import gemv_decode

        return gemv_decode(x2, qweight, qzeros, scales, group_size, bias, out=out, act=act, **kw)
    if kernel in ("splitk", "gemm"):
        return at.dot(x2, qweight, qzeros, scales, group_size, bias, out=out, act=act, **kw)
    if kernel == "gemv":
        y = at.gemv(x2, qweight, qzeros, scales, group_size, bias, out=out, **kw)
    elif kernel == "lanes":
        from .awq_gemv_lanes import lanes

        y = lanes(x2, qweight, qzeros, scales, group_size, bias, out=out, **kw)
    elif kernel == "dequant":
        y = at.dequant_matmul(x2, qweight, qzeros, scales, group_size, bias, out=out, **kw)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    if act == "partials":
        raise ValueError(f"kernel {kernel!r} leaves no split-K partials")
    return y if act is None else silu_mul(y)


# ---------------------------------------------------------------------------------------------------------
# autotuning and warm-up
# ---------------------------------------------------------------------------------------------------------
def random_awq(K: int, N: int, group: int, dtype: torch.dtype, device: torch.device | str,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed weights in the AutoAWQ layout (speed does not depend on the values)."""
    lo, hi = -(2**31), 2**31 - 1
    qw = torch.randint(lo, hi, (K, N // 8), dtype=torch.int32, device=device, generator=generator)
    qz = torch.randint(lo, hi, (K // group, N // 8), dtype=torch.int32, device=device, generator=generator)
    sc = (torch.rand((K // group, N), device=device, generator=generator) * 0.02 + 0.001).to(dtype)
    return qw, qz, sc


def autotune(M: int, N: int, K: int, group: int, dtype: torch.dtype, device: torch.device | str = "cuda",
             configs: Sequence[Config] | None = None, timer: Callable[..., float] | None = None) -> tuple[Config, list]:
    """Time every candidate for one key (CUDA graphs, cold L2), pin and return the fastest."""
    from .timing import time_op

    device = torch.device(device)
    configs = list(configs) if configs is not None else candidates(M, N, K, group, num_sms(device))
    timer = timer or time_op
    results = []
    for cfg in configs:
        try:
            us = timer(lambda x, w: run_config(cfg, x, *w, group), M, N, K, group, dtype, device)
        except Exception as e:  # a config that does not compile (e.g. out of shared memory) is skipped
            us = float("inf")
            cfg = {**cfg, "error": f"{type(e).__name__}: {e}"[:200]}
        results.append((us, cfg))
    best = min(results, key=lambda r: r[0])
    if best[0] == float("inf"):
        raise RuntimeError(f"autotune: no config ran for M={M} N={N} K={K} g={group}: {results[:2]}")
    set_config(M, N, K, group, dtype, best[1])
    return best[1], results


def warmup(shapes: Iterable[tuple[int, int]], group_size: int = 128, dtype: torch.dtype = torch.bfloat16,
           device: torch.device | str = "cuda", m_values: Iterable[int] = M_BUCKETS, tune: bool = False) -> None:
    """Fill the config cache and compile every kernel a server will launch, before serving.

    ``shapes`` are ``(K, N)`` of the model's linears. With ``tune=True`` every key missing from the measured
    table is autotuned here (seconds per key); otherwise table entries or defaults are used. Also creates
    the split-K counter buffer, so that later CUDA-graph capture allocates nothing persistent.
    """
    from .awq_triton import MAX_TILES, tile_counters

    device = torch.device(device)
    tile_counters(device, MAX_TILES)
    table = load_table().get("configs", {})
    for K, N in shapes:
        qw, qz, sc = random_awq(K, N, group_size, dtype, device)
        for M in m_values:
            key = (m_bucket(M), N, K, group_size, _dtype_name(dtype))
            if tune and key_str(key) not in table and key not in _cache:
                autotune(M, N, K, group_size, dtype, device)
            cfg = select_config(M, N, K, group_size, dtype, device)
            x = torch.randn(M, K, dtype=dtype, device=device)
            run_config(cfg, x, qw, qz, sc, group_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
