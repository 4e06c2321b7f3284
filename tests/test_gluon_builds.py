"""CPU checks of the Gluon kernels' sm_90 builds: the repacked words load 16 bytes per instruction.

Why: the word offset of a 64-feature step used to keep a ``(k0 % 64) // 16`` term that is always 0 there but
hid the 16-byte alignment from the compiler: every thread's four words loaded as four 4-byte loads (seen in the
PTX of the decode kernel and the pipelined kernel). Built here with the divisibility the launcher gives aligned
tensors and sizes that are multiples of 16, as on the GPU.
"""

from __future__ import annotations

import re

import pytest
import torch

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
    return {m: ptx.count(m) for m in set(re.findall(r"ld\.global[\w.:]*", ptx))}


def _decode_ptx(SCALED: bool, TAIL: int = 0, XSTEPS: int = 0, XONCE: bool = False, PDL: int = 0,
                PREFETCH: bool = False, XSUM_MMA: bool = False, T: int = 2, ZSUB: bool = False,
                XREADY: bool = False, BM: int = 8, W: int = 4, EVICT_FIRST: bool = False, dt: str = "bf16") -> str:
    """The small-M kernel's sm_90 PTX (by default 4 warps, two tiles each, 8 rows; 64-feature steps, group 128;
    ``dt``: x, scales and y in bf16 or fp16)."""
    BK = 64
    mma, a_l, b_l, w_l, x_l = gm._layouts(W, BK, T)
    sig = dict(zip(["x_ptr", "pw_ptr", "qz_ptr", "s_ptr", "b_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "M", "N", "K",
                    "stride_xm", "stride_ym", "SPLIT_K", "groups_per_split"],
                   ["*" + dt, "*i32", "*i32", "*" + dt, "*" + dt, "*" + dt, "*fp32", "*i32"] + ["i32"] * 7))
    cst = dict(GROUP=128, BK=BK, BM=BM, W=W, T=T, HAS_BIAS=False, TAIL=TAIL, PREFETCH=PREFETCH, SCALED=SCALED,
               UNROLL=gm.tail_unroll(16 * W * T * BM, 32 * W), mma=mma, a_l=a_l, b_l=b_l, w_l=w_l, x_l=x_l,
               XSTEPS=XSTEPS, XONCE=XONCE, xs_l=gm.staged_layout(BK), PDL=PDL, XSUM_MMA=XSUM_MMA,
               ZSUB=ZSUB, XREADY=XREADY, EVICT_FIRST=EVICT_FIRST)
    return _ptx(gm._awq_gluon_mma_kernel, sig, cst, [n for n in sig if n not in ("M", "SPLIT_K",
                                                                               "groups_per_split")], W)


@pytest.mark.parametrize("SCALED,TAIL", [(True, 0), (False, 0), (True, 1), (True, 2)])
def test_decode_kernel_loads_words_16_bytes_at_a_time(SCALED, TAIL):
    """Every split-K sum builds too (a second launch, the last program from memory, the last split's registers)."""
    loads = _loads(_decode_ptx(SCALED, TAIL))
    # per step: T = 2 16-byte word loads and one 16-byte x load; the 4-byte loads left are the zero points'
    assert loads.get("ld.global.v4.b32", 0) >= 3, loads
    assert loads.get("ld.global.b32", 0) <= loads["ld.global.v4.b32"], loads


@pytest.mark.parametrize("XSTEPS,XONCE", [(8, True), (2, False)])
def test_staged_x_meets_once_per_chunk(XSTEPS, XONCE):
    """``XGROUPS``: x reaches shared memory by ``cp.async`` and each step's B operand by ``ldmatrix``, with one CTA
    barrier per chunk where the unstaged build has two per step (a group's two steps: four)."""
    plain, staged = _decode_ptx(True), _decode_ptx(True, XSTEPS=XSTEPS, XONCE=XONCE)
    bars = [len(re.findall(r"\bbar(rier)?\.sync", p)) for p in (plain, staged)]
    assert "cp.async.cg.shared.global" in staged and "cp.async.wait_group" in staged
    assert "ldmatrix" in staged and "st.shared" not in staged
    assert bars[0] >= 4 and bars[1] <= 2, bars


