"""Writes one benchmark's section of docs/benchmarks.md between its markers, leaving the others alone."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Callable

DOCS = Path(__file__).resolve().parent.parent / "docs"


def git_commit() -> str:
    """Short commit of the tree being measured (``RAYAWQ_COMMIT`` wins: the GPU copy has no .git history)."""
    if os.environ.get("RAYAWQ_COMMIT"):
        return os.environ["RAYAWQ_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=DOCS.parent).strip()
    except Exception:
        return "unknown"


def card_suffix(device: str) -> str:
    """Suffix of a card's docs sections, plots and raw files: none for the H100 (the issue's card, whose
    sections keep their names), ``_h200`` for an H200 (the card names of ``kernels.repacked_dispatch``)."""
    from kernels.repacked_dispatch import card_of

    card = card_of(device)
    return "" if card == "h100" else f"_{card}"


def stamp(device: str, commit: str | None = None, date: str | None = None) -> str:
    """The line every section starts with: device, date, commit (defaults: today, the tree being measured)."""
    return (f"Device: {device} · date: {date or datetime.date.today().isoformat()} · "
            f"commit: `{commit or git_commit()}`")


def write_section(name: str, markdown: str, path: Path = DOCS / "benchmarks.md") -> None:
    """Replace (or append) the block between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def measure_or_report(args, name: str, results_file: str, card: Callable[[dict], str], measure: Callable,
                      report: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> int:
    """The end of a benchmark's ``main``: with ``--report FILE`` (and ``--note``), its docs section ``name`` + card
    suffix and plot from a results JSON; else ``measure(args)`` and the JSON written to ``--out``."""
    if args.report:
        res = json.loads(Path(args.report).read_text())
        if args.note:
            res["note"] = args.note
        tag = card_suffix(card(res))
        plot(res, DOCS / f"{name}{tag}.png")
        write_section(f"{name}{tag}", report(res))
        return 0
    res = measure(args)
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    (out / results_file).write_text(json.dumps(res, indent=1))
    print(f"wrote {out / results_file}")
    return 0
