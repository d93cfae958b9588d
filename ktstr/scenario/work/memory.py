"""Memory-bound work: cache pressure, working sets touched between yields, page sweeps."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ktstr.scenario.work.base import PAGE, Work, check_range

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime


@dataclass(frozen=True)
class CachePressure(Work):
    """Random 64-byte writes over a ``size_kb`` buffer (evicts the caches it shares)."""

    name: ClassVar[str] = "cache_pressure"
    size_kb: int = 4096
    touches: int = 256

    def run(self, rt: WorkerRuntime) -> None:
        size = self.size_kb * 1024
        buf = bytearray(size)
        view = memoryview(buf)
        chunk = b"\xa5" * 64
        rand = rt.rng.randrange
        limit = size - 64
        while True:
            for _ in range(self.touches):
                o = rand(limit)
                view[o : o + 64] = chunk
            if not rt.tick():
                return


def touch(buf: mmap.mmap | bytearray, stride: int) -> None:
    """Read-modify-write one byte every ``stride`` bytes of ``buf``."""
    for off in range(0, len(buf), stride):
        buf[off] = (buf[off] + 1) & 0xFF


@dataclass(frozen=True)
class CacheYield(Work):
    """Touch a ``size_kb`` working set (a byte per ``stride``), then sched_yield: one unit.

    The task gives up the CPU with a warm cache footprint every unit; where it runs
    next decides whether that footprint is still there.
    """

    name: ClassVar[str] = "cache_yield"
    size_kb: int = 256
    stride: int = 64

    def __post_init__(self) -> None:
        check_range(self, "size_kb", 1)
        check_range(self, "stride", 1, self.size_kb * 1024)

    def run(self, rt: WorkerRuntime) -> None:
        buf = bytearray(self.size_kb * 1024)
        while True:
            touch(buf, self.stride)
            os.sched_yield()
            if not rt.tick():
                return


@dataclass(frozen=True)
class NumaWorkingSetSweep(Work):
    """Sweep a ``size_mb`` anonymous mapping a page at a time, ``pages`` pages per unit.

    Pages are placed by first touch on the node the worker runs on then; once the
    scheduler moves it to another node every touch is remote (on one node this is a
    TLB- and cache-missing sweep).
    """

    name: ClassVar[str] = "numa_working_set_sweep"
    size_mb: int = 64
    pages: int = 256

    def __post_init__(self) -> None:
        check_range(self, "size_mb", 1, 1 << 16)
        check_range(self, "pages", 1)

    def run(self, rt: WorkerRuntime) -> None:
        size = self.size_mb << 20
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        off = 0
        try:
            while True:
                for _ in range(self.pages):
                    mm[off] = (mm[off] + 1) & 0xFF
                    off += PAGE
                    if off >= size:
                        off = 0
                if not rt.tick():
                    return
        finally:
            mm.close()
