"""Linux x86 boot protocol: the zero page, e820, initrd placement (the bzImage is
:mod:`ktstr.bzimage`'s).

Pure functions over bytes; the runtime copies the results into guest memory.
The VMM uses the 64-bit entry point (boot protocol >= 2.12 with XLF_KERNEL_64),
so none of the real-mode setup code runs: the loader fills ``struct boot_params``
itself, starting from the setup header the image carries
(``Documentation/arch/x86/boot.rst``).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from ktstr.bzimage import BzImage
from ktstr.errors import KtstrError
from ktstr.vmm import layout

LOADED_HIGH = 0x01
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80
LOADER_TYPE_UNDEFINED = 0xFF
HEAP_END_PTR = 0xDE00
"""0xE000 - 0x200, the value the boot protocol suggests; unused by the 64-bit entry."""

# boot_params (zero page) offsets, arch/x86/include/uapi/asm/bootparam.h.
ZERO_PAGE_SIZE = 0x1000
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_HDR = 0x1F1
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_HEAP_END_PTR = 0x224
BP_CMD_LINE_PTR = 0x228
BP_E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20
E820_MAX_ENTRIES = 128
"""E820_MAX_ENTRIES_ZEROPAGE: the zero page has room for 128 entries."""


# --- e820 ----------------------------------------------------------------------------------


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4


@dataclass(frozen=True, order=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def encode(self) -> bytes:
        return struct.pack("<QQI", self.addr, self.size, self.type)


def _subtract(ranges: list[tuple[int, int]], cut_start: int, cut_end: int) -> list[tuple[int, int]]:
    """Remove [cut_start, cut_end) from a list of [start, end) ranges."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if cut_end <= start or cut_start >= end:
            out.append((start, end))
            continue
        if start < cut_start:
            out.append((start, cut_start))
        if cut_end < end:
            out.append((cut_end, end))
    return out


def build_e820(
    ram_regions: Sequence[tuple[int, int]],
    reserved: Sequence[tuple[int, int]] = (),
) -> list[E820Entry]:
    """The guest's e820 map, sorted and non-overlapping.

    Conventional memory below 0x9FC00 is usable; 0x9FC00..1 MiB (MP table, ACPI
    tables, the legacy BIOS/VGA area) is reserved; RAM above 1 MiB is usable.
    Addresses outside ``ram_regions`` (the MMIO gap with the IOAPIC and LAPIC) are
    left out, i.e. holes. ``reserved`` windows (gpa, size), e.g. shared-memory
    areas the VMM keeps for itself, are cut out of usable RAM and listed as reserved.
    """
    usable: list[tuple[int, int]] = []
    reserved_ranges: list[tuple[int, int]] = []
    for gpa, size in sorted(ram_regions):
        if size <= 0:
            continue
        usable.append((gpa, gpa + size))
    low_area = (layout.EBDA_START, layout.HIGH_MEMORY_START)
    if any(start <= low_area[0] and end >= low_area[1] for start, end in usable):
        reserved_ranges.append(low_area)
    usable = _subtract(usable, *low_area)
    for gpa, size in reserved:
        if size <= 0:
            raise KtstrError(f"reserved e820 window at {gpa:#x} has no size ({size})")
        end = gpa + size
        if not any(start <= gpa and end <= stop for start, stop in usable):
            raise KtstrError(f"reserved window {gpa:#x}..{end:#x} is not inside usable guest RAM")
        usable = _subtract(usable, gpa, end)
        reserved_ranges.append((gpa, end))
    entries = [E820Entry(s, e - s, E820Type.RAM) for s, e in usable if e > s]
    entries += [E820Entry(s, e - s, E820Type.RESERVED) for s, e in reserved_ranges]
    entries.sort()
    if len(entries) > E820_MAX_ENTRIES:
        raise KtstrError(
            f"e820 map has {len(entries)} entries; the zero page holds {E820_MAX_ENTRIES}"
        )
    for before, after in itertools.pairwise(entries):
        if before.end > after.addr:
            raise KtstrError(
                f"reserved windows overlap: {before.addr:#x}..{before.end:#x} and "
                f"{after.addr:#x}..{after.end:#x}"
            )
    return entries


