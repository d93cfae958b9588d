"""Verifier logs made readable: a loop the verifier walked a thousand times is one block.

The kernel's verifier log repeats the same instruction lines for every iteration of a
bounded loop; :func:`collapse` keeps the first occurrence of a repeated block of lines and
says how many times it came round.
"""

from __future__ import annotations

import re

MAX_BLOCK = 40
VERIFIER_MARKS = re.compile(
    r"BPF program load failed|processed \d+ insns|^\d+: \(|R\d+ (invalid|!read_ok)|"
    r"invalid (mem|access|indirect)|back-edge|unreachable insn|-EACCES|Permission denied|"
    r"failed to load|-EINVAL.*(prog|BPF)", re.MULTILINE)


def looks_like_verifier_log(text: str) -> bool:
    return bool(VERIFIER_MARKS.search(text))


def _norm(line: str) -> str:
    # The same instruction on another pass differs only in register values and frame
    # offsets: compare the shape.
    return re.sub(r"-?\b(0x[0-9a-f]+|\d+)\b", "N", line)


def collapse(text: str, *, max_block: int = MAX_BLOCK) -> str:
    """``text`` with each block of lines that repeats back to back shown once."""
    lines = text.splitlines()
    shapes = [_norm(line) for line in lines]
    out: list[str] = []
    i = 0
    while i < len(lines):
        best_size, best_reps = 0, 1
        for size in range(1, min(max_block, (len(lines) - i) // 2) + 1):
            reps = 1
            while (i + (reps + 1) * size <= len(lines)
                   and shapes[i + reps * size:i + (reps + 1) * size] == shapes[i:i + size]):
                reps += 1
            if reps > 1 and reps * size > best_reps * best_size:
                best_size, best_reps = size, reps
        if best_reps > 1:
            out.extend(lines[i:i + best_size])
            out.append(f"... (the {best_size} line(s) above repeat {best_reps - 1} more "
                       "time(s))")
            i += best_size * best_reps
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)