@pytest.mark.parametrize("SCALED,XSTEPS", [(False, 8), (True, 0)])
def test_early_launch_waits_before_x(SCALED, XSTEPS):
    """``PDL = 2``: the next launch released first, then only the weights touched before ``griddepcontrol.wait``
    (unscaled with ``PREFETCH``: the first step's two 16-byte word loads; scaled: nothing); x (``cp.async`` or a
    load), the counters and ``y`` after it. ``PDL = 0``: no ``griddepcontrol`` at all."""
    ptx = _decode_ptx(SCALED, TAIL=2, XSTEPS=XSTEPS, XONCE=True, PDL=2, PREFETCH=not SCALED)
    body = ptx[ptx.index("griddepcontrol.launch_dependents"):]
    head, tail = body.split("griddepcontrol.wait", 1)
    assert _loads(head) == ({} if SCALED else {"ld.global.v4.b32": 2}), head
    assert not re.search(r"cp\.async|ld\.shared|st\.|atom|red\.", head), head
    assert re.search(r"cp\.async|ld\.global", tail)
    assert "griddepcontrol" not in _decode_ptx(SCALED, TAIL=2, XSTEPS=XSTEPS, XONCE=True, PREFETCH=not SCALED)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_sum_of_x_by_a_ones_mma_needs_no_barrier_per_group(T):
    """``XSUM_MMA`` (unscaled, x staged for the split): the group's sum of x comes from one more ``mma`` per
    16-feature slice and warp, already in the accumulator's layout (its copies for the warp's ``T`` tiles are
    registers: the build fails if that conversion is not trivial), so the per-group ``st.shared`` + CTA barrier
    + ``ld.shared`` that moved the CUDA-core sum there is gone, and no shuffles sum x."""
    plain = _decode_ptx(False, XSTEPS=8, XONCE=True, PREFETCH=True, T=T)
    ones = _decode_ptx(False, XSTEPS=8, XONCE=True, PREFETCH=True, T=T, XSUM_MMA=True)
    bars = [len(re.findall(r"\bbar(rier)?\.sync", p)) for p in (plain, ones)]
    assert bars[1] == bars[0] - 1, bars
    assert "st.shared" in plain and "st.shared" not in ones and "shfl" not in ones
    assert ones.count("mma.sync") * T == plain.count("mma.sync") * (T + 1)


def _bars(ptx: str) -> int:
    return len(re.findall(r"\bbar(rier)?\.sync", ptx))


@pytest.mark.parametrize("loop", [dict(SCALED=True, BM=16, T=1, W=8), dict(SCALED=False, XSUM_MMA=True, PREFETCH=True),
                                  dict(SCALED=False, ZSUB=True, BM=16, T=1, W=8)])
def test_x_waited_for_before_the_loop_leaves_no_barrier_in_it(loop):
    """``XREADY`` (the split's x staged at once): the wait for x's copy and its CTA barrier before the loop; the
    loop itself, from its first ``mma`` on, has no barrier (waited for inside the loop, at the split's first
    step, the compiler also put one in every group)."""
    inside = _decode_ptx(XSTEPS=16, XONCE=True, **loop)
    before = _decode_ptx(XSTEPS=16, XONCE=True, XREADY=True, **loop)
    assert _bars(inside[inside.index("mma.sync"):]) >= 1
    assert _bars(before[before.index("mma.sync"):]) == 0 and _bars(before) == 1
    assert before.index("cp.async.wait_group") < before.index("mma.sync")


def test_zero_points_off_in_the_fragments_without_a_multiply():
    """``ZSUB``: ``(128 + q) - (128 + z)`` in the fragments (a bf16 subtract per weight, as ``SCALED``), the scale
    on each group's fp32 accumulator instead of a bf16 multiply per weight, and no sum of x (no shuffles)."""
    scaled = _decode_ptx(True, XSTEPS=16, XONCE=True, BM=16, T=1, W=8)
    zsub = _decode_ptx(False, XSTEPS=16, XONCE=True, BM=16, T=1, W=8, ZSUB=True)
    count = lambda ptx, op: len(re.findall(rf"\b{op}(\.rn)?\.bf16(x2)?\b", ptx))  # noqa: E731
    assert count(scaled, "sub") == count(zsub, "sub") > 0
    assert count(scaled, "mul") > 0 and count(zsub, "mul") == 0
    assert "fma.rn.f32" in zsub and "shfl" not in zsub
    assert zsub.count("mma.sync") == scaled.count("mma.sync")


