"""CPU checks of the Gluon kernels' sm_90 builds: the repacked words load 16 bytes per instruction.

Why: the word offset of a 64-feature step used to keep a ``(k0 % 64) // 16`` term that is always 0 there but
hid the 16-byte alignment from the compiler: every thread's four words loaded as four 4-byte loads (seen in the
PTX of the decode kernel and the pipelined kernel). Built here with the divisibility the launcher gives aligned
tensors and sizes that are multiples of 16, as on the GPU.
"""

from __future__ import annotations

import re

import pytest

gluon_ok = True
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental import gluon

    from kernels import awq_gluon_mma as gm
except ImportError:  # pragma: no cover - Triton without Gluon
    gluon_ok = False

pytestmark = pytest.mark.skipif(not gluon_ok, reason="needs Triton with Gluon")


def _ptx(fn, sig: dict, cst: dict, aligned: list[str], num_warps: int) -> str:
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    sig = {**sig, **{k: "constexpr" for k in cst}}
    src = gluon._runtime.GluonASTSource(fn, signature=sig, constexprs=cst, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


def _loads(ptx: str) -> dict:
    return {m: ptx.count(m) for m in set(re.findall(r"ld\.global[\w.]*", ptx))}


@pytest.mark.parametrize("SCALED,TAIL", [(True, 0), (False, 0), (True, 1), (True, 2)])
def test_decode_kernel_loads_words_16_bytes_at_a_time(SCALED, TAIL):
    """Every split-K sum builds too (a second launch, the last program from memory, the last split's registers)."""
    W, T, BK = 4, 2, 64
    mma, a_l, b_l, w_l, x_l = gm._layouts(W, BK, T)
    sig = dict(zip(["x_ptr", "pw_ptr", "qz_ptr", "s_ptr", "b_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "M", "N", "K",
                    "stride_xm", "stride_ym", "SPLIT_K", "groups_per_split"],
                   ["*bf16", "*i32", "*i32", "*bf16", "*bf16", "*bf16", "*fp32", "*i32"] + ["i32"] * 7))
    unroll = gm.tail_unroll(16 * W * T * 8, 32 * W)
    cst = dict(GROUP=128, BK=BK, BM=8, W=W, T=T, HAS_BIAS=False, TAIL=TAIL, PREFETCH=False, SCALED=SCALED,
               UNROLL=unroll, mma=mma, a_l=a_l, b_l=b_l, w_l=w_l, x_l=x_l)
    ptx = _ptx(gm._awq_gluon_mma_kernel, sig, cst, [n for n in sig if n not in ("M", "SPLIT_K",
                                                                               "groups_per_split")], W)
    loads = _loads(ptx)
    # per step: T 16-byte word loads and one 16-byte x load; the 4-byte loads left are the zero points'
    assert loads.get("ld.global.v4.b32", 0) >= T + 1, loads
    assert loads.get("ld.global.b32", 0) <= loads["ld.global.v4.b32"], loads
