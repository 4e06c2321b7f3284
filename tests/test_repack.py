"""CPU tests of the fragment repack (kernels/awq_repack.py) and of the Gluon kernel's sm_90 build.

The Gluon kernel itself cannot run here (Gluon has no interpreter); its build is checked instead: it compiles for
sm_90 only if the dequantized weights are already in the MMA operand's register layout (``convert_layout(...,
assert_trivial=True)``), and its TTGIR must allocate no shared memory for them.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.awq_layout import pack_int4
from kernels.awq_repack import codes_to_fragments, fragments_to_codes, repack_awq


def test_repack_round_trip_and_fragment_positions():
    codes = torch.randint(0, 16, (256, 96), dtype=torch.int32)
    packed = repack_awq(pack_int4(codes))
    assert packed.shape == (96 // 16, 256 // 64, 32, 4) and packed.dtype == torch.int32
    assert torch.equal(fragments_to_codes(packed), codes)
    assert torch.equal(codes_to_fragments(codes), packed)
    rng = random.Random(0)
    for _ in range(500):  # lane (g, t), element r of the m16n8k16 A fragment: n = g + 8 b1, k = 2t + b0 + 8 b2
        nt, kc, g, t, j, r = (rng.randrange(6), rng.randrange(4), rng.randrange(8), rng.randrange(4),
                              rng.randrange(4), rng.randrange(8))
        word = int(packed[nt, kc, 4 * g + t, j]) & 0xFFFFFFFF
        nibble = (r >> 1) if r % 2 == 0 else 4 + (r >> 1)
        n = 16 * nt + g + 8 * ((r >> 1) & 1)
        k = 64 * kc + 16 * j + 2 * t + (r & 1) + 8 * (r >> 2)
        assert (word >> (4 * nibble)) & 0xF == int(codes[k, n])


def test_repack_refuses_shapes_without_whole_tiles():
    with pytest.raises(ValueError, match="multiple of 16"):
        codes_to_fragments(torch.zeros((64, 24), dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 64"):
        codes_to_fragments(torch.zeros((96, 32), dtype=torch.int32))


@pytest.mark.parametrize("warps,group,bm,tiles,prefetch,scaled,wm", [(4, 128, 8, 4, True, False, 1),
                                                                    (4, 32, 16, 2, False, True, 1),
                                                                    (2, 64, 8, 1, True, False, 1),
                                                                    (4, 128, 64, 1, False, True, 2),
                                                                    (2, 128, 64, 2, False, False, 4)])
def test_gluon_kernel_builds_for_sm90_without_shared_memory(warps, group, bm, tiles, prefetch, scaled, wm):
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.experimental import gluon

        from kernels import awq_gluon_mma as gm
    except ImportError as e:  # pragma: no cover - Triton without Gluon
        pytest.skip(f"no Gluon: {e}")
    bk = min(64, group)
    mma, a_l, b_l, w_l, x_l = gm._layouts(warps, bk, tiles, wm)
    sig = {"x_ptr": "*bf16", "pw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "b_ptr": "*bf16",
           "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_ym": "i32", "SPLIT_K": "i32", "groups_per_split": "i32"}
    cst = dict(GROUP=group, BK=bk, BM=bm, W=warps, T=tiles, HAS_BIAS=True, TAIL=True, PREFETCH=prefetch, SCALED=scaled,
               UNROLL=gm.tail_unroll(16 * warps * tiles * bm, 32 * warps * wm), mma=mma, a_l=a_l, b_l=b_l, w_l=w_l, x_l=x_l,
               XSTEPS=0, XONCE=False, xs_l=gm.staged_layout(bk), PDL=0, XSUM_MMA=False, ZSUB=False, XREADY=False,
               EVICT_FIRST=False)
    sig.update({k: "constexpr" for k in cst})
    src = gluon._runtime.GluonASTSource(gm._awq_gluon_mma_kernel, signature=sig, constexprs=cst)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps * wm})
    ttgir = compiled.asm["ttgir"]
    assert "mma" in ttgir and "local_alloc" not in ttgir
