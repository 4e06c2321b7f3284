"""CPU tests for the W4A16 kernels: every Triton variant under TRITON_INTERPRET=1, plus dispatch and checks.

The interpreter must be on before ``triton.language`` is imported (``triton.jit`` reads it at decoration
time). If another test module imported triton first in compiled mode, this module's tests rerun themselves in
a fresh Python process with the interpreter on (``test_rerun_in_interpreter_process``) and skip here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

# the interpreter must be on when triton (and kernels/) are first imported; the variable is put back once this
# module is done (or at once where triton came first and the tests rerun in a subprocess): left set, it reached every
# Ray worker and subprocess the later test modules start (the server's engine ran its kernels interpreted, ~40x slower)
_PRIOR_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton.language as _tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels  # noqa: E402
from kernels import awq_layout, dispatch  # noqa: E402

INTERPRETER_OK = isinstance(_tl.zeros, InterpretedFunction)  # False: triton was imported before us, compiled
if INTERPRETER_OK:
    if "kernels.awq_triton" in sys.modules:
        at = importlib.reload(sys.modules["kernels.awq_triton"])
    else:
        at = importlib.import_module("kernels.awq_triton")
    assert at._INTERPRET
else:
    at = None

    def test_rerun_in_interpreter_process():
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        # (on every core: the interpreter is single-threaded Python, and this is most of the suite's time)
        workers = ["-n", str(min(4, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                            str(Path(__file__))],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        # every test ran under the interpreter (a compiled triton imported first would skip them all)
        assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-2000:]


def _restore_interpret_env() -> None:
    if _PRIOR_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PRIOR_INTERPRET


if not INTERPRETER_OK:
    _restore_interpret_env()


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env_for_this_module_only():
    yield  # (still set from the import where the tests run here: kernels/ modules they import are interpreted too)
    _restore_interpret_env()



@pytest.fixture(autouse=True)
def _needs_interpreter(request):
    if not INTERPRETER_OK and request.node.name != "test_rerun_in_interpreter_process":
        pytest.skip("triton was imported before the interpreter was set; rerun in a fresh process instead")

GROUPS = {32: 96, 64: 128, 128: 256}  # group -> K (3, 2, 2 groups: split-K has something to split)
MS = (1, 3, 16, 33)
ODD_NS = (24, 40, 56, 72)  # odd multiples of 8: partial tiles and partial int32 columns in every variant

VARIANTS = {
    "gemv": lambda x, w, g, b, out: at.gemv(x, *w, g, b, out=out, BLOCK_N=32, split_k=1),
    "gemv_splitk": lambda x, w, g, b, out: at.gemv(x, *w, g, b, out=out, BLOCK_N=32, BLOCK_M=2, split_k=3),
    "splitk": lambda x, w, g, b, out: at.dot(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=32, split_k=2),
    "splitk_no_prefetch": lambda x, w, g, b, out: at.dot(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=32, split_k=2,
                                                          PREFETCH=0),
    "splitk_lookahead3": lambda x, w, g, b, out: at.dot(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=32, split_k=1,
                                                         PREFETCH=3),
    "gemm": lambda x, w, g, b, out: at.dot(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=32, split_k=1,
                                            SCALE_AFTER=False, PREFETCH=2, X_IN_REGS=False),
    "dequant": lambda x, w, g, b, out: at.dequant_matmul(x, *w, g, b, out=out, BLOCK_N=32),
    # zero points (and, for gemm, scales) applied per pair of weights before the MMA (ZSUB)
    "splitk_zsub": lambda x, w, g, b, out: at.dot(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=32, split_k=2, ZSUB=True),
    "gemm_zsub": lambda x, w, g, b, out: at.dot(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=32, split_k=1,
                                                 SCALE_AFTER=False, PREFETCH=1, ZSUB=True),
}


def random_weights(K, N, g, dtype=torch.bfloat16):
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32)
    zeros = torch.randint(0, 16, (K // g, N), dtype=torch.int32)
    qw = awq_layout.pack_int4(codes)
    qz = awq_layout.pack_int4(zeros)
    sc = (torch.rand(K // g, N) * 0.05 + 0.005).to(dtype)
    return qw, qz, sc


def ref64(x, qw, qz, sc, g, bias=None):
    w = awq_layout.unpack_int4(qw).double()
    z = awq_layout.unpack_int4(qz).double().repeat_interleave(g, 0)
    s = sc.double().repeat_interleave(g, 0)
    y = x.double() @ ((w - z) * s)
    return y if bias is None else y + bias.double()


def rel(y, r):
    return ((y.double() - r).norm() / r.norm()).item()


def check_against_fp64(launch, M: int, group: int, n_pick: int, with_bias: bool) -> None:
    """Fresh random inputs, a NaN-poisoned ``out``: ``launch(x, weights, group, bias, out)`` must write every
    element, into ``out``, within 1e-2 of the fp64 reference."""
    K = GROUPS[group]
    N = ODD_NS[(n_pick + list(GROUPS).index(group)) % len(ODD_NS)]
    w = random_weights(K, N, group)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16) if with_bias else None
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    y = launch(x, w, group, bias, out)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    assert rel(y, ref64(x, *w, group, bias)) < 1e-2


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("M", [1, 3, 8])
def test_lanes_gemv_matches_fp64(M, group, split_k):
    from kernels.awq_gemv_lanes import lanes

    check_against_fp64(lambda x, w, g, b, out: lanes(x, *w, g, b, out=out, BLOCK_J=8, BLOCK_K=16, split_k=split_k),
                       M, group, M, M != 3)


@pytest.mark.parametrize("split_k,acc2d,prefetch,rows", [(1, True, True, False), (3, True, False, False),
                                                         (3, False, True, False), (1, False, False, False),
                                                         (1, False, False, True), (3, False, False, True),
                                                         (1, False, True, True), (3, False, True, True)])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("M", [1, 3, 5])
def test_decode_gemv_matches_fp64(M, group, split_k, acc2d, prefetch, rows):
    from kernels.awq_gemv_decode import gemv_decode

    def launch(x, w, g, b, out):
        return gemv_decode(x, *w, g, b, out=out, BLOCK_J=8, BLOCK_K=16, split_k=split_k, num_warps=1, ACC2D=acc2d,
                           PREFETCH=prefetch, ROWS=rows, BLOCK_M=2, DEPTH=2 if (rows and prefetch) else 1)

    check_against_fp64(launch, M, group, M + 1, M != 3)


@pytest.mark.parametrize("block_j", [8, 16])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("group", list(GROUPS))
def test_decode_rows_whole_tiles_match_fp64(group, split_k, block_j):
    """Tiles that divide N/8 take the unclamped (vectorizable) word loads; several words per thread."""
    from kernels.awq_gemv_decode import gemv_decode

    K, N = GROUPS[group], 128  # N/8 = 16 words: 2 tiles of 8 or one of 16
    w = random_weights(K, N, group)
    for M in (1, 3):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
        y = gemv_decode(x, *w, group, None, out=out, BLOCK_J=block_j, split_k=split_k, num_warps=1, ROWS=True,
                        BLOCK_M=2)
        assert torch.isfinite(y).all() and rel(y, ref64(x, *w, group, None)) < 1e-2


@pytest.mark.parametrize("kw,block_j,split_k", [(2, 8, 1), (4, 8, 3), (4, 16, 1), (2, 16, 3)])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("M", [1, 3])
def test_decode_kwarps_matches_fp64(M, group, kw, block_j, split_k):
    """Warps sharing each group's rows (KW), reduced across warps at the end; odd N (clamped tail lanes)."""
    from kernels.awq_gemv_decode import gemv_decode

    check_against_fp64(lambda x, w, g, b, out: gemv_decode(x, *w, g, b, out=out, BLOCK_J=block_j, split_k=split_k,
                                                           KW=kw), M, group, M + kw, M == 1)