def test_next_group_requested_before_this_one_computes():
    """``ZSUB`` with ``PREFETCH = 2``: two groups a trip of the loop (the loaded sets take turns) and the split's odd
    last group after it, so three groups' ``mma`` in the build; in the trip, the next group's words, zero points and
    scales (the 2-byte loads) are requested before the first ``mma``, where without it the scales come after."""
    one = _decode_ptx(False, XSTEPS=16, XONCE=True, XREADY=True, BM=16, T=1, W=8, ZSUB=True)
    two = _decode_ptx(False, XSTEPS=16, XONCE=True, XREADY=True, BM=16, T=1, W=8, ZSUB=True, PREFETCH=2)
    assert two.count("mma.sync") == 3 * one.count("mma.sync")
    head = [p[p.index("Inner Loop Header"):] for p in (one, two)]
    head = [h[:h.index("mma.sync")] for h in head]
    assert "ld.global.b16" not in head[0] and "ld.global.b16" in head[1] and "ld.global.v4" in head[1]


@pytest.mark.parametrize("loop", [dict(SCALED=False, XSUM_MMA=True, PREFETCH=True),
                                  dict(SCALED=False, ZSUB=True, PREFETCH=2, BM=16, T=1, W=8)])
def test_weights_marked_evict_first_only_when_asked(loop):
    """``EVICT_FIRST``: every 16-byte word load carries the evict-first L1 hint and an L2 cache-policy operand
    (``createpolicy.fractional.L2::evict_first``); the zero points and scales keep plain loads (x comes by
    ``cp.async``). Off: no hint."""
    plain = _decode_ptx(XSTEPS=16, XONCE=True, XREADY=True, **loop)
    hinted = _decode_ptx(XSTEPS=16, XONCE=True, XREADY=True, EVICT_FIRST=True, **loop)
    words = _loads(plain).get("ld.global.v4.b32", 0)
    assert words >= 2 and "evict_first" not in plain and "createpolicy" not in plain
    assert _loads(hinted) == {**{k: v for k, v in _loads(plain).items() if k != "ld.global.v4.b32"},
                              "ld.global.L1::evict_first.L2::cache_hint.v4.b32": words}
    assert "createpolicy.fractional.L2::evict_first" in hinted


@pytest.mark.parametrize("loop", [dict(SCALED=True), dict(SCALED=False, XSUM_MMA=True, PREFETCH=True, XSTEPS=8,
                                                                 XONCE=True),
                                  dict(SCALED=False, ZSUB=True, PREFETCH=2, BM=16, T=1, W=8, XSTEPS=16, XONCE=True,
                                       XREADY=True)])