# --- initrd and command line --------------------------------------------------------------


def place_initrd(
    ram_regions: Sequence[tuple[int, int]],
    initrd_size: int,
    initrd_addr_max: int,
    kernel_end: int,
    *,
    reserved: Sequence[tuple[int, int]] = (),
) -> int:
    """Highest page-aligned gpa for the initrd in low RAM, above ``kernel_end``.

    The initrd must end at or below ``initrd_addr_max`` (inclusive limit from the
    setup header) and below the MMIO gap, and must not overlap ``reserved`` windows.
    """
    if initrd_size <= 0:
        raise KtstrError(f"initramfs size must be positive, got {initrd_size}")
    top = min(initrd_addr_max + 1, layout.low_ram_end(list(ram_regions)))
    page = layout.PAGE_SIZE
    # Walk free intervals from the top, skipping reserved windows.
    free = [(kernel_end, top)]
    for gpa, size in reserved:
        free = _subtract(free, gpa, gpa + size)
    for start, end in sorted(free, reverse=True):
        addr = (end - initrd_size) & ~(page - 1)
        aligned_start = (start + page - 1) & ~(page - 1)
        if addr >= aligned_start:
            return addr
    room = max(0, top - kernel_end)
    raise KtstrError(
        f"initramfs of {initrd_size / layout.MiB:.1f} MiB does not fit in guest low memory "
        f"({room / layout.MiB:.1f} MiB free above the kernel); give the VM more memory "
        "or shrink the initramfs"
    )


def encode_cmdline(text: str, limit: int) -> bytes:
    """The command line as NUL-terminated bytes; ``limit`` excludes the NUL.

    Pass ``BzImage.cmdline_size`` (the kernel's COMMAND_LINE_SIZE - 1) as ``limit``.
    """
    if "\0" in text:
        raise KtstrError("kernel command line contains a NUL character")
    data = text.encode()
    if len(data) > limit:
        raise KtstrError(
            f"kernel command line is {len(data)} bytes; this kernel accepts at most {limit}; "
            "drop some arguments"
        )
    if len(data) + 1 > layout.CMDLINE_MAX_SIZE:
        raise KtstrError(
            f"kernel command line is {len(data)} bytes; the VMM reserves "
            f"{layout.CMDLINE_MAX_SIZE - 1}"
        )
    return data + b"\0"


# --- boot_params ----------------------------------------------------------------------------


def build_boot_params(
    bz: BzImage,
    *,
    cmdline_addr: int,
    cmdline_size: int,
    initrd_addr: int = 0,
    initrd_size: int = 0,
    e820: Sequence[E820Entry],
    rsdp_addr: int = 0,
) -> bytes:
    """The 4096-byte zero page for the 64-bit entry.

    ``cmdline_size`` is the length of the encoded command line, NUL included (checked
    against the kernel's limit). Addresses above 4 GiB go into the ext_* fields.
    """
    if cmdline_size > bz.cmdline_size + 1:
        raise KtstrError(
            f"kernel command line is {cmdline_size - 1} bytes; this kernel accepts at "
            f"most {bz.cmdline_size}"
        )
    if len(e820) > E820_MAX_ENTRIES:
        raise KtstrError(f"e820 map has {len(e820)} entries; at most {E820_MAX_ENTRIES} fit")
    bp = bytearray(ZERO_PAGE_SIZE)
    bp[BP_HDR : BP_HDR + len(bz.setup_header)] = bz.setup_header
    bp[BP_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    bp[BP_LOADFLAGS] = (bz.loadflags | LOADED_HIGH | CAN_USE_HEAP) & 0xFF
    struct.pack_into("<H", bp, BP_HEAP_END_PTR, HEAP_END_PTR)
    struct.pack_into("<I", bp, BP_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", bp, BP_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", bp, BP_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp_addr)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        off = BP_E820_TABLE + i * E820_ENTRY_SIZE
        bp[off : off + E820_ENTRY_SIZE] = entry.encode()
    return bytes(bp)
