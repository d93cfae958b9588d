"""The kernel's cpu-list format (``"0-3,8,10-11"``), parsed and written in one place.

Used on the host (scenario specs, cgroup files, ``ktstr boot``'s report) and in the
guest (``/sys/devices/system/cpu/online``), so standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable

from ktstr.errors import KtstrError


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8, 10-11"`` -> [0, 1, 2, 3, 8, 10, 11]: sorted, each CPU once.

    A malformed list (``"3-1"``, ``"a"``) is a KtstrError naming it, never a silently
    shorter list: the text may come from a guest.
    """
    cpus: set[int] = set()
    for part in text.replace(" ", "").strip().split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                cpus.update(range(lo, hi + 1))
            else:
                cpus.add(int(part))
        except ValueError:
            raise KtstrError(
                f"cpu list {text!r}: expected comma-separated CPUs or ranges like 0-3,8"
            ) from None
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpu_list` (compact ranges)."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
