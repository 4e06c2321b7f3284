"""When each program of the pipelined W4A16 kernel starts and ends, and on which SM (one H200 / H100).

Usage:
    python3 benchmarks/tile_trace.py --out $OUT                 # GPU: tile_trace.json
    python3 benchmarks/tile_trace.py --plot a.json [b.json] --png docs/tile_trace_h200.png

Why: at 1024-4096 rows the kernel's time is whole waves of tiles, and what a last wave costs (split in halves,
summed in the last half's registers, ...) cannot be read off a total. A traced copy of
``kernels/awq_gluon_pipelined.py`` is built in a temporary directory: every program stores ``%globaltimer`` as it
starts and after its last store, and ``%smid``. The copy is made by inserting text at named places of the source
(:func:`traced_source`); if the kernel changes there, it fails loudly instead of tracing something else. The
stamps add two timer reads and three stores per program; the JSON keeps the traced and plain timings of each case
side by side (CUDA graph of four calls on fresh inputs, cold L2; the trace is the graph's last call).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_STAMP = '''

@gluon.jit
def _stamp(trace_ptr, slot: gl.constexpr, W: gl.constexpr):
    """Store this program's %globaltimer in slot 0 (start, with %smid in slot 2) or 1 (end), from one thread."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
    z = gl.zeros([32 * W], gl.int32, layout=lay)
    t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [z], dtype=gl.int64, is_pure=False, pack=1)
    offs = gl.arange(0, 32 * W, layout=lay)
    pid = gl.program_id(0) + gl.num_programs(0) * (gl.program_id(1) + gl.num_programs(1) * gl.program_id(2))
    base = trace_ptr + pid * 3 + offs * 0
    gl.store(base + slot, t, mask=offs == 0)
    if slot == 0:
        sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [z], dtype=gl.int32, is_pure=False, pack=1)
        gl.store(base + 2, sm.to(gl.int64), mask=offs == 0)
