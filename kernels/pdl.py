"""Programmatic dependent launch (sm_90): the flags and the two statements kernels begin with.

A kernel that calls ``pdl_release`` first lets the next launch start early, if that launch asked for it
(``launch_pdl``) and waits (``gdc_wait``) before it reads what this kernel writes; for any other next launch it does
nothing. ``pdl_enter`` releases and then waits: a kernel that begins with it can be launched with ``PDL_LAUNCH`` after
any kernel (the wait returns once the kernel before has finished and its writes are visible). The engine's small
kernels (norms, RoPE + cache store, attention, the activation) do both, so that each is resident when the kernel
before it ends and the W4A16 kernel after them loads its weights while they run.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Programmatic dependent launch (sm_90). Every W4A16 kernel begins by releasing the next launch
# (``gdc_launch_dependents``: it starts once all our programs have started), so a split-K sum launched with
# ``launch_pdl`` is resident when the GEMV's last wave ends, and waits in ``gdc_wait`` for its partials. The
# tensor-core kernels (``swap``, ``splitk``/``gemm``) are launched with ``launch_pdl`` too and wait at their start
# for the kernel before them; the decode GEMVs are not: measured on the H100, a decode GEMV launched early lost
# 0.2-3.5 us at M = 1 (its waiting programs hold the SMs), the tensor-core ones gained 0.5-2 us at M = 16-64
# (``benchmarks/pdl_probe.py``; the small-M Gluon kernel, whose programs fit in one wave, gained from being launched
# early: :mod:`kernels.awq_gluon_mma`). ``RAYAWQ_PDL=0`` turns it off; off under the interpreter and on Triton builds
# without the intrinsics.
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton
    _HAS_GDC = False

PDL = _HAS_GDC and not _INTERPRET and os.environ.get("RAYAWQ_PDL", "1") != "0"
_PDL = tl.constexpr(PDL)
PDL_LAUNCH = {"launch_pdl": True} if PDL else {}  # launch options of a kernel that begins with pdl_enter
_PDL_LAUNCH = PDL_LAUNCH


@triton.jit
def pdl_release():
    """First statement of a kernel launched without ``_PDL_LAUNCH``: let the next launch start."""
    if _PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_enter():
    """First statement of a kernel launched with ``_PDL_LAUNCH``: release the next launch, wait for the last."""
    if _PDL:
        gdc_launch_dependents()
        gdc_wait()
