"""CPU checks of the pipelined register-A wgmma kernel's sm_90 build (kernels/awq_gluon_pipelined.py).

Gluon has no interpreter, so the kernel runs only on the GPU (tests/gpu); here its build is checked with the
ptxas and cuobjdump that ship with Triton: the dequantized weights reach ``wgmma`` straight from registers (the
layout conversion is trivial or the build fails), ptxas keeps the wgmmas asynchronous (no C7513 serialization)
and no instruction writes a register an in-flight ``HGMMA`` still reads (``tests/sass_hazards.py``).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from tests.sass_hazards import hazards


def _compile(kernel, sig, cst, num_warps):
    """``kernel`` built for sm_90 with the divisibility the launcher gives aligned pointers and sizes that are
    multiples of 16 (as on the GPU)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.experimental import gluon

    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("pw_ptr", "qz_ptr", "s_ptr", "b_ptr", "y_ptr",
                                                                      "ws_ptr", "N", "K", "stride_ym") if n in names}
    sig = {**sig, **{k: "constexpr" for k in cst}}
    src = gluon._runtime.GluonASTSource(kernel, signature=sig, constexprs=cst, attrs=attrs)
    return triton, triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _gluon():
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        from triton.runtime.jit import mangle_type

        from kernels import awq_gluon_pipelined as gp
    except ImportError as e:  # pragma: no cover - Triton without Gluon
        pytest.skip(f"no Gluon: {e}")
    return gl, TensorDescriptor, mangle_type, gp


def _signature(BB, BK, extra, dt="bf16"):
    gl, TensorDescriptor, mangle_type, _ = _gluon()
    x = torch.zeros((512, 1024), dtype=torch.float16 if dt == "fp16" else torch.bfloat16)
    desc = TensorDescriptor.from_tensor(x, [BB, BK], gl.NVMMASharedLayout.get_default_for(
        [BB, BK], gl.float16 if dt == "fp16" else gl.bfloat16))
    return {"x_desc": mangle_type(desc), "pw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*" + dt, "b_ptr": "*" + dt,
            "y_ptr": "*" + dt, "ws_ptr": "*fp32", **extra, "M": "i32", "N": "i32", "K": "i32", "stride_ym": "i32",
            "SPLIT_K": "i32", "steps_per_split": "i32", "FULL": "i32"}


def _build(W, T, BB, BK, STAGES, DEPTH, group, TAIL=True, LAST_WAVE=False, PAIR=False, UNEVEN=False,
           AFTER_TAIL=False, dt="bf16", **specialized):
    """The kernel built for sm_90; ``specialized``: runtime arguments as the launcher's specialization makes them
    constants (an integer argument equal to 1, e.g. ``SPLIT_K=1``)."""
    _, _, _, gp = _gluon()
    acc_l, a_l, w_l, o_l = gp._pipelined_layouts(W, T, BB, BK)
    cst = dict(**specialized, GROUP=group, BK=BK, BB=BB, W=W, T=T, STAGES=STAGES, DEPTH=DEPTH, HAS_BIAS=True,
               TAIL=TAIL, LAST_WAVE=LAST_WAVE, PAIR=PAIR, UNEVEN=UNEVEN, acc_l=acc_l, a_l=a_l, w_l=w_l, o_l=o_l,
               AFTER_TAIL=AFTER_TAIL)
    return _compile(gp._awq_gluon_pipelined_kernel, _signature(BB, BK, {"cnt_ptr": "*i32"}, dt), cst, W)