def test_fp16_builds_unpack_to_1024_plus_q_for_fp16_mma(loop):
    """fp16 activations (what most AutoAWQ checkpoints hold): the same loop with the words unpacked into fp16 pairs
    ``1024 + q`` (``lop3`` with 0x64006400, the bf16 build's 0x43004300 absent) feeding ``f16`` MMAs, the zero
    points and scales in fp16 too, and the same count of MMAs and 16-byte word loads as the bf16 build."""
    bf16, fp16 = _decode_ptx(**loop), _decode_ptx(**loop, dt="fp16")
    assert "0x64006400" in fp16 and "0x43004300" not in fp16 and "0x43004300" in bf16
    assert "bf16" not in fp16
    mmas = [re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(\w+)\.\w+\.f32", p) for p in (bf16, fp16)]
    assert set(mmas[0]) == {"bf16"} and set(mmas[1]) == {"f16"} and len(mmas[0]) == len(mmas[1])
    assert _loads(fp16).get("ld.global.v4.b32") == _loads(bf16).get("ld.global.v4.b32")


def test_decode_rule_config_keeps_seven_programs_per_sm(tmp_path):
    """The rule's config for 2-8 rows without a table entry (``SCALED``, two tiles a warp, x read step by step,
    launched early) fits 72 registers a thread, so seven 128-thread programs share an SM: written as two pointer
    adds, x's step address took it to 79 (six programs), and 4096x28672 at 2-8 rows, 896 programs that were one
    wave on 132 SMs, ran 31 % slower on an H200 (22.7 against 29.7 us, same card)."""
    from tests.test_gluon_pipelined_build import _sass

    for dt in ("bf16", "fp16"):
        report, _ = _sass(triton, _decode_ptx(True, TAIL=0, PDL=2, dt=dt), tmp_path)
        assert int(re.search(r"Used (\d+) registers", report).group(1)) <= 72, (dt, report)


def test_ones_mma_refused_where_there_is_no_sum_of_x():
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="XSUM_MMA"):
        gm.gluon_mma(x, torch.zeros(128 * 128 // 8, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32),
                     torch.zeros(1, 128, dtype=torch.bfloat16), 128, SCALED=True, XSUM_MMA=True)
    with pytest.raises(ValueError, match="ZSUB"):
        gm.gluon_mma(x, torch.zeros(128 * 128 // 8, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32),
                     torch.zeros(1, 128, dtype=torch.bfloat16), 128, SCALED=True, ZSUB=True)
    with pytest.raises(ValueError, match="XREADY"):  # x not staged: nothing to wait for before the loop
        gm.gluon_mma(x, torch.zeros(128 * 128 // 8, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32),
                     torch.zeros(1, 128, dtype=torch.bfloat16), 128, XREADY=True)
    with pytest.raises(ValueError, match="PREFETCH 2"):  # the next group's set: the ZSUB loop only
        gm.gluon_mma(x, torch.zeros(128 * 128 // 8, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32),
                     torch.zeros(1, 128, dtype=torch.bfloat16), 128, SCALED=True, PREFETCH=2)
    with pytest.raises(ValueError, match="MAXNREG"):
        gm.gluon_mma(x, torch.zeros(128 * 128 // 8, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32),
                     torch.zeros(1, 128, dtype=torch.bfloat16), 128, ZSUB=True, MAXNREG=60)
    with pytest.raises(ValueError, match="PREFETCH 0"):
        gm.gluon_mma(x, torch.zeros(128 * 128 // 8, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32),
                     torch.zeros(1, 128, dtype=torch.bfloat16), 128, ZSUB=True, PREFETCH=3)


@pytest.mark.parametrize("x_dtype,s_dtype,match", [(torch.float32, torch.float32, "bf16 or fp16 x"),
                                                   (torch.float16, torch.bfloat16, "scales in x's dtype")])
def test_gluon_launchers_refuse_other_dtypes_before_launch(x_dtype, s_dtype, match):
    """fp32 x, or scales of another dtype than x (the fragments are offset and scaled in x's dtype): a clear error
    from each Gluon launcher, before anything is built (these run on the CPU)."""
    from kernels.awq_gluon_pipelined import gluon_pipelined
    from kernels.awq_gluon_wgmma import gluon_wgmma

    x = torch.zeros(1, 128, dtype=x_dtype)
    args = (torch.zeros(128 * 128 // 8, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32),
            torch.zeros(1, 128, dtype=s_dtype), 128)
    for launcher in (gm.gluon_mma, gluon_wgmma, gluon_pipelined):
        with pytest.raises(ValueError, match=match):
            launcher(x, *args)


def test_staged_steps():
    """Chunks: the split at once where it fits (a power of 2 of steps), else two buffers within the budget."""
    assert gm.staged_steps(0, 4, 2, 1024) == (0, False)
    assert gm.staged_steps(64, 4, 2, 1024) == (8, True)  # the split, 4 groups of 2 steps
    assert gm.staged_steps(64, 7, 2, 2048) == (16, True)  # 14 steps rounded up, 32 KB
    assert gm.staged_steps(64, 28, 2, 2048) == (16, False)  # 56 steps > 64 KB: two 32 KB buffers
    assert gm.staged_steps(1, 28, 2, 2048) == (2, False)
    assert gm.staged_steps(3, 11, 1, 1024) == (4, False)
    steps, _ = gm.staged_steps(64, 1000, 4, 8192)
    assert 2 * steps * 8192 <= gm.XSTAGE_BYTES and steps >= 4  # a chunk holds a group at least


def test_read_floor_under_pdl_reads_one_block_before_the_wait():
    """The probe's streaming floor under programmatic dependent launch reads its first block before
    ``griddepcontrol.wait`` and the rest after, as the small-M kernel requests only its first step's weights there:
    a read of everything before the wait let consecutive calls on one buffer share their lines in L2 (a 'floor' of
    7.3 us for 121 MB, 2026-11-29)."""
    from benchmarks import gluon_probe as gp

    sig = {"p": "*i32", "out": "*i32", "n_words": "i32", "ITERS": "i32", "BLOCK": "constexpr", "PDL": "constexpr"}
    ptxs = {pdl: triton.compile(triton.compiler.ASTSource(fn=gp._stream_read, signature=sig,
                                                          constexprs={"BLOCK": 1024, "PDL": pdl},
                                                          attrs={(i,): [["tt.divisibility", 16]] for i in (0, 2)}),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
            for pdl in (False, True)}
    assert "griddepcontrol" not in ptxs[False]
    before, after = ptxs[True].split("griddepcontrol.wait")
    assert "griddepcontrol.launch_dependents" in before
    # one block of 1024 words over 128 threads: two 16-byte loads a thread before the wait, the loop's after it
    assert before.count("ld.global.v4") == 2 and "ld.global" in after
