"""Probe of the fragment-repacked Gluon kernel (``kernels/awq_gluon_mma.py``) on one GPU, side by side in one call.

    RAYAWQ_COMMIT=<hash> python3 benchmarks/gluon_probe.py --out $OUT

For each of the issue's four large shapes and M in ``--ms``: correctness of ``gluon_mma`` against an fp64
reference (fresh inputs, poisoned output), then cold-L2 median µs (``kernels.timing``) of a few ``gluon_mma``
configs, the dispatcher's measured config for the AutoAWQ layout (the product path), PyTorch's int4 kernel and
cuBLAS. Writes ``gluon_probe.json`` under ``--out``.

``read_us`` is the floor the memory system allows in the same harness: the best of a plain streaming-read kernel
(a sweep of programs and block sizes) and ``torch.sum`` over a buffer of the layer's bytes (words, scales,
zeros), cold L2, in a graph like the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.kernels import int4pack_sets, ref_fp64, rel_err  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.awq_gluon_mma import gluon_mma  # noqa: E402
from kernels.awq_repack import repack_awq  # noqa: E402
from kernels.timing import sets_needed, time_calls  # noqa: E402

SHAPES = [(4096, 14336), (8192, 8192), (14336, 4096), (8192, 28672)]
G = 128


@triton.jit
def _stream_read(p, out, n_words, ITERS, BLOCK: tl.constexpr):
    """Each program reads ``ITERS`` consecutive blocks of 16-byte-aligned words and xors them (one store)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(acc, 0))


def read_floor(nbytes: int) -> tuple[float, str]:
    """Best cold-L2 µs to read ``nbytes`` once: streaming kernel sweep and ``torch.sum``; (µs, how)."""
    words = -(-nbytes // 4)
    bufs = [torch.randint(0, 1 << 30, (words,), device="cuda", dtype=torch.int32) for _ in range(sets_needed(nbytes))]
    out = torch.empty(1 << 16, device="cuda", dtype=torch.int32)
    best = (time_calls([lambda b=b: b.view(torch.float16).sum() for b in bufs]), "torch.sum")
    for block, warps in ((1024, 4), (2048, 8), (4096, 8)):
        for programs in (132, 264, 528, 1056, 2112, 4224):
            iters = triton.cdiv(words, block * programs)
            grid = (triton.cdiv(words, block * iters),)
            us = time_calls([lambda b=b: _stream_read[grid](b, out, words, iters, BLOCK=block, num_warps=warps)
                             for b in bufs])
            if us < best[0]:
                best = (us, f"stream {grid[0]} programs x {block} words, {warps} warps")
    return best


def gluon_configs(M: int, N: int) -> list[dict]:
    """The probe's Gluon configs for ``M`` rows (register-lean ones: BM 16 with T 4 spills on sm_90)."""
    if M <= 8:
        cfgs = [dict(T=t, num_warps=w, split_k=s, PREFETCH=pf) for t, w in ((2, 4), (4, 4), (2, 8)) for s in (8, 16)
                for pf in (False, True)] + [dict(T=2, num_warps=4, split_k=8, TAIL=False)]
    elif M <= 16:
        cfgs = [dict(BM=16, T=t, num_warps=w, split_k=s, PREFETCH=pf) for t, w in ((2, 4), (1, 8), (2, 8))
                for s in (2, 4, 8) for pf in (False, True)]
    else:
        cfgs = [dict(BM=bm, T=t, num_warps=4, split_k=s, PREFETCH=True) for bm, t in ((32, 1), (32, 2), (64, 1))
                for s in (1, 2, 4)]
    return [c for c in cfgs if N % (16 * c["num_warps"] * c["T"]) == 0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gluon_probe")
    ap.add_argument("--ms", default="1,16,64")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for K, N in SHAPES:
        n = sets_needed(K * N // 2)
        sets = [dispatch.random_awq(K, N, G, torch.bfloat16, "cuda") for _ in range(n)]
        packed = [repack_awq(s[0]) for s in sets]
        wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets_needed(K * N * 2))]
        i4 = int4pack_sets(N, K, n)
        for M in [int(m) for m in a.ms.split(",")]:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(n, len(wb)))]
            row = {"K": K, "N": N, "M": M}
            cfgs = gluon_configs(M, N)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = ref_fp64(x, *sets[0], G)
            errs = {}
            for c in cfgs:
                o = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                y = gluon_mma(x, packed[0], sets[0][1], sets[0][2], G, out=o, **c)
                errs[str(c)] = rel_err(y, ref) if torch.isfinite(y).all() else float("inf")
            row["rel_err"] = errs
            best, timed = (float("inf"), None), []
            for c in cfgs:
                us = time_calls([lambda x=x, p=p, s=s, c=c: gluon_mma(x, p, s[1], s[2], G, **c)
                                 for x, p, s in zip(xs, packed, sets)])
                timed.append((c, us))
                if us < best[0]:
                    best = (us, c)
            row["gluon_us"], row["gluon_cfg"] = best
            row["gluon_all_us"] = {str(c): u for c, u in timed}
            cfg = dispatch.select_config(M, N, K, G, torch.bfloat16, torch.device("cuda"))
            row["table_us"] = time_calls([lambda x=x, s=s: dispatch.run_config(cfg, x, *s, G) for x, s in zip(xs, sets)])
            row["table_kernel"] = cfg["kernel"]
            row["int4_us"] = time_calls([lambda x=x, s=s: torch.ops.aten._weight_int4pack_mm(x, s[0], G, s[1])
                                         for x, s in zip(xs, i4)])
            row["cublas_us"] = time_calls([lambda x=x, w=w: x @ w.t() for x, w in zip(xs, wb)])
            if M == 1:
                row["read_us"], row["read_how"] = read_floor(K * N // 2 + (K // G) * N * 5 // 2)
            rows.append(row)
            read = f"read {row['read_us']:.1f} ({row['read_how']}) " if M == 1 else ""
            print(f"K={K} N={N} M={M} {read}cublas {row['cublas_us']:.1f} int4 {row['int4_us']:.1f} "
                  f"table({row['table_kernel']}) {row['table_us']:.1f} gluon {best[0]:.1f} {best[1]} "
                  f"x{row['cublas_us'] / best[0]:.2f} cuBLAS x{row['int4_us'] / best[0]:.2f} int4 "
                  f"err {max(errs.values()):.1e}", flush=True)
            (out / "gluon_probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                             indent=1))
        del sets, packed, wb, i4
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
