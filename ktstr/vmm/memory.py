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

from ktstr.vmm import layout
from ktstr.vmm.kvm import VmFd

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
"""Linux's value; the mmap module only exports the name from Python 3.13 on."""


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
    costs 100 MiB.
    """

    def __init__(self, regions: list[tuple[int, int]]) -> None:
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
        self.regions: tuple[MemRegion, ...] = tuple(pieces)
        self.size = offset
        self._map: mmap.mmap | None = mmap.mmap(
            -1,
            self.size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        anchor = ctypes.c_char.from_buffer(self._map)
        self.host_addr = ctypes.addressof(anchor)
        del anchor  # release the buffer export so close() can unmap
        self._view = memoryview(self._map)

    @classmethod
    def for_size(cls, memory_bytes: int) -> GuestMemory:
        """RAM of ``memory_bytes`` laid out around the 32-bit MMIO gap (``layout.ram_regions``)."""
        return cls(layout.ram_regions(memory_bytes))

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