@pytest.mark.parametrize("tail", [0, 8, 16])
@pytest.mark.parametrize("kernel", [dict(ROWS=True, BLOCK_J=8, num_warps=1), dict(KW=2, BLOCK_J=8),
                                    dict(BLOCK_J=8, BLOCK_K=16, PREFETCH=True, num_warps=1)])
@pytest.mark.parametrize("group", [32, 128])
def test_decode_split_sums_match_fp64(group, kernel, tail):
    """The split-K sum in wider rounds (8, 16 splits) and as a second launch (TAIL 0), with bias."""
    from kernels.awq_gemv_decode import gemv_decode

    for M in (1, 3):
        check_against_fp64(lambda x, w, g, b, out: gemv_decode(x, *w, g, b, out=out, split_k=5, TAIL=tail, **kernel),
                           M, group, M + tail, True)


@pytest.mark.parametrize("split", [3, 300])
def test_reduce_partials_sums_every_split(split):
    """The second launch of ``TAIL=0``: 300 splits take two rounds of its 256-split tile; bias, strided ``y``."""
    ws = torch.randn(split, 2, 40)
    bias = torch.randn(40, dtype=torch.bfloat16)
    y = torch.full((2, 48), float("nan"), dtype=torch.bfloat16)[:, :40]
    at.reduce_partials(ws, y, bias)
    ref = ws.double().sum(0) + bias.double()
    assert torch.isfinite(y).all() and rel(y, ref) < 1e-2


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("M", [1, 16, 33])
def test_dot_kernels_with_a_separate_split_sum_match_fp64(M, group):
    """``TAIL=0`` on the split-K ``tl.dot`` kernel and the swapped one: partials only, then ``reduce_partials``."""
    from kernels.awq_dot_swap import dot_swap

    check_against_fp64(lambda x, w, g, b, out: at.dot(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=32, split_k=3,
                                                      TAIL=0), M, group, M, True)
    check_against_fp64(lambda x, w, g, b, out: dot_swap(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=16, split_k=3,
                                                        TAIL=0), M, group, M + 1, True)


