"""The host's memory as /proc/meminfo reports it: one reader for every caller.

Sizing decisions (the sandbox's memory, the gauntlet's host capacity, how many VM
tests run at once) all start from MemTotal; a host whose /proc/meminfo cannot be
read is a clear error, not a guessed size.
"""

from __future__ import annotations

from pathlib import Path

from ktstr.errors import KtstrError

MEMINFO = Path("/proc/meminfo")


def meminfo_value(field: str, path: Path = MEMINFO) -> int | None:
    """The number on the ``field`` line of /proc/meminfo as written (kB for sizes, a count
    for ``HugePages_Free``), or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            try:
                return int(rest.split()[0])
            except (IndexError, ValueError):
                return None
    return None


def meminfo_mb(field: str, path: Path = MEMINFO) -> int | None:
    """The ``field`` line of /proc/meminfo (``MemTotal``, ``MemAvailable``) in MB, or None."""
    kb = meminfo_value(field, path)
    return kb // 1024 if kb is not None else None


def free_hugetlb_bytes(page_size: int, path: Path = MEMINFO) -> int:
    """Reserved hugetlbfs pages of ``page_size`` bytes not yet in use, in bytes (0 where
    there are none, or the default huge page is another size)."""
    if meminfo_value("Hugepagesize", path) != page_size // 1024:
        return 0
    return (meminfo_value("HugePages_Free", path) or 0) * page_size


def host_memory_mb(path: Path = MEMINFO) -> int:
    """MemTotal in MB; a KtstrError when it cannot be read."""
    total = meminfo_mb("MemTotal", path)
    if total is None:
        raise KtstrError(f"cannot read MemTotal from {path}")
    return total
