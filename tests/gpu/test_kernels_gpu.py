"""GPU tests for the W4A16 kernels (run on the device: ``python -m pytest tests/gpu/test_kernels_gpu.py``).

Every benchmark shape, M up to 4096, the public op (dispatched through the measured table) and every kernel
variant against an fp64 reference; CUDA-graph capture and replay.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("needs a CUDA GPU (and no TRITON_INTERPRET)", allow_module_level=True)

from benchmarks.kernels import SHAPES  # noqa: E402
from kernels import awq_linear, awq_triton as at, dispatch, warmup  # noqa: E402
from kernels.awq_layout import pack_int4, unpack_int4  # noqa: E402

G = 128
MS = (1, 2, 3, 4, 8, 16, 33, 64, 128, 256, 1024, 4096)


def weights(K, N, g=G, dtype=torch.bfloat16):
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, device="cuda")
    zeros = torch.randint(0, 16, (K // g, N), dtype=torch.int32, device="cuda")
    sc = (torch.rand(K // g, N, device="cuda") * 0.02 + 0.002).to(dtype)
    return pack_int4(codes), pack_int4(zeros), sc


def ref64(x, qw, qz, sc, g, bias=None):
    w = unpack_int4(qw).double()
    z = unpack_int4(qz).double().repeat_interleave(g, 0)
    s = sc.double().repeat_interleave(g, 0)
    y = x.double().reshape(-1, w.shape[0]) @ ((w - z) * s)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


def tol(dtype: torch.dtype) -> float:
    """Relative error allowed against fp64: fp16 keeps 3 more mantissa bits than bf16."""
    return 1e-2 if dtype == torch.bfloat16 else 2e-3


def rel(y, r):
    return ((y.double() - r).norm() / r.norm()).item()


@pytest.mark.parametrize("K,N", SHAPES)
def test_public_op_all_benchmark_shapes(K, N):
    w = weights(K, N)
    for M in MS:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y = awq_linear(x, *w, G)
        assert torch.isfinite(y).all(), (M, dispatch.select_config(M, N, K, G, x.dtype, x.device))
        e = rel(y, ref64(x, *w, G))
        assert e <= 1e-2, (M, e, dispatch.select_config(M, N, K, G, x.dtype, x.device))


VARIANTS = {
    "gemv": dict(kernel="gemv", BLOCK_N=128, split_k=8, num_warps=4),
    "gemv_nosplit": dict(kernel="gemv", BLOCK_N=256, split_k=1, num_warps=8),
    "splitk": dict(kernel="splitk", BLOCK_M=16, BLOCK_N=256, split_k=4, SCALE_AFTER=True, PREFETCH=3, num_warps=8,
                   num_stages=1),
    "splitk_staged": dict(kernel="splitk", BLOCK_M=32, BLOCK_N=64, split_k=3, SCALE_AFTER=True, PREFETCH=1,
                          X_IN_REGS=False, num_warps=4, num_stages=3),
    "gemm": dict(kernel="gemm", BLOCK_M=128, BLOCK_N=128, split_k=1, SCALE_AFTER=False, PREFETCH=2, X_IN_REGS=False,
                 GROUP_M=8, num_warps=8, num_stages=3),
    "gemm_plain": dict(kernel="gemm", BLOCK_M=64, BLOCK_N=128, split_k=1, SCALE_AFTER=True, PREFETCH=0, GROUP_M=8,
                       num_warps=8, num_stages=3),
    "dequant": dict(kernel="dequant", BLOCK_N=128, num_warps=4),
    "lanes": dict(kernel="lanes", BLOCK_J=32, BLOCK_K=16, split_k=4, num_warps=4),
    "decode": dict(kernel="decode", BLOCK_J=128, BLOCK_K=8, ACC2D=True, PREFETCH=True, split_k=4, num_warps=4),
    "decode_tree": dict(kernel="decode", BLOCK_J=64, BLOCK_K=16, ACC2D=False, PREFETCH=False, split_k=1,
                        num_warps=2),
    "decode_rows": dict(kernel="decode", ROWS=True, BLOCK_J=32, split_k=5, num_warps=1),
    "swap": dict(kernel="swap", BLOCK_M=16, BLOCK_N=128, split_k=4, num_warps=8),
    "decode_kw": dict(kernel="decode", KW=4, BLOCK_J=32, split_k=5, TAIL=0),
    "decode_rows_sum_launch": dict(kernel="decode", ROWS=True, BLOCK_J=32, split_k=7, num_warps=1, TAIL=0),
    "swap_sum_launch": dict(kernel="swap", BLOCK_M=16, BLOCK_N=128, split_k=4, num_warps=8, TAIL=0),
    "splitk_sum_launch": dict(kernel="splitk", BLOCK_M=16, BLOCK_N=128, split_k=4, SCALE_AFTER=True, PREFETCH=1,
                              num_warps=8, num_stages=1, TAIL=0),
    "decode_kw_wide": dict(kernel="decode", KW=2, BLOCK_J=64, split_k=1),
    "swap_zsub": dict(kernel="swap", BLOCK_M=16, BLOCK_N=128, split_k=4, num_warps=8, TAIL=0, ZSUB=True),
    "swap_zsub_tail": dict(kernel="swap", BLOCK_M=64, BLOCK_N=256, split_k=3, num_warps=8, ZSUB=True),
    "splitk_zsub": dict(kernel="splitk", BLOCK_M=16, BLOCK_N=128, split_k=4, SCALE_AFTER=True, PREFETCH=1,
                        num_warps=8, TAIL=0, ZSUB=True),
    "gemm_zsub": dict(kernel="gemm", BLOCK_M=128, BLOCK_N=128, split_k=1, SCALE_AFTER=False, PREFETCH=1,
                      X_IN_REGS=False, num_warps=8, num_stages=3, ZSUB=True),
    "gemm_zsub_plain": dict(kernel="gemm", BLOCK_M=64, BLOCK_N=128, split_k=1, SCALE_AFTER=False, PREFETCH=0,
                            num_warps=8, num_stages=3, ZSUB=True),
    "decode_rows_deep": dict(kernel="decode", ROWS=True, BLOCK_M=2, BLOCK_J=128, DEPTH=2, split_k=3, num_warps=4),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_variant_poisoned_output(variant, g, dtype):
    K, N = 1024, 1032  # N = 8 * 129: partial tiles
    w = weights(K, N, g, dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    for M in ((1, 3, 8) if variant.startswith(("lanes", "decode")) else (1, 3, 16, 33, 200)):  # decode rows only
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        y = dispatch.run_config(VARIANTS[variant], x, *w, g, bias, out=out)
        assert torch.isfinite(y).all(), (variant, M)
        assert rel(y, ref64(x, *w, g, bias)) <= (1e-2 if dtype == torch.bfloat16 else 2e-3), (variant, M)


def test_leading_shape_and_bias():
    K, N = 4096, 6144
    w = weights(K, N)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 5, K, device="cuda", dtype=torch.bfloat16)
    y = awq_linear(x, *w, G, b)
    assert y.shape == (2, 5, N)
    assert rel(y, ref64(x, *w, G, b)) <= 1e-2


def test_split_k_repeatable_and_counters_clean():
    K, N = 8192, 8192
    w = weights(K, N)
    x = torch.randn(4, K, device="cuda", dtype=torch.bfloat16)
    for cfg in (VARIANTS["gemv"], VARIANTS["splitk"]):
        a = dispatch.run_config(cfg, x, *w, G)
        for _ in range(20):
            assert torch.equal(dispatch.run_config(cfg, x, *w, G), a)
    torch.cuda.synchronize()
    assert int(at.tile_counters(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("K,N", [(4096, 14336), (8192, 8192)])
def test_cuda_graph_capture_and_replay(K, N):
    w = weights(K, N)
    warmup([(K, N)], G, torch.bfloat16, "cuda", m_values=(1, 4, 16, 64, 256))
    for M in (1, 4, 16, 64, 256):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        eager = awq_linear(x, *w, G)
        static_x = x.clone()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            awq_linear(static_x, *w, G)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            static_y = awq_linear(static_x, *w, G)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, eager), M
        x2 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        static_x.copy_(x2)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, awq_linear(x2, *w, G)), M


@pytest.mark.parametrize("M", [1, 2, 8, 16, 64, 256])
def test_silu_mul_epilogue_equals_the_unfused_layers(M):
    """The gate/up layer of Llama-3-8B with ``act="silu_mul"``: bit-equal to the linear then the activation
    kernel (both round to nearest at the same points), whichever kernel the table picks for M."""
    from kernels.epilogue import silu_mul

    K, N = 4096, 28672
    w = weights(K, N)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    fused = awq_linear(x, *w, G, bias, act="silu_mul")
    assert fused.shape == (M, N // 2)
    assert torch.equal(fused, silu_mul(awq_linear(x, *w, G, bias))), dispatch.select_config(M, N, K, G, x.dtype,
                                                                                           x.device)


def test_partials_are_what_the_second_launch_sums():
    """``awq_linear_partials``: the fp32 split-K partials where the table's config sums them in a second launch
    (M = 1 on Llama-3-8B's QKV), ``None`` (nothing launched) where it does not (prefill sizes)."""
    from kernels import awq_linear_partials

    K, N = 4096, 6144
    w = weights(K, N)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    ws = awq_linear_partials(x, *w, G)
    assert ws is not None and ws.dtype == torch.float32 and ws.shape[1:] == (1, N) and ws.shape[0] > 1
    assert torch.equal(at.reduce_partials(ws, torch.empty(1, N, device="cuda", dtype=torch.bfloat16), None),
                       awq_linear(x, *w, G))
    assert awq_linear_partials(torch.randn(2048, K, device="cuda", dtype=torch.bfloat16), *w, G) is None


@pytest.mark.parametrize("M", [1, 2, 8, 16, 64, 256])
@pytest.mark.parametrize("K,N", [(4096, 28672), (4096, 6144)])
def test_repacked_silu_and_partials_equal_the_unfused_layers(M, K, N):
    """Repacked weights: ``act="silu_mul"`` is bit-equal to the linear then the activation, and where the table's
    config sums its split-K partials in a second launch, ``awq_linear_partials`` hands over exactly what it sums."""
    import kernels
    from kernels.awq_repack import repack_awq
    from kernels.epilogue import silu_mul

    rd = kernels.repacked_dispatch
    if not rd.supported(K, N, G, torch.bfloat16, "cuda"):
        pytest.skip("repacked kernels need an sm_90 GPU and Gluon")
    w = weights(K, N)
    packed = repack_awq(w[0])
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    cfg = rd.select(M, N, K, G, x.dtype)
    plain = awq_linear(x, packed, w[1], w[2], G, bias)
    assert torch.equal(awq_linear(x, packed, w[1], w[2], G, bias, act="silu_mul"), silu_mul(plain)), cfg
    ws = kernels.awq_linear_partials(x, packed, w[1], w[2], G)
    assert (ws is not None) == rd.leaves_partials(cfg, K, G), cfg
    if ws is not None:
        y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(at.reduce_partials(ws, y, bias), plain), cfg


def test_bad_inputs_raise_on_cuda():
    K, N = 256, 64
    qw, qz, sc = weights(K, N)
    with pytest.raises(TypeError, match="x must be one of"):
        awq_linear(torch.randn(1, K, device="cuda"), qw, qz, sc, G)
    with pytest.raises(ValueError, match="input features"):
        awq_linear(torch.randn(1, K + 8, device="cuda", dtype=torch.bfloat16), qw, qz, sc, G)
    with pytest.raises(ValueError, match="one device"):
        awq_linear(torch.randn(1, K, dtype=torch.bfloat16), qw, qz.cpu(), sc, G)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("cfg", [dict(T=1, num_warps=4, split_k=1), dict(T=4, num_warps=4, split_k=3),
                                 dict(T=4, num_warps=4, split_k=3, TAIL=False),
                                 dict(T=2, num_warps=2, BM=16, split_k=1, PREFETCH=True),
                                 dict(T=1, num_warps=4, BM=32, split_k=5, PREFETCH=True),
                                 dict(T=1, num_warps=8, BM=64, split_k=3, SCALED=True, BK=32),
                                 dict(T=1, num_warps=4, WM=2, BM=64, split_k=2, SCALED=True),
                                 dict(T=2, num_warps=2, WM=4, BM=64, split_k=1),
                                 dict(T=2, num_warps=4, split_k=8, SCALED=True, TAIL=2),
                                 dict(T=1, num_warps=4, BM=16, split_k=3, SCALED=True, TAIL=2),
                                 dict(T=1, num_warps=4, split_k=16, SCALED=True, TAIL=2),
                                 dict(T=2, num_warps=4, split_k=8, SCALED=True, XGROUPS=64),
                                 dict(T=2, num_warps=4, split_k=3, XGROUPS=64),
                                 dict(T=1, num_warps=4, BM=16, split_k=3, SCALED=True, TAIL=2, XGROUPS=2),
                                 dict(T=1, num_warps=4, BM=32, split_k=5, SCALED=True, XGROUPS=3),
                                 dict(T=1, num_warps=4, WM=2, BM=64, split_k=2, SCALED=True, XGROUPS=1),
                                 dict(T=2, num_warps=4, split_k=2, XGROUPS=1, PREFETCH=True),
                                 dict(T=2, num_warps=4, split_k=8, XGROUPS=64, PREFETCH=True, XSUM_MMA=True),
                                 dict(T=1, num_warps=8, BM=16, split_k=3, XGROUPS=2, XSUM_MMA=True),
                                 dict(T=4, num_warps=4, split_k=3, XGROUPS=64, PREFETCH=True, XSUM_MMA=True),
                                 dict(T=2, num_warps=4, BM=16, split_k=2, XSUM_MMA=True, TAIL=2),
                                 dict(T=1, num_warps=8, BM=16, split_k=8, SCALED=True, TAIL=False, XGROUPS=64,
                                      PREFETCH=True),
                                 dict(T=2, num_warps=4, split_k=5, SCALED=True, PREFETCH=True),
                                 dict(T=2, num_warps=4, split_k=3, ZSUB=True),
                                 dict(T=1, num_warps=8, BM=16, split_k=8, ZSUB=True, TAIL=False, XGROUPS=64,
                                      XREADY=True),
                                 dict(T=2, num_warps=4, split_k=8, ZSUB=True, TAIL=2, XGROUPS=2, PREFETCH=True),
                                 dict(T=2, num_warps=4, split_k=8, TAIL=False, XGROUPS=64, PREFETCH=True,
                                      XSUM_MMA=True, XREADY=True),
                                 dict(T=1, num_warps=8, BM=16, split_k=8, SCALED=True, TAIL=False, XGROUPS=64,
                                      XREADY=True),
                                 dict(T=2, num_warps=4, split_k=3, ZSUB=True, PREFETCH=2),
                                 dict(T=1, num_warps=4, split_k=1, ZSUB=True, PREFETCH=2),
                                 dict(T=1, num_warps=8, BM=16, split_k=3, ZSUB=True, TAIL=False, XGROUPS=64,
                                      XREADY=True, PREFETCH=2),
                                 dict(T=2, num_warps=4, split_k=5, ZSUB=True, TAIL=2, XGROUPS=2, PREFETCH=2),
                                 dict(T=1, num_warps=8, BM=16, split_k=3, ZSUB=True, TAIL=False, XGROUPS=64,
                                      XREADY=True, PREFETCH=2, MAXNREG=64),
                                 dict(T=1, num_warps=8, BM=16, split_k=8, ZSUB=True, TAIL=False, XGROUPS=64,
                                      XREADY=True, PREFETCH=2, MAXNREG=64, EVICT_FIRST=True),
                                 dict(T=2, num_warps=4, split_k=8, TAIL=False, XGROUPS=64, PREFETCH=True,
                                      XSUM_MMA=True, EVICT_FIRST=True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_mma_on_repacked_weights(cfg, g, dtype):
    """The Gluon kernel on fragment-repacked weights (kernels/awq_repack.py) against fp64: M up to 33 (several
    row tiles), bias, split-K summed in the kernel (twice: the counters reset; in the last split's registers
    bit for bit the same) or by a second launch, prefetch, x staged in shared memory (a split at once, or in
    chunks with a padded last one), poisoned output."""
    from kernels.awq_gluon_mma import gluon_mma
    from kernels.awq_repack import repack_awq
    from kernels.awq_triton import tile_counters

    K, N = 1024, 1024
    w = weights(K, N, g, dtype)
    packed = repack_awq(w[0])
    bias = torch.randn(N, device="cuda", dtype=dtype)
    for M in (1, 3, 8, 16, 33):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        ys = []
        for _ in range(2):
            y = gluon_mma(x, packed, w[1], w[2], g, bias, out=out, **cfg)
            assert torch.isfinite(y).all() and rel(y, ref64(x, *w, g, bias)) <= tol(dtype), (M, cfg)
            ys.append(y.clone())
            out.fill_(float("nan"))
        if cfg.get("TAIL") == 2:
            assert torch.equal(ys[0], ys[1]) and not tile_counters(x.device, 1).any(), (M, cfg)


@pytest.mark.parametrize("cfg", [dict(T=2, num_warps=4, split_k=8, TAIL=False, PREFETCH=True, XGROUPS=64),
                                 dict(T=1, num_warps=8, split_k=4, SCALED=True, TAIL=2),
                                 dict(T=2, num_warps=4, BM=16, split_k=4, SCALED=True, TAIL=1),
                                 dict(T=1, num_warps=8, BM=16, split_k=3, ZSUB=True, TAIL=False, XGROUPS=64,
                                      XREADY=True, PREFETCH=2),
                                 dict(T=1, num_warps=8, BM=16, split_k=3, ZSUB=True, TAIL=False, XGROUPS=64,
                                      XREADY=True, PREFETCH=2, EVICT_FIRST=True)])
def test_gluon_mma_chained_under_programmatic_dependent_launch(cfg):
    """Each call's x is the call before's output, so a kernel launched early (``PDL = 2``) that read x, or touched
    the split-K counters and buffers, before its ``griddepcontrol.wait`` would see the last call's stale values:
    eight chained calls, eagerly and as a replayed CUDA graph, equal the chain with PDL off bit for bit."""
    from kernels.awq_gluon_mma import gluon_mma
    from kernels.awq_repack import repack_awq
    from kernels.awq_triton import PDL, tile_counters

    if not PDL:
        pytest.skip("programmatic dependent launch is off (RAYAWQ_PDL=0 or a Triton without griddepcontrol)")
    K = N = 2048
    qw, qz, sc = weights(K, N)
    packed = repack_awq(qw)
    x0 = torch.randn(3, K, device="cuda", dtype=torch.bfloat16)
    sc = (sc.float() * x0.float().std() / gluon_mma(x0, packed, qz, sc, G, **cfg).float().std()).to(sc.dtype)

    def chain(pdl: int) -> list[torch.Tensor]:
        ys = [x0]
        for _ in range(8):
            ys.append(gluon_mma(ys[-1], packed, qz, sc, G, PDL=pdl, **cfg))
        return ys[1:]

    want = chain(0)
    assert all(torch.isfinite(y).all() for y in want) and want[-1].float().std() > 0.1
    for pdl in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(chain(pdl), want)), (pdl, cfg)  # (also compiles it)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ys = chain(pdl)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(ys, want)), (pdl, cfg)
    assert not tile_counters(x0.device, 1).any()


@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("cfg", [dict(BM=64, BN=64, split_k=1), dict(BM=32, BN=64, split_k=3),
                                 dict(BM=128, BN=128, num_warps=8, num_stages=3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_repacked_dot_and_dequant_on_gpu(cfg, g, dtype):
    """The tensor-core kernel and the dequantize + cuBLAS path on repacked weights against fp64: M from 1 to 300,
    bias, split-K, poisoned output."""
    from kernels.awq_repack import repack_awq
    from kernels.awq_repacked_dot import dequant_matmul_repacked, dot_repacked

    K, N = 1024, 1040
    w = weights(K, N, g, dtype)
    packed = repack_awq(w[0])
    bias = torch.randn(N, device="cuda", dtype=dtype)
    for M in (1, 33, 300):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        y = dot_repacked(x, packed, w[1], w[2], g, bias, out=out, **cfg)
        r = ref64(x, *w, g, bias)
        assert torch.isfinite(y).all() and rel(y, r) <= tol(dtype), (M, cfg)
        for nk in (False, True):
            assert rel(dequant_matmul_repacked(x, packed, w[1], w[2], g, bias, NK=nk), r) <= tol(dtype)


@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("cfg", [dict(BN=64, split_k=1), dict(BN=128, split_k=3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_wgmma_on_repacked_weights(cfg, g, dtype):
    """The warpgroup-MMA kernel on repacked weights against fp64: M from 1 to 130 (partial 64-row tiles), bias,
    split-K, poisoned output."""
    from kernels.awq_gluon_wgmma import gluon_wgmma
    from kernels.awq_repack import repack_awq

    K, N = 1024, 1024
    w = weights(K, N, g, dtype)
    packed = repack_awq(w[0])
    bias = torch.randn(N, device="cuda", dtype=dtype)
    for M in (1, 33, 64, 130):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        y = gluon_wgmma(x, packed, w[1], w[2], g, bias, out=out, **cfg)
        assert torch.isfinite(y).all() and rel(y, ref64(x, *w, g, bias)) <= tol(dtype), (M, cfg)


@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("cfg", [dict(BB=64, W=4, T=1, STAGES=2, split_k=1), dict(BB=128, W=4, T=2, split_k=3),
                                 dict(BB=256, W=8, T=1, STAGES=4, split_k=1), dict(BB=128, W=8, T=2, split_k=2),
                                 dict(BB=64, W=4, T=1, STAGES=4, split_k=2, DEPTH=1),
                                 dict(BB=256, W=8, T=1, STAGES=3, split_k=1, DEPTH=1),
                                 dict(BB=128, W=4, T=2, STAGES=4, split_k=3, DEPTH=1),
                                 dict(BB=64, W=4, T=1, STAGES=4, split_k=2, DEPTH=1, TAIL=1),
                                 dict(BB=256, W=8, T=1, STAGES=3, split_k=4, DEPTH=0, TAIL=1),
                                 dict(BB=64, W=4, T=1, STAGES=4, split_k=2, DEPTH=0, TAIL=2),
                                 dict(BB=256, W=4, T=1, STAGES=3, split_k=3, DEPTH=1, TAIL=2),
                                 dict(BB=128, W=8, T=2, STAGES=4, split_k=4, DEPTH=1, TAIL=2),
                                 dict(BB=64, W=4, T=1, STAGES=4, SLOTS=1, sms=6),
                                 dict(BB=128, W=8, T=1, STAGES=3, DEPTH=1, SLOTS=1, sms=5),
                                 dict(BB=256, W=8, T=1, STAGES=4, DEPTH=1, PAIR=True),
                                 dict(BB=128, W=4, T=2, STAGES=4, DEPTH=0, split_k=3, TAIL=2, PAIR=True),
                                 dict(BB=64, W=4, T=1, STAGES=6, DEPTH=1, SLOTS=1, sms=6, PAIR=True),
                                 dict(BB=256, W=4, T=1, STAGES=3, DEPTH=1, SLOTS=2, sms=3, LEAD=2),
                                 dict(BB=128, W=4, T=1, STAGES=4, DEPTH=1, split_k=3, TAIL=2, LEAD=1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_pipelined_on_repacked_weights(cfg, g, dtype):
    """The pipelined register-A wgmma kernel on repacked weights against fp64: M from 1 to 300 (partial row
    tiles: TMA fills them with zeros), fewer steps than stages (K 128), odd step counts (K 192), bias, split-K
    (summed by a second launch, by each tile's last program, or in the last split's registers, whose counters
    every launch must leave at 0 and whose output repeats bit for bit), the last-wave split grid (a made-up SM
    count of 5-6 makes 16-80 tiles leave a partial last wave), x's buffers filled in pairs of steps (``PAIR``,
    steps of half a group), the last split given more groups than the others (``LEAD``), poisoned output, a
    strided x."""
    _check_pipelined(cfg, g, dtype)


def _check_pipelined(cfg: dict, g: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """``gluon_pipelined(**cfg)`` against fp64 on three shapes and five row counts (what
    :func:`test_gluon_pipelined_on_repacked_weights` lists)."""
    from kernels.awq_gluon_pipelined import gluon_pipelined
    from kernels.awq_repack import repack_awq
    from kernels.awq_triton import tile_counters

    for K, N in ((1024, 1024), (128, 512), (192, 256)):
        if K % g:
            continue
        w = weights(K, N, g, dtype)
        packed = repack_awq(w[0])
        bias = torch.randn(N, device="cuda", dtype=dtype)
        if cfg.get("PAIR"):
            cfg = {**cfg, "BK": g // 2}
        for M in (1, 33, 64, 130, 300):
            x = torch.randn(M, K + 64, device="cuda", dtype=dtype)[:, :K]
            out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
            y = gluon_pipelined(x, packed, w[1], w[2], g, bias, out=out, **cfg)
            assert torch.isfinite(y).all() and rel(y, ref64(x, *w, g, bias)) <= tol(dtype), (K, N, M, cfg)
            if cfg.get("TAIL") == 2 or cfg.get("SLOTS"):  # fixed sum order: every bit repeats, counters back at 0
                assert torch.equal(gluon_pipelined(x, packed, w[1], w[2], g, bias, **cfg), y), (K, N, M, cfg)
                assert not tile_counters(x.device, 1).any(), (K, N, M, cfg)


@pytest.mark.parametrize("cfg,g", [(dict(BB=256, W=4, T=1, STAGES=3, DEPTH=1, SLOTS=2, sms=3), 128),
                                   (dict(BB=256, W=4, T=1, STAGES=3, DEPTH=1, SLOTS=2, sms=3, LEAD=1), 64),
                                   (dict(BB=128, W=4, T=2, STAGES=5, DEPTH=0, SLOTS=1, sms=5), 128),
                                   (dict(BB=64, W=4, T=1, STAGES=6, DEPTH=1, SLOTS=2, sms=6, PAIR=True), 128),
                                   (dict(BB=128, W=4, T=1, STAGES=5, DEPTH=1, SLOTS=2, sms=4), 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_pipelined_split_tail_in_one_cta(cfg, g, dtype):
    """``WS_TAIL``: the last wave's tiles as one CTA each, two warpgroups on the two K halves (warp-specialized),
    summed through shared memory, launched before the whole tiles; same checks as above (bias, partial row tiles,
    poisoned output, bit-for-bit repeats), ``LEAD`` and ``PAIR`` included; then the two launches (the second
    under programmatic dependent launch) captured in a CUDA graph replay to the eager output."""
    from kernels.awq_gluon_pipelined import gluon_pipelined
    from kernels.awq_repack import repack_awq

    cfg = {**cfg, "WS_TAIL": True, **({"BK": g // 2} if cfg.get("PAIR") else {})}
    _check_pipelined(cfg, g, dtype)
    w = weights(1024, 1024, g, dtype)
    packed = repack_awq(w[0])
    x = torch.randn(300, 1024, device="cuda", dtype=dtype)
    eager = gluon_pipelined(x, packed, w[1], w[2], g, **cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gluon_pipelined(x, packed, w[1], w[2], g, **cfg)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager), cfg


@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("K,N", [(4096, 14336), (1024, 1152)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_awq_linear_on_repacked_weights_every_m(K, N, g, dtype):
    """The product path on repacked weights (kernels/repacked_dispatch.py: measured table or rule, every kernel
    family) against fp64, M from 1 to 300; then a CUDA graph of a few calls replays to the eager outputs."""
    import kernels
    from kernels.awq_repack import repack_awq

    if not kernels.repacked_dispatch.supported(K, N, g, dtype, "cuda"):
        pytest.skip("repacked kernels need an sm_90 GPU and Gluon")
    w = weights(K, N, g, dtype)
    packed = repack_awq(w[0])
    bias = torch.randn(N, device="cuda", dtype=dtype)
    xs = {M: torch.randn(M, K, device="cuda", dtype=dtype) for M in (1, 3, 8, 16, 24, 64, 100, 300)}
    eager = {}
    for M, x in xs.items():
        eager[M] = kernels.awq_linear(x, packed, w[1], w[2], g, bias)
        assert torch.isfinite(eager[M]).all() and rel(eager[M], ref64(x, *w, g, bias)) <= tol(dtype), (M, K, N, g)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = {M: kernels.awq_linear(xs[M], packed, w[1], w[2], g, bias) for M in (1, 16, 64)}
    graph.replay()
    torch.cuda.synchronize()
    for M, y in outs.items():
        assert torch.equal(y, eager[M]), M