'''

# (anchor, replacement): each anchor must occur in the source; only its first occurrence is replaced
_EDITS = (
    ("from .", "from kernels."),
    ("_tma_load = ", "_TRACE = None\n" + _STAMP + "\n\n_tma_load = "),
    ("def _awq_gluon_pipelined_kernel(x_desc, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M,",
     "def _awq_gluon_pipelined_kernel(x_desc, pw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, trace_ptr, M,"),
    ("    KH: gl.constexpr = BK // 16\n", "    _stamp(trace_ptr, 0, W)\n    KH: gl.constexpr = BK // 16\n"),
    ("\n\n@gluon.jit\ndef _last_wave_program", "\n    _stamp(trace_ptr, 1, W)\n\n\n@gluon.jit\ndef _last_wave_program"),
    ("bias if bias is not None else y, y, ws, cnt, M,", "bias if bias is not None else y, y, ws, cnt, _TRACE, M,"),
)


def traced_source(src: str) -> str:
    """``kernels/awq_gluon_pipelined.py`` with the stamps in (see the module doc); ``ValueError`` if an anchor is
    gone."""
    for anchor, new in _EDITS:
        if anchor not in src:
            raise ValueError(f"tile_trace: {anchor!r} is no longer in kernels/awq_gluon_pipelined.py; update _EDITS")
        src = src.replace(anchor, new) if anchor == "from ." else src.replace(anchor, new, 1)
    return src


def traced_module(where: Path | None = None):
    """The traced copy, written to ``where`` (default: a new temporary directory) and imported from there (Gluon
    reads a kernel's source from its file)."""
    where = where or Path(tempfile.mkdtemp(prefix="tile_trace_"))
    (where / "_traced_pipelined.py").write_text(traced_source((ROOT / "kernels/awq_gluon_pipelined.py").read_text()))
    sys.path.insert(0, str(where))
    return importlib.import_module("_traced_pipelined")


CASES = (((4096, 14336, 1024), dict(BB=256, W=8, T=1, STAGES=4, DEPTH=1)),
         ((4096, 14336, 1024), dict(BB=256, W=8, T=1, STAGES=4, DEPTH=1, SLOTS=1)),
         ((4096, 14336, 1024), dict(BB=256, W=4, T=1, STAGES=3, DEPTH=1, SLOTS=2)),
         ((4096, 14336, 1024), dict(BB=256, W=4, T=1, STAGES=3, DEPTH=1, SLOTS=2, LEAD=1)),
         ((8192, 8192, 1024), dict(BB=256, W=8, T=1, STAGES=4, DEPTH=1)),
         ((4096, 14336, 4096), dict(BB=256, W=8, T=1, STAGES=4, DEPTH=1)))


def run(out: Path, group: int = 128) -> list[dict]:
    import torch

    from kernels import dispatch
    from kernels.awq_gluon_pipelined import gluon_pipelined
    from kernels.awq_repack import repack_awq
    from kernels.timing import time_calls

    tp = traced_module()
    rows = []
    for (K, N, M), cfg in CASES:
        sets = [dispatch.random_awq(K, N, group, torch.bfloat16, "cuda") for _ in range(4)]
        packed = [repack_awq(s[0]) for s in sets]
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        tp._TRACE = torch.zeros(3 * 65536, dtype=torch.int64, device="cuda")
        traced = time_calls([lambda x=x, p=p, s=s: tp.gluon_pipelined(x, p, s[1], s[2], group, **cfg)
                             for x, p, s in zip(xs, packed, sets)])
        plain = time_calls([lambda x=x, p=p, s=s: gluon_pipelined(x, p, s[1], s[2], group, **cfg)
                            for x, p, s in zip(xs, packed, sets)])
        cublas = time_calls([lambda x=x: x @ wb.t() for x in xs])
        tr = tp._TRACE.view(-1, 3).cpu()
        tr = tr[: int((tr[:, 1] > 0).sum())]
        t0 = int(tr[:, 0].min())
        row = {"K": K, "N": N, "M": M, "cfg": cfg, "us_traced": traced, "us_plain": plain, "cublas": cublas,
               "start": ((tr[:, 0] - t0) / 1000.0).tolist(), "end": ((tr[:, 1] - t0) / 1000.0).tolist(),
               "sm": tr[:, 2].tolist()}
        rows.append(row)
        d = sorted(e - s for s, e in zip(row["start"], row["end"]))
        print(f"{K}x{N} M={M} {cfg}: traced {traced:.1f} us, plain {plain:.1f}, cuBLAS {cublas:.1f}; {len(d)} "
              f"programs over {max(row['end']):.1f} us, each {d[0]:.1f}-{d[-1]:.1f} (median {d[len(d) // 2]:.1f})",
              flush=True)
        (out / "tile_trace.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))
    return rows


def plot(paths: list[str], png: str, K: int = 4096, N: int = 14336, M: int = 1024) -> None:
    """One panel per traced config of ``K x N`` at ``M`` rows (the first file's rows, then any others'): each
    program a bar on its SM's line, whole tiles and split-K parts in two colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, seen = [], set()
    for p in paths:
        for r in json.loads(Path(p).read_text())["rows"]:
            key = json.dumps(r["cfg"], sort_keys=True)
            if (r["K"], r["N"], r["M"]) == (K, N, M) and key not in seen:
                seen.add(key)
                rows.append(r)
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.6 * len(rows)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        dur = [e - s for s, e in zip(r["start"], r["end"])]
        whole = max(dur)
        for s, d, sm in zip(r["start"], dur, r["sm"]):
            ax.barh(sm, d, left=s, height=0.9, color="tab:blue" if d > 0.75 * whole else "tab:orange", lw=0)
        ax.set_ylabel("SM")
        ax.set_title(f"{r['cfg']}: {max(r['end']):.0f} us traced ({r['us_plain']:.0f} plain, cuBLAS "
                     f"{r['cublas']:.0f})", fontsize=8)
    axes[-1, 0].set_xlabel(f"us since the first program started ({K}x{N}, {M} rows; blue: whole tiles, orange: "
                           "split-K parts)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/tile_trace")
    ap.add_argument("--plot", nargs="+", help="tile_trace JSON files to draw instead of running")
    ap.add_argument("--png", default="docs/tile_trace.png")
    a = ap.parse_args()
    if a.plot:
        plot(a.plot, a.png)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
