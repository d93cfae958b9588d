"""Guest RAM: one anonymous host mapping, exposed to KVM as memslots.

Every guest-physical address a device or loader touches goes through
:meth:`GuestMemory.read`, :meth:`~GuestMemory.write` or :meth:`~GuestMemory.view`.
Guest-controlled addresses (virtqueue descriptors, DMA buffers) are hostile, so
each access must fall entirely inside one RAM region; anything else raises
:class:`GuestMemoryError` instead of touching host memory.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from pathlib import Path

from ktstr.meminfo import free_hugetlb_bytes
from ktstr.vmm import layout
from ktstr.vmm.kvm import VmFd

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
"""Linux's value; the mmap module only exports the name from Python 3.13 on."""
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
HUGE_PAGE = 2 * 1024 * 1024
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_unavailable(enabled: Path = THP_ENABLED) -> str | None:
    """Why MADV_HUGEPAGE would not give transparent huge pages here, or None if it would."""
    try:
        text = enabled.read_text()
    except OSError:
        return "the host kernel has no transparent hugepages (no CONFIG_TRANSPARENT_HUGEPAGE)"
    if "[never]" in text:
        return f"transparent hugepages are off ({enabled}: never)"
    return None


def anon_huge_kb(addr: int, smaps: Path = Path("/proc/self/smaps")) -> int | None:
    """AnonHugePages of this process's mapping that starts at or contains ``addr``."""
    try:
        lines = smaps.read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            try:
                inside = int(lo, 16) <= addr < int(hi, 16)
            except ValueError:
                inside = False
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return None


class GuestMemoryError(Exception):
    """A guest-physical access outside guest RAM (a guest or device bug, never the host's)."""


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    offset: int
    """Offset of this region inside the host mapping."""

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """RAM pieces ``[(gpa, size), ...]`` backed by one ``MAP_NORESERVE`` anonymous mapping.

    Untouched pages cost nothing on the host, so a 2 GiB guest that uses 100 MiB
    costs 100 MiB. With ``hugepages`` the mapping is on reserved hugetlbfs pages where
    enough are free, else 2 MB-aligned and ``MADV_HUGEPAGE``; :attr:`backing` says which
    (``hugetlbfs``, ``thp`` or ``4k``) and :attr:`backing_note` why not better.
    """

    def __init__(self, regions: list[tuple[int, int]], *, hugepages: bool = False) -> None:
        pieces: list[MemRegion] = []
        offset = 0
        for gpa, size in sorted(regions):
            if size <= 0 or gpa < 0 or size % layout.PAGE_SIZE or gpa % layout.PAGE_SIZE:
                raise ValueError(f"bad RAM region gpa=0x{gpa:x} size=0x{size:x}")
            if pieces and gpa < pieces[-1].end:
                raise ValueError(f"RAM region at 0x{gpa:x} overlaps the previous one")
            pieces.append(MemRegion(gpa, size, offset))
            offset += size
        if not pieces:
            raise ValueError("guest memory needs at least one region")
        self.size = offset
        self.backing = "4k"
        self.backing_note = ""
        self._map: mmap.mmap | None = self._mmap(hugepages)
        anchor = ctypes.c_char.from_buffer(self._map)
        addr = ctypes.addressof(anchor)
        del anchor  # release the buffer export so close() can unmap
        # Guest RAM starts on a 2 MB boundary of the mapping, so guest and host huge
        # pages line up (the mapping has a huge page to spare for it when hugepages).
        base = (-addr) % HUGE_PAGE if self.backing == "thp" else 0
        self.host_addr = addr + base
        self.regions: tuple[MemRegion, ...] = tuple(
            MemRegion(p.gpa, p.size, p.offset + base) for p in pieces)
        self._view = memoryview(self._map)

    def _mmap(self, hugepages: bool) -> mmap.mmap:
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if hugepages:
            rounded = -(-self.size // HUGE_PAGE) * HUGE_PAGE
            free = free_hugetlb_bytes(HUGE_PAGE)
            if free >= rounded:
                try:
                    mapping = mmap.mmap(-1, rounded, flags=private | MAP_HUGETLB, prot=prot)
                except OSError as err:
                    self.backing_note = f"hugetlbfs mapping failed ({err.strerror})"
                else:
                    self.backing = "hugetlbfs"
                    return mapping
            else:
                self.backing_note = (f"hugetlbfs has {free // HUGE_PAGE} free 2 MB pages, the "
                                     f"guest needs {rounded // HUGE_PAGE}")
            why_not = thp_unavailable()
            if why_not is None:
                mapping = mmap.mmap(-1, self.size + HUGE_PAGE,
                                    flags=private | MAP_NORESERVE, prot=prot)
                try:
                    mapping.madvise(mmap.MADV_HUGEPAGE)
                except OSError as err:
                    self.backing_note += f"; MADV_HUGEPAGE failed ({err.strerror})"
                else:
                    self.backing = "thp"
                return mapping
            self.backing_note += f"; {why_not}"
        return mmap.mmap(-1, self.size, flags=private | MAP_NORESERVE, prot=prot)

    def huge_kb(self) -> int | None:
        """Guest RAM on huge pages now, in kB (None: closed, or not known on this host)."""
        if self._map is None:
            return None
        if self.backing == "hugetlbfs":
            return len(self._map) // 1024
        return anon_huge_kb(self.host_addr)

    @classmethod
    def for_size(cls, memory_bytes: int, *, hugepages: bool = False) -> GuestMemory:
        """RAM of ``memory_bytes`` laid out around the 32-bit MMIO gap (``layout.ram_regions``)."""
        return cls(layout.ram_regions(memory_bytes), hugepages=hugepages)

    def register(self, vm: VmFd, first_slot: int = 0) -> None:
        """Install the regions as KVM memslots ``first_slot, first_slot + 1, ...``."""
        for i, region in enumerate(self.regions):
            vm.set_user_memory_region(
                first_slot + i, region.gpa, region.size, self.host_addr + region.offset
            )

    def _offset(self, gpa: int, length: int) -> int:
        if self._map is None:
            raise GuestMemoryError("guest memory is closed")
        if not isinstance(gpa, int) or not isinstance(length, int) or gpa < 0 or length < 0:
            raise GuestMemoryError(f"bad guest access gpa={gpa!r} length={length!r}")
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region.offset + (gpa - region.gpa)
        raise GuestMemoryError(
            f"guest access 0x{gpa:x}+0x{length:x} is outside guest RAM "
            f"({', '.join(f'0x{r.gpa:x}-0x{r.end:x}' for r in self.regions)})"
        )

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._offset(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        return bytes(self._view[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        off = self._offset(gpa, length)
        self._view[off : off + length] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy window; do not keep it past :meth:`close`."""
        off = self._offset(gpa, length)
        return self._view[off : off + length]

    def close(self) -> None:
        """Unmap. Views still held elsewhere keep the pages alive until they are dropped."""
        if self._map is None:
            return
        mapping, self._map = self._map, None
        try:
            self._view.release()
            mapping.close()
        except BufferError:
            pass  # a device still holds a view; the mapping goes when it does

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
