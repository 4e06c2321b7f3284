"""Read sm_90 SASS for a hazard ptxas does not always guard: a register operand of an in-flight ``HGMMA``.

A ``wgmma`` with its A operand in registers reads those registers while it runs; writing them before a
``WARPGROUP.DEPBAR`` retires its group gives wrong sums (seen on an H100 with a loop-carried operand: ptxas neither
serialized nor complained). This walks every path from each register-A ``HGMMA`` (loops included) and reports
writes to its four registers before its group is retired.
"""

from __future__ import annotations

import re

_NOT_A_WRITE = ("ST", "RED", "ATOM", "BRA", "SYNCS", "WARP", "HGMMA", "BAR", "EXIT", "NOP", "DEPBAR", "FENCE",
                "MEMBAR", "CCTL", "RET", "CALL", "BSYNC", "BSSY", "UTMA", "UBLKCP")


def parse(sass: str) -> list[tuple[int, str]]:
    """``(address, instruction)`` pairs of a ``cuobjdump -sass`` listing."""
    out = []
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def _written(text: str) -> set[int]:
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    op = t.split()[0]
    m = re.match(r"\S+\s+R(\d+)\b", t)
    if op.startswith(_NOT_A_WRITE) or not m:
        return set()
    width = 4 if ".128" in op else 2 if (".64" in op or "WIDE" in op) else 1
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def hazards(sass: str) -> list[str]:
    """Writes to a register-A ``HGMMA``'s operand registers before a ``DEPBAR.LE gsb0, n`` retires its group
    (retired once more than ``n`` groups were committed after and including its own)."""
    ins = parse(sass)
    at = {a: i for i, (a, _) in enumerate(ins)}

    def successors(j: int) -> list[int]:
        t = ins[j][1]
        b = re.search(r"BRA (?:`\(\.L\w+\) )?0x([0-9a-f]+)", t)
        if b:
            nxt = [at[int(b.group(1), 16)]] if int(b.group(1), 16) in at else []
            return nxt + ([j + 1] if t.startswith("@") else [])
        return [] if t.startswith("EXIT") else [j + 1]

    found = []
    for i, (addr, text) in enumerate(ins):
        m = re.match(r"HGMMA\S*\s+R\d+,\s+R(\d+),", text)
        if not m:
            continue  # A from shared memory
        regs = set(range(int(m.group(1)), int(m.group(1)) + 4))
        stack, seen = [(i, 0)], set()
        while stack:
            j, k = stack.pop()
            if (j, k) in seen or j >= len(ins):
                continue
            seen.add((j, k))
            t = ins[j][1]
            if j != i:
                d = re.search(r"DEPBAR\.LE gsb0, 0x(\d+)", t)
                if d and k > int(d.group(1)):
                    continue
                if _written(t) & regs:
                    found.append(f"HGMMA at {addr:#x} reads R{min(regs)}-R{max(regs)}; {ins[j][0]:#x} writes: {t}")
            if t.startswith("HGMMA") and "gsb0" in t:
                k = min(k + 1, 3)
            stack += [(s, k) for s in successors(j)]
    return found
