"""A drgn ``Program`` over a running guest's RAM: no agent in the guest, no copy of RAM.

drgn calls our read function for every physical read; it goes through the VMM's
bounds-checked :meth:`GuestMemory.read`, so a page-table walk that lands outside guest
RAM is a drgn ``FaultError``, never a host access. The observer only reads.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ktstr.observe.kimage import KernelImage, ObserveError, locate, read_symbols, vmlinux_build_id
from ktstr.observe.vmcore import RamSource

if TYPE_CHECKING:
    import drgn

UNAVAILABLE_HINT = "pip install drgn"


class GuestRam(RamSource, Protocol):
    """What the observer needs of the VMM's ``GuestMemory``: a vmcore's source, and reads."""

    def read(self, gpa: int, length: int) -> bytes: ...
    def contains(self, gpa: int, length: int = 1) -> bool: ...
    def close(self) -> None: ...


@functools.cache
def drgn_problem() -> str | None:
    """Why drgn cannot be used here, or None (asked once per process)."""
    try:
        import drgn  # noqa: F401
    except ImportError as err:
        return f"drgn is not importable ({err}); {UNAVAILABLE_HINT} to see inside the guest"
    return None


@dataclass(frozen=True)
class KernelFiles:
    """The cached kernel's debug files (a kernel-cache entry's ``vmlinux``, ``System.map``)."""

    vmlinux: Path
    system_map: Path

    @classmethod
    def of_entry(cls, entry_dir: Path) -> KernelFiles:
        return cls(entry_dir / "vmlinux", entry_dir / "System.map")

    def hz(self) -> int:
        """``CONFIG_HZ`` from the ``.config`` beside the vmlinux (jiffies to time)."""
        try:
            for line in (self.vmlinux.parent / ".config").read_text().splitlines():
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=", 1)[1])
        except (OSError, ValueError):
            pass
        return 1000

    def check(self) -> None:
        for path in (self.vmlinux, self.system_map):
            if not path.is_file():
                raise ObserveError(f"{path} is missing: the observer needs the kernel's "
                                   "vmlinux and System.map (a kernel-cache entry has both)")


@dataclass
class GuestProgram:
    """An open drgn program and what it took to open it."""

    prog: drgn.Program
    image: KernelImage
    open_s: float


def _reader(mem: GuestRam, base: int) -> Callable[[int, int, int, bool], bytes]:
    def read(address: int, count: int, offset: int, physical: bool) -> bytes:
        return mem.read(base + offset, count)
    return read


def open_program(mem: GuestRam, files: KernelFiles) -> GuestProgram:
    """drgn over ``mem`` with ``files``' debug info; :class:`ObserveError` if it cannot be.

    Call it once the kernel is decompressed (``locate`` fails before that)."""
    problem = drgn_problem()
    if problem:
        raise ObserveError(problem)
    import drgn

    start = time.monotonic()
    files.check()
    image = locate(mem, read_symbols(files.system_map), vmlinux_build_id(files.vmlinux))
    platform = drgn.Platform(drgn.Architecture.X86_64,
                             drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)
    prog = drgn.Program(platform)

    def fault(address: int, count: int, offset: int, physical: bool) -> bytes:
        # A read drgn makes in the gaps between RAM regions (the 32-bit MMIO hole).
        raise drgn.FaultError("not guest RAM", address)

    end = max(r.gpa + r.size for r in mem.regions)
    prog.add_memory_segment(0, end, fault, physical=True)
    for region in mem.regions:
        prog.add_memory_segment(region.gpa, region.size, _reader(mem, region.gpa),
                                physical=True)
    try:
        prog.set_linux_kernel_custom(image.vmcoreinfo(), True)
        prog.load_debug_info([str(files.vmlinux)])
    except Exception as err:  # drgn.MissingDebugInfoError, ValueError
        raise ObserveError(f"drgn cannot load {files.vmlinux}: {err}") from None
    try:
        prog["runqueues"]
    except LookupError:
        raise ObserveError(f"{files.vmlinux} has no debug info (no 'runqueues'): build "
                           "with CONFIG_DEBUG_INFO") from None
    return GuestProgram(prog, image, time.monotonic() - start)