@pytest.mark.parametrize("launcher", ["decode_rows_sum", "decode_kw_sum", "decode_tail8", "swap_sum", "splitk_sum",
                                      "gemm", "dequant"])
def test_silu_mul_epilogue_matches_fp64(launcher):
    """``act="silu_mul"``: fused into the separate split-K sum (TAIL 0) or applied after the kernel (the rest).

    The interpreter rounds fp32 -> bf16 toward zero (the GPU: to nearest), and the activation rounds three
    times, hence 2e-2; on the GPU the fused and unfused results are bit-equal (tests/gpu)."""
    from kernels.awq_dot_swap import dot_swap
    from kernels.awq_gemv_decode import gemv_decode
    from kernels.epilogue import silu_mul

    launch = {
        "decode_rows_sum": lambda x, w, g, b, a: gemv_decode(x, *w, g, b, ROWS=True, BLOCK_J=8, num_warps=1,
                                                             split_k=3, TAIL=0, act=a),
        "decode_kw_sum": lambda x, w, g, b, a: gemv_decode(x, *w, g, b, KW=2, BLOCK_J=8, split_k=3, TAIL=0, act=a),
        "decode_tail8": lambda x, w, g, b, a: gemv_decode(x, *w, g, b, KW=2, BLOCK_J=8, split_k=3, TAIL=8, act=a),
        "swap_sum": lambda x, w, g, b, a: dot_swap(x, *w, g, b, BLOCK_M=16, BLOCK_N=16, split_k=3, TAIL=0, act=a),
        "splitk_sum": lambda x, w, g, b, a: at.dot(x, *w, g, b, BLOCK_M=16, BLOCK_N=32, split_k=3, TAIL=0, act=a),
        "gemm": lambda x, w, g, b, a: at.dot(x, *w, g, b, BLOCK_M=16, BLOCK_N=32, split_k=1, act=a),
        "dequant": lambda x, w, g, b, a: dispatch.run_config({"kernel": "dequant", "BLOCK_N": 32}, x, *w, g, b,
                                                             act=a),
    }[launcher]
    for M, group, N in ((1, 32, 48), (3, 128, 80)):
        K = GROUPS[group]
        w = random_weights(K, N, group)
        x = torch.randn(M, K, dtype=torch.bfloat16)
        bias = torch.randn(N, dtype=torch.bfloat16)
        y = launch(x, w, group, bias, "silu_mul")
        assert y.shape == (M, N // 2) and torch.isfinite(y).all()
        r = ref64(x, *w, group, bias)
        assert rel(y, torch.nn.functional.silu(r[:, :N // 2]) * r[:, N // 2:]) < 2e-2
        assert rel(y, silu_mul(launch(x, w, group, bias, None)).double()) < 2e-2


def test_silu_mul_epilogue_refuses_bad_act():
    w = random_weights(64, 24, 32)
    with pytest.raises(ValueError, match="act must be one of"):
        kernels.awq_linear(torch.randn(1, 64, dtype=torch.bfloat16), *w, 32, act="gelu")


def test_decode_refuses_an_unknown_tail():
    from kernels.awq_gemv_decode import gemv_decode

    w = random_weights(64, 24, 32)
    with pytest.raises(ValueError, match="TAIL must be 0"):
        gemv_decode(torch.randn(1, 64, dtype=torch.bfloat16), *w, 32, TAIL=5)


def test_decode_kwarps_refuses_a_group_it_cannot_share():
    from kernels.awq_gemv_decode import gemv_decode

    w = random_weights(64, 24, 32)
    with pytest.raises(ValueError, match="KW=8 needs group_size divisible by 64"):
        gemv_decode(torch.randn(1, 64, dtype=torch.bfloat16), *w, 32, KW=8)


@pytest.mark.parametrize("group", list(GROUPS))
def test_swapped_dot_with_large_batch_tiles_matches_fp64(group):
    """The large-M swap configs (batch tile 64 as the MMA's N, several batch tiles, the last one partial)."""
    from kernels.awq_dot_swap import dot_swap

    check_against_fp64(lambda x, w, g, b, out: dot_swap(x, *w, g, b, out=out, BLOCK_M=64, BLOCK_N=64, split_k=1),
                       70, group, 1, True)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("M", [1, 16, 33])
def test_swapped_dot_matches_fp64(M, group, split_k):
    from kernels.awq_dot_swap import dot_swap

    check_against_fp64(lambda x, w, g, b, out: dot_swap(x, *w, g, b, out=out, BLOCK_M=16, BLOCK_N=16, split_k=split_k),
                       M, group, M, M != 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 16, 33])
def test_swapped_dot_with_zero_pairs_matches_fp64(M, dtype):
    """``swap`` with ZSUB (q - z per pair before the MMA), every group size, split-K by a second launch."""
    from kernels.awq_dot_swap import dot_swap

    for group, K in GROUPS.items():
        w = random_weights(K, 72, group, dtype)
        x = torch.randn(M, K, dtype=dtype)
        out = torch.full((M, 72), float("nan"), dtype=dtype)
        y = dot_swap(x, *w, group, None, out=out, BLOCK_M=16, BLOCK_N=64, split_k=2, ZSUB=True, TAIL=0)
        assert torch.isfinite(y).all() and rel(y, ref64(x, *w, group)) < 1e-2


def test_weight_scaled_zsub_needs_scales_in_the_activation_dtype():
    """The gemm path's paired scaling reads scales as 16-bit pairs: fp32 scales fall back to the fp32 route."""
    w = random_weights(64, 24, 32)
    w = (w[0], w[1], w[2].float())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = at.dot(x, *w, 32, BLOCK_M=16, BLOCK_N=32, split_k=1, SCALE_AFTER=False, ZSUB=True)
    assert rel(y, ref64(x, *w, 32)) < 1e-2


def test_lanes_gemv_refuses_more_than_8_rows():
    from kernels.awq_gemv_lanes import lanes

    w = random_weights(128, 24, 32)
    with pytest.raises(ValueError, match="at most 8 rows"):
        lanes(torch.randn(9, 128, dtype=torch.bfloat16), *w, 32)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("M", MS)
def test_variant_matches_fp64(variant, group, M):
    K = GROUPS[group]
    N = ODD_NS[(MS.index(M) + list(GROUPS).index(group)) % len(ODD_NS)]
    w = random_weights(K, N, group)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16) if M != 3 else None
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)  # poisoned: every element must be written
    y = VARIANTS[variant](x, w, group, bias, out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(y).all(), "unwritten (NaN) outputs"
    assert rel(y, ref64(x, *w, group, bias)) < 1e-2


@pytest.mark.parametrize("variant", ["gemv", "splitk"])
def test_fp16_and_strided_rows(variant):
    K, N, g = 128, 40, 64
    w = random_weights(K, N, g, torch.float16)
    big = torch.randn(3, 2 * K, dtype=torch.float16)
    x = big[:, :K]  # row stride 2K: the launchers take any row stride
    out = torch.full((3, N), float("nan"), dtype=torch.float16)
    y = VARIANTS[variant](x, w, g, None, out)
    assert torch.isfinite(y).all()
    assert rel(y, ref64(x, *w, g)) < 2e-3


def test_split_k_counters_return_to_zero():
    K, N, g = 256, 72, 64
    w = random_weights(K, N, g)
    x = torch.randn(5, K, dtype=torch.bfloat16)
    at.gemv(x, *w, g, BLOCK_N=32, BLOCK_M=4, split_k=4)
    at.dot(x, *w, g, BLOCK_M=16, BLOCK_N=32, split_k=3)
    assert int(at.tile_counters(x.device, 1).abs().sum()) == 0


def test_split_k_is_deterministic():
    K, N, g = 256, 56, 32
    w = random_weights(K, N, g)
    x = torch.randn(2, K, dtype=torch.bfloat16)
    a = at.gemv(x, *w, g, BLOCK_N=32, split_k=8)
    b = at.gemv(x, *w, g, BLOCK_N=32, split_k=8)
    assert torch.equal(a, b)


def test_dequantize_kernel_matches_layout_module():
    K, N, g = 128, 24, 32
    qw, qz, sc = random_weights(K, N, g)
    w = at.dequantize_triton(qw, qz, sc, g, torch.float32, BLOCK_N=32)
    ref = awq_layout.dequantize(qw, qz, sc.float(), g)
    assert torch.allclose(w, ref, rtol=0, atol=1e-6)


def _repacked_module():
    name = "kernels.awq_repacked_dot"
    return importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)


@pytest.mark.parametrize("group,K", [(32, 128), (64, 192), (128, 256)])
@pytest.mark.parametrize("M,split_k,bias,mode", [(1, 1, True, {}), (3, 3, False, dict(PREFETCH=True)),
                                                 (16, 2, True, dict(SCALE_AFTER=False, PREFETCH=True)),
                                                 (33, 1, False, dict(SCALE_AFTER=False))])
def test_repacked_dot_and_dequantize_match_fp64(group, K, M, split_k, bias, mode):
    """The kernels on fragment-repacked weights (kernels/awq_repacked_dot.py): N = 48 leaves a partial 32-column
    tile, split-K sums by a second launch, poisoned output; the dense dequantization equals the layout module's."""
    from kernels.awq_repack import repack_awq

    rd = _repacked_module()
    N = 48
    w = random_weights(K, N, group)
    packed = repack_awq(w[0])
    x = torch.randn(M, K, dtype=torch.bfloat16)
    b = torch.randn(N, dtype=torch.bfloat16) if bias else None
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    y = rd.dot_repacked(x, packed, w[1], w[2], group, b, out=out, BM=16, BN=32, split_k=split_k, **mode)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    assert rel(y, ref64(x, *w, group, b)) < 1e-2
    dense = rd.dequantize_repacked(packed, w[1], w[2].float(), group, torch.float32, BN=32)
    assert torch.allclose(dense, awq_layout.dequantize(*w[:2], w[2].float(), group), rtol=0, atol=1e-6)
    assert torch.equal(rd.dequantize_repacked(packed, w[1], w[2].float(), group, torch.float32, BN=32, nk=True),
                       dense.t())  # the nn.Linear layout [N, K]
    for nk in (False, True):
        y2 = rd.dequant_matmul_repacked(x, packed, w[1], w[2], group, b, BN=32, NK=nk)
        assert rel(y2, ref64(x, *w, group, b)) < 1e-2


def test_repacked_dispatch_hands_partials_or_fuses_the_activation():
    """On repacked weights a config that sums its split-K partials in a second launch can hand them over
    (``act="partials"``: the engine's RoPE + KV store sums them) or fuse ``silu_mul`` into that sum; configs that
    sum in the kernel (or have no split) say so through ``leaves_partials``."""
    from kernels.awq_repack import repack_awq
    from kernels.epilogue import silu_mul

    rd = importlib.import_module("kernels.repacked_dispatch")
    _repacked_module()  # the interpreter's build of the dot kernel
    K, N, g = 256, 64, 64
    w = random_weights(K, N, g)
    packed = repack_awq(w[0])
    x = torch.randn(3, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16)
    cfg = {"kernel": "dot", "BM": 16, "BN": 32, "split_k": 4}
    assert rd.leaves_partials(cfg, K, g)
    ws = rd.run(cfg, x, packed, w[1], w[2], g, None, act="partials")
    assert ws.shape == (4, 3, N) and ws.dtype == torch.float32
    assert rel((ws.sum(0) + bias.float()).to(torch.bfloat16), ref64(x, *w, g, bias)) < 1e-2
    fused = rd.run(cfg, x, packed, w[1], w[2], g, bias, act="silu_mul")
    unfused = silu_mul(rd.run(cfg, x, packed, w[1], w[2], g, bias))
    assert fused.shape == (3, N // 2) and rel(fused, unfused.double()) < 2e-2
    dq = rd.run({"kernel": "dequant", "BN": 32}, x, packed, w[1], w[2], g, bias, act="silu_mul")
    assert rel(dq, fused.double()) < 2e-2
    with pytest.raises(ValueError, match="partials"):
        rd.run({"kernel": "dequant", "BN": 32}, x, packed, w[1], w[2], g, None, act="partials")
    assert not rd.leaves_partials({"kernel": "dot", "split_k": 1}, K, g)
    assert not rd.leaves_partials({"kernel": "dot", "split_k": 8}, 64, 64)  # one group: the split is clamped to 1
    assert not rd.leaves_partials({"kernel": "gluon", "split_k": 16}, 4096, 128)  # TAIL defaults to in-kernel
    assert rd.leaves_partials({"kernel": "gluon", "split_k": 16, "TAIL": False}, 4096, 128)
    assert not rd.leaves_partials({"kernel": "pipelined", "split_k": 4, "TAIL": 2}, 4096, 128)
    assert rd.leaves_partials({"kernel": "wgmma", "split_k": 4}, 4096, 128)
    assert not rd.leaves_partials({"kernel": "dequant"}, 4096, 128)


def test_repacked_kernels_refuse_mismatched_weights():
    from kernels.awq_repack import repack_awq

    rd = _repacked_module()
    w = random_weights(128, 32, 64)
    packed = repack_awq(w[0])
    with pytest.raises(ValueError, match="repacked weights must be"):
        rd.dot_repacked(torch.randn(1, 128, dtype=torch.bfloat16), packed[:1], w[1], w[2], 64)
    with pytest.raises(ValueError, match="x must be"):
        rd.dot_repacked(torch.randn(1, 64, dtype=torch.bfloat16), packed, w[1], w[2], 64)
    with pytest.raises(ValueError, match="group sizes"):
        rd.dot_repacked(torch.randn(1, 128, dtype=torch.bfloat16), packed, w[1], w[2], 16)


def test_awq_linear_takes_repacked_weights_on_cpu():
    """A 4-D qweight (kernels.awq_repack's order) is the same linear as its AutoAWQ source: reference path on the
    CPU, any leading shape, bias, the fused activation; no split-K partials offered; shapes checked."""
    from kernels.awq_repack import repack_awq

    K, N, g = 256, 128, 64
    qw, qz, sc = random_weights(K, N, g)
    packed = repack_awq(qw)
    x = torch.randn(2, 3, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16)
    ref = kernels.awq_linear(x, qw, qz, sc, g, bias)
    assert torch.equal(kernels.awq_linear(x, packed, qz, sc, g, bias), ref)
    assert torch.equal(kernels.awq_linear(x, packed, qz, sc, g, bias, act="silu_mul"), kernels.silu_mul(ref))
    assert kernels.awq_linear_partials(x, packed, qz, sc, g) is None
    with pytest.raises(ValueError, match="input features"):
        kernels.awq_linear(x, packed[:, :2].contiguous(), qz, sc, g)
    with pytest.raises(ValueError, match="repacked"):
        kernels.awq_linear(x, packed.reshape(N // 16, K // 64, 16, 8), qz, sc, g)


def test_repacked_kernel_choice_covers_every_m():
    """Measured table entries where they exist, the rule elsewhere; every choice names a kernel the runner knows
    and fits the shape (Gluon column tiles divide N)."""
    rd = kernels.repacked_dispatch
    assert [rd.bucket(m) for m in (1, 2, 3, 9, 17, 64, 65, 129, 5000)] == [1, 2, 4, 16, 32, 64, 128, 256, 4096]
    assert rd.select(1, 14336, 4096, 128) == {k: v for k, v in rd._table()["K4096/N14336/M1"].items() if k != "us"}
    for N, K in ((14336, 4096), (4096, 4096), (6144, 4096), (28672, 4096), (384, 256)):
        for M in (1, 2, 5, 16, 24, 64, 100, 256, 3000):
            for g in (32, 64, 128):
                cfg = rd.select(M, N, K, g)
                assert cfg["kernel"] in ("gluon", "wgmma", "pipelined", "dot", "dequant"), cfg
                if cfg["kernel"] == "gluon":
                    assert N % (16 * cfg["num_warps"] * cfg["T"]) == 0 and cfg.get("BM", 8) >= min(M, 16)
                if cfg["kernel"] == "wgmma":
                    assert N % cfg["BN"] == 0 and M > 16
                if cfg["kernel"] == "pipelined":  # the register-A wgmma kernel from 64 rows up
                    assert N % (16 * cfg["W"] * cfg["T"]) == 0 and M > 32 and cfg["DEPTH"] in (0, 1)
                    # buffers in pairs of 64-feature steps: group 128, an even ring of 4 or more
                    assert not cfg.get("PAIR") or (g == 128 and cfg["STAGES"] % 2 == 0 and cfg["STAGES"] >= 4)
                elif cfg["kernel"] != "dequant" or M < 256:  # dequantize + cuBLAS only where it was measured
                    assert M <= 32, (M, N, K, g, cfg)
    for M in (1, 16, 64, 300, 4096):  # fp16 activations take the same measured configs as bf16; fp32 the fallback
        assert rd.select(M, 4096, 14336, 128, torch.float16) == rd.select(M, 4096, 14336, 128, torch.bfloat16)
    assert rd.select(300, 4096, 4096, 128, torch.float32)["kernel"] == "dequant"
    for M in (1, 4, 16, 32, 64, 128, 1024):  # the tuner's space: the current choice first, all distinct, all fit
        cands = rd.candidates(M, 14336, 4096, 128)
        assert cands[0] == rd.select(M, 14336, 4096, 128) and len(cands) > 1
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
        assert all(c.get("STAGES", 4) % 2 == 0 for c in cands if c.get("PAIR"))
    assert not rd.supported(4096, 4096, 128, torch.bfloat16, "cpu")
    assert not rd.supported(4096, 4104, 128, torch.bfloat16, "cpu")


def test_repacked_table_per_card():
    """Each card reads its own measured entries over the H100's; cards without a table read the H100's."""
    rd = kernels.repacked_dispatch
    assert rd.card_of("NVIDIA H200") == "h200" and rd.card_of("NVIDIA H100 80GB HBM3") == "h100"
    assert rd.card_of("NVIDIA A100-SXM4-80GB") == "h100"
    h100, h200 = rd._table("h100"), rd._table("h200")
    assert set(h100) <= set(h200)
    own = json.loads(rd.table_path("h200").read_text())["configs"] if rd.table_path("h200").exists() else {}
    for key, cfg in own.items():
        assert h200[key] == cfg
        K, N, M, dt = rd.parse_key(key)
        dtype = torch.float16 if dt == "fp16" else torch.bfloat16
        assert rd.select(M, N, K, 128, dtype, card="h200") == {k: v for k, v in cfg.items() if k != "us"}
        if dt is None and key + "/fp16" not in own:  # fp16 shares the entry where it has none of its own
            assert rd.select(M, N, K, 128, torch.float16, card="h200") == rd.select(M, N, K, 128, card="h200")
    assert all(h200[k] == v for k, v in h100.items() if k not in own)


def test_every_table_entry_launches_with_its_kernels_arguments():
    """Every measured entry of every card names a kernel :func:`kernels.repacked_dispatch.run` knows, with
    keyword arguments that kernel's launcher takes (a table written by a newer probe cannot reach a launcher that
    would reject it on the request path)."""
    import inspect

    from kernels import awq_gluon_mma, awq_gluon_pipelined, awq_gluon_wgmma, awq_repacked_dot

    launchers = {"gluon": awq_gluon_mma.gluon_mma, "wgmma": awq_gluon_wgmma.gluon_wgmma,
                 "pipelined": awq_gluon_pipelined.gluon_pipelined,
                 "dot": awq_repacked_dot.dot_repacked, "dequant": awq_repacked_dot.dequant_matmul_repacked}
    rd = kernels.repacked_dispatch
    for card in rd.CARDS:
        for key, cfg in rd._table(card).items():
            params = inspect.signature(launchers[cfg["kernel"]]).parameters
            unknown = set(cfg) - {"kernel", "us"} - set(params)
            assert not unknown, (card, key, cfg, unknown)


@pytest.mark.parametrize("M", [1, 3, 16, 33, 300])
def test_default_configs_run(M):
    """Whatever the dispatcher picks for a shape it has never seen runs correctly (default launch params)."""
    K, N, g = 256, 72, 128
    w = random_weights(K, N, g)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    dispatch.clear_cache()
    cfg = dispatch.select_config(M, N, K, g, x.dtype, x.device)
    assert cfg["kernel"] in dispatch.KERNEL_NAMES
    y = dispatch.run_config(cfg, x, *w, g)
    assert rel(y, ref64(x, *w, g)) < 1e-2


def test_candidates_are_all_valid():
    K, N, g = 256, 72, 128
    w = random_weights(K, N, g)
    for M in (1, 64, 256):
        for cfg in dispatch.candidates(M, N, K, g, sms=4):
            assert cfg["kernel"] in dispatch.KERNEL_NAMES
    # one of each kernel in the tuning space really runs from the candidate lists (decode at M=1, swap and
    # splitk at M=64, gemm and dequant at M=256)
    seen = set()
    for M in (1, 64, 256):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        for cfg in dispatch.candidates(M, N, K, g, sms=4):
            if cfg["kernel"] not in seen:
                seen.add(cfg["kernel"])
                assert rel(dispatch.run_config(cfg, x, *w, g), ref64(x, *w, g)) < 1e-2
    assert seen == {"decode", "swap", "splitk", "gemm", "dequant"}


def test_awq_linear_cpu_uses_reference_any_leading_shape():
    K, N, g = 128, 40, 32
    w = random_weights(K, N, g)
    x = torch.randn(2, 3, K, dtype=torch.bfloat16)
    b = torch.randn(N, dtype=torch.bfloat16)
    y = kernels.awq_linear(x, *w, g, b)
    assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
    assert torch.equal(y, kernels.awq_linear_reference(x, *w, g, b))
    assert rel(y.reshape(6, N), ref64(x.reshape(6, K), *w, g, b)) < 1e-2


@pytest.mark.parametrize("case", ["x_dtype", "qweight_dtype", "qzeros_dtype", "scales_dtype", "k_mismatch",
                                  "k_not_multiple", "qzeros_shape", "scales_shape", "bias_shape", "group_type"])
def test_bad_inputs_raise_before_launch(case):
    K, N, g = 128, 40, 32
    qw, qz, sc = random_weights(K, N, g)
    x = torch.randn(2, K, dtype=torch.bfloat16)
    bias = None
    if case == "x_dtype":
        x = x.to(torch.int32)
    elif case == "qweight_dtype":
        qw = qw.to(torch.int64)
    elif case == "qzeros_dtype":
        qz = qz.to(torch.int16)
    elif case == "scales_dtype":
        sc = sc.to(torch.int32)
    elif case == "k_mismatch":
        x = torch.randn(2, K + 8, dtype=torch.bfloat16)
    elif case == "k_not_multiple":
        g = 48
    elif case == "qzeros_shape":
        qz = qz[:-1]
    elif case == "scales_shape":
        sc = sc[:, :-8]
    elif case == "bias_shape":
        bias = torch.randn(N + 8, dtype=torch.bfloat16)
    elif case == "group_type":
        g = 32.0
    with pytest.raises((TypeError, ValueError), match="awq_linear"):
        kernels.awq_linear(x, qw, qz, sc, g, bias)


def test_triton_only_checks():
    K, N, g = 128, 40, 32
    qw, qz, sc = random_weights(K, N, g)
    x32 = torch.randn(2, K)
    with pytest.raises(TypeError, match="x must be one of"):
        dispatch.check_inputs(x32, qw, qz, sc, g, for_triton=True)
    with pytest.raises(ValueError, match="group sizes"):
        q2 = awq_layout.pack_int4(torch.randint(0, 16, (256, N), dtype=torch.int32))
        dispatch.check_inputs(torch.randn(1, 256, dtype=torch.bfloat16), q2, qz[:1], sc[:1], 256, for_triton=True)
    with pytest.raises(ValueError, match="contiguous"):
        wide = random_weights(K, 2 * N, g)
        dispatch.check_inputs(x32.bfloat16(), wide[0][:, : N // 8], wide[1][:, : N // 8], wide[2][:, :N], g,
                              for_triton=True)


def test_m_buckets():
    assert [dispatch.m_bucket(m) for m in (1, 2, 3, 5, 9, 33, 100, 257, 5000)] == [1, 2, 4, 8, 16, 64, 128, 512, 4096]


def test_tuned_table_is_consistent():
    if not dispatch.TABLE_PATH.exists():
        pytest.skip("no measured table yet")
    t = json.loads(dispatch.TABLE_PATH.read_text())
    assert set(t["bucket_kernels"]) == {str(b) for b in dispatch.M_BUCKETS}
    assert set(t["bucket_kernels"].values()) <= set(dispatch.KERNEL_NAMES)
    assert "device" in t["meta"] and "commit" in t["meta"]
    for key, cfg in t["configs"].items():
        assert cfg["kernel"] in dispatch.KERNEL_NAMES, key
    from benchmarks.kernels import ISSUE_SHAPES

    for K, N in ISSUE_SHAPES:  # every shape the issue's benchmark names has a config for every M bucket
        for b in dispatch.M_BUCKETS:
            assert dispatch.key_str((b, N, K, 128, "bf16")) in t["configs"]
    # fp16 (a table measured in bf16) takes the bf16 entry, not the untuned default
    dispatch.clear_cache()
    try:
        for M in (1, 16, 64, 4096):
            want = t["configs"][dispatch.key_str((dispatch.m_bucket(M), 14336, 4096, 128, "bf16"))]
            got = dispatch.select_config(M, 14336, 4096, 128, torch.float16, torch.device("cpu"))
            assert got == want, (M, got, want)
    finally:
        dispatch.clear_cache()