def _sass(triton, ptx, tmp_path):
    """ptxas's report and the SASS of ``ptx`` for sm_90a, with the tools that ship with Triton."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(bindir, "cuobjdump")
    (tmp_path / "k.ptx").write_text(ptx)
    built = None
    for name in ("ptxas", "ptxas-blackwell"):  # the first that takes this PTX version (Triton 3.9: the second)
        exe = os.path.join(bindir, name)
        if os.access(exe, os.X_OK):
            run = subprocess.run([exe, "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                built = run
                break
    if built is None or not os.access(cuobjdump, os.X_OK):
        pytest.skip("this Triton ships no ptxas that takes its PTX, or no cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True,
                          check=True).stdout
    return built.stderr + built.stdout, sass


@pytest.mark.parametrize("W,T,BB,BK,STAGES,DEPTH,group,PAIR", [
    (4, 1, 128, 64, 4, 1, 128, False), (8, 1, 256, 64, 4, 1, 128, False), (4, 2, 64, 32, 3, 0, 32, False),
    (8, 1, 128, 64, 2, 1, 64, False), (8, 1, 256, 64, 4, 1, 128, True), (4, 1, 128, 64, 4, 0, 128, True),
    (4, 2, 64, 32, 6, 1, 64, True)])
def test_pipelined_kernel_builds_async_without_register_hazards(W, T, BB, BK, STAGES, DEPTH, group, PAIR, tmp_path):
    """``PAIR`` too (x's buffers filled and waited for in pairs of steps): one TMA barrier wait per two steps."""
    triton, compiled = _build(W, T, BB, BK, STAGES, DEPTH, group, PAIR=PAIR)
    ptx = compiled.asm["ptx"]
    assert ptx.count("wgmma.mma_async") >= 2 * T * (BK // 16)  # both unrolled steps, every 16-feature slice
    report, sass = _sass(triton, ptx, tmp_path)
    assert "C7513" not in report, "ptxas serialized the wgmmas"
    assert "HGMMA" in sass and ("DEPBAR.LE gsb0, 0x1" in sass) == (DEPTH == 1)
    assert hazards(sass) == []
    if PAIR:  # the loop body (two steps) waits on one barrier and issues one refill (two boxes)
        unpaired = _build(W, T, BB, BK, STAGES, DEPTH, group)[1].asm["ptx"]
        assert ptx.count("mbarrier.try_wait") < unpaired.count("mbarrier.try_wait"), "no barrier wait saved"


@pytest.mark.parametrize("W,BB,STAGES,PAIR", [(4, 256, 3, False), (8, 256, 4, False), (4, 128, 4, True)])
def test_fp16_build_matches_the_bf16_one(W, BB, STAGES, PAIR, tmp_path):
    """fp16 x (most AutoAWQ checkpoints): fp16 ``wgmma``s fed from registers, still asynchronous and free of register
    hazards, the words unpacked to ``1024 + q``, in no more registers than the bf16 build (the table's
    configs, tuned in bf16, keep their programs per SM)."""
    builds = {dt: _build(W, 1, BB, 64, STAGES, 1, 128, TAIL=2, PAIR=PAIR, dt=dt) for dt in ("bf16", "fp16")}
    triton, fp16 = builds["fp16"]
    ptx = fp16.asm["ptx"]
    assert "0x64006400" in ptx and "bf16" not in ptx and ".f16.f16" in ptx
    assert ptx.count("wgmma.mma_async") == builds["bf16"][1].asm["ptx"].count("wgmma.mma_async")
    report, sass = _sass(triton, ptx, tmp_path)
    assert "C7513" not in report and hazards(sass) == []
    regs = [int(re.search(r"Used (\d+) registers", _sass(triton, b.asm["ptx"], tmp_path)[0]).group(1))
            for b in (builds["bf16"][1], fp16)]
    assert regs[1] <= regs[0], regs


def test_register_tail_keeps_two_programs_per_sm_without_spills(tmp_path):
    """``TAIL = 2`` at 256 rows, one warpgroup: the split-K sum adds the other splits into the accumulator
    itself, so the build fits 256 registers a thread without spilling (two programs per SM: the point of splitting
    at 256 rows), where the last-program sum from memory (``TAIL = 1``) keeps a second tile live and spills."""
    for last_wave, uneven in ((False, False), (True, False), (True, True)):  # the last-wave grid too, with LEAD
        triton, compiled = _build(4, 1, 256, 64, 3, 1, 128, TAIL=2, LAST_WAVE=last_wave, UNEVEN=uneven)
        report, _ = _sass(triton, compiled.asm["ptx"], tmp_path)
        regs = int(re.search(r"Used (\d+) registers", report).group(1))
        assert regs <= 256 and re.search(r"\b0 bytes spill stores", report), (last_wave, uneven, report)
        assert compiled.metadata.shared <= 228 * 1024 // 2 - 1024  # two programs' shared memory fit one SM


def test_whole_tiles_after_the_split_tail_end_after_it():
    """``WS_TAIL`` under PDL: the whole tiles' launch, started early, waits for the split tiles' grid at its
    end (so a reader of y that waits for it waits for both); without ``AFTER_TAIL`` the build has no wait."""
    assert "griddepcontrol.wait" not in _build(4, 1, 256, 64, 3, 1, 128, TAIL=2, LAST_WAVE=True)[1].asm["ptx"]
    ptx = _build(4, 1, 256, 64, 3, 1, 128, TAIL=2, LAST_WAVE=True, AFTER_TAIL=True)[1].asm["ptx"]
    tail = ptx[ptx.rindex("wgmma.wait_group"):]
    assert "griddepcontrol.wait" in tail and "st.global" in tail


def test_lead_gives_the_last_split_the_extra_groups():
    """``LEAD``: the splits but the last keep ``(groups - lead) // splits`` groups (never fewer than one, never
    more than without it); the last takes the rest."""
    _, _, _, gp = _gluon()
    assert gp._lead_groups(32, 2, 16, 0) == 16
    assert gp._lead_groups(32, 2, 16, 2) == 15  # 15 + 17
    assert gp._lead_groups(32, 2, 16, 1) == 15  # uneven: 15 + 17
    assert gp._lead_groups(3, 3, 1, 2) == 1  # never below one group
    assert gp._lead_groups(8, 3, 3, 2) == 2  # 2 + 2 + 4


@pytest.mark.parametrize("TAIL", [0, 1, 2])
def test_split_one_launch_builds(TAIL):
    """A launch without split-K passes ``SPLIT_K = 1``, which Triton turns into a constant: every epilogue must
    build that way too (an epilogue that routed the constant through a variable crashed the LLVM lowering of
    Triton 3.6, seen only on the GPU; the last-wave grid always has 2 or more splits)."""
    _, compiled = _build(4, 1, 256, 64, 3, 1, 128, TAIL=TAIL, SPLIT_K=1)
    assert "wgmma.mma_async" in compiled.asm["ptx"]


def test_hazard_reader_finds_a_rewritten_operand():
    """The reader itself: a write to an in-flight HGMMA's A registers inside a loop is found; after the retiring
    DEPBAR it is not."""
    sass = """
        /*0000*/ HGMMA.64x128x16.F32.BF16 R24, R92, gdesc[UR8], R24, gsb0 ;
        /*0010*/ LOP3.LUT R93, R7, 0xf000f, R8, 0xea, !PT ;
        /*0020*/ WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0030*/ @P0 BRA 0x0 ;
        /*0040*/ EXIT ;
    """
    assert len(hazards(sass)) == 1
    assert hazards(sass.replace("LOP3.LUT R93", "LOP3.LUT R13")) == []
    late = sass.replace("/*0010*/ LOP3.LUT R93, R7, 0xf000f, R8, 0xea, !PT ;", "/*0010*/ NOP ;").replace(
        "/*0030*/ @P0 BRA 0x0 ;", "/*0030*/ IADD3 R92, R1, 1, RZ ;")
    assert hazards(late) == []


def test_tile_trace_copy_builds(tmp_path):
    """``benchmarks/tile_trace.py`` patches the kernel's source at named places: the traced copy still builds for
    sm_90 and reads the timer at each program's start and end (a moved anchor fails here, not on the GPU)."""
    _gluon()
    from benchmarks import tile_trace

    tp = tile_trace.traced_module(tmp_path)
    acc_l, a_l, w_l, o_l = tp._pipelined_layouts(8, 1, 256, 64)
    cst = dict(GROUP=128, BK=64, BB=256, W=8, T=1, STAGES=4, DEPTH=1, HAS_BIAS=False, TAIL=2, LAST_WAVE=True,
               PAIR=False, UNEVEN=True, acc_l=acc_l, a_l=a_l, w_l=w_l, o_l=o_l, AFTER_TAIL=False)
    sig = _signature(256, 64, {"cnt_ptr": "*i32", "trace_ptr": "*i64"})
    _, compiled = _compile(tp._awq_gluon_pipelined_kernel, sig, cst, 8)
    assert compiled.asm["ptx"].count("%globaltimer") == 2
    with pytest.raises(ValueError, match="no longer in"):
        tile_trace.traced_source("def something_else(): pass\n")


def _build_ws_tail(W, T, BB, BK, STAGES, DEPTH, group, PAIR=False):
    """The split-tail kernel (``WS_TAIL``) built for sm_90."""
    gl, _, _, gp = _gluon()
    acc_l, a_l, w_l, o_l = gp._pipelined_layouts(W, T, BB, BK)
    sig = {k: v for k, v in _signature(BB, BK, {}).items() if k not in ("ws_ptr", "SPLIT_K", "steps_per_split",
                                                                          "FULL")}
    cst = dict(GROUP=group, BK=BK, BB=BB, W=W, T=T, STAGES=STAGES, DEPTH=DEPTH, HAS_BIAS=True, PAIR=PAIR,
               WORKER_REGS=gp.WS_WORKER_REGS, PDL=True, acc_l=acc_l, a_l=a_l, w_l=w_l, o_l=o_l,
               part_l=gp._partial_layout(16 * W * T, BB))
    return _compile(gp._awq_tail_ws_kernel, {**sig, "first": "i32", "tile0": "i32"}, cst, W)


@pytest.mark.parametrize("T,BB,BK,STAGES,DEPTH,group,PAIR", [(1, 256, 64, 3, 1, 128, False),
                                                             (2, 128, 64, 5, 0, 128, False),
                                                             (1, 64, 64, 6, 1, 128, True)])
def test_split_tail_kernel_builds_two_warpgroups_without_spills(T, BB, BK, STAGES, DEPTH, group, PAIR, tmp_path):
    """``WS_TAIL``'s kernel: a worker warpgroup beside the default one (registers handed over by ``setmaxnreg``),
    both halves' wgmmas asynchronous, no spills, no hazard on an in-flight HGMMA's registers, the two rings in one
    SM's shared memory, and the partial handed over with 8-byte shared stores and loads (a layout conversion
    would go through shared memory twice)."""
    triton, compiled = _build_ws_tail(4, T, BB, BK, STAGES, DEPTH, group, PAIR)
    ptx = compiled.asm["ptx"]
    assert "setmaxnreg.dec" in ptx and "setmaxnreg.inc" in ptx
    assert "griddepcontrol.launch_dependents" in ptx  # the whole tiles' launch may start beside it
    assert ptx.count("wgmma.mma_async") >= 2 * 2 * T * (BK // 16)  # both halves, both unrolled steps
    per_thread = 16 * 4 * T * BB // 128  # fp32 partial values a thread holds
    assert ptx.count("st.shared.v2.b32") >= per_thread // 2 and ptx.count("ld.shared.v2.b32") >= per_thread // 2
    report, sass = _sass(triton, ptx, tmp_path)
    assert re.search(r"\b0 bytes spill stores", report) and "C7513" not in report, report
    assert hazards(sass) == []
    assert compiled.metadata.shared <= 227 * 1024


def test_split_tail_refuses_what_it_cannot_run():
    """``WS_TAIL``'s checks: one warpgroup a half, a ring that holds the fp32 partial, the last-wave split on."""
    _, _, _, gp = _gluon()
    gp._check_ws_tail(4, 3, 256, 64, 64, 2, 1)  # the table's tile: 96 KB ring, 64 KB partial
    with pytest.raises(ValueError, match="W 4"):
        gp._check_ws_tail(8, 4, 256, 64, 128, 1, 1)
    with pytest.raises(ValueError, match="take more STAGES"):
        gp._check_ws_tail(4, 3, 256, 32, 64, 2, 1)  # group 32: 48 KB ring
    with pytest.raises(ValueError, match="needs SLOTS"):
        gp._check_ws_tail(4, 3, 256, 64, 64, 0, 1)
    with pytest.raises(ValueError, match="needs SLOTS"):
        gp._check_ws_tail(4, 3, 256, 64, 64, 2, 3)
