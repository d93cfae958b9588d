"""The guest-physical memory map and I/O port assignments, in one place.

Every address the VMM writes boot data to, every MMIO window and every port a
device listens on is defined here, so the loader, the table encoders and the
runtime cannot disagree. Low memory follows the usual Linux direct-boot layout::

    0x0000_0500  GDT                 0x0000_7000  boot_params (zero page)
    0x0000_0530  IDT (empty)         0x0000_8ff0  boot stack top (grows down)
    0x0000_9000  page tables         0x0002_0000  kernel command line
    0x0009_fc00  MP table            0x000e_0000  ACPI tables (RSDP first)
    0x0010_0000  kernel (protected-mode payload of the bzImage)

Guest RAM starts at 0 and runs up to the 32-bit MMIO gap; whatever does not fit
below the gap continues at 4 GiB. The gap holds the virtio-mmio window, the
IOAPIC and the local APIC.
"""

from __future__ import annotations

from ktstr.bzimage import KERNEL_LOAD_ADDR as KERNEL_LOAD_ADDR
from ktstr.errors import KtstrError
from ktstr.wire.ports import BOOT_MAGIC as BOOT_MAGIC
from ktstr.wire.ports import BOOT_PORT as BOOT_PORT
from ktstr.wire.ports import EXIT_PORT as EXIT_PORT

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PAGE_SIZE = 0x1000

# --- low memory: boot data -------------------------------------------------------------

GDT_ADDR = 0x500
GDT_MAX_SIZE = 0x30
"""Up to six 8-byte descriptors (null, unused, code 0x10, data 0x18, TSS 0x20)."""
IDT_ADDR = 0x530
IDT_SIZE = 8
"""One zeroed 8-byte slot; the kernel loads its own IDT before enabling interrupts."""

ZERO_PAGE_ADDR = 0x7000
"""``struct boot_params``; RSI points here at the 64-bit entry."""

BOOT_STACK_TOP = 0x8FF0
"""Initial RSP; the stack grows down towards the zero page (which ends at 0x8000)."""

PAGE_TABLES_ADDR = 0x9000
PAGE_TABLES_END = 0x10000
"""Room for PML4 + PDPT + up to 5 page directories (2 MiB pages)."""

CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x10000
"""Bytes reserved for the command line, NUL included (the kernel's own cap is smaller)."""

EBDA_START = 0x9FC00
"""Start of the area e820 reports reserved up to 1 MiB (MP table, ACPI, BIOS area)."""
MPTABLE_ADDR = 0x9FC00
MPTABLE_MAX_SIZE = 0xE0000 - MPTABLE_ADDR
"""The MP config table may run past 0xA0000 (RAM in the memslot, reserved in e820)."""

ACPI_ADDR = 0xE0000
ACPI_MAX_SIZE = 0x20000
"""0xE0000..1 MiB: 128 KiB, ~12 KiB are needed for 256 vCPUs (x2APIC MADT + SRAT)."""

HIGH_MEMORY_START = 0x100000
# KERNEL_LOAD_ADDR (the boot protocol's, from ktstr.bzimage) is where the bzImage payload
# goes; the 64-bit entry point is it + KERNEL_ENTRY_64_OFFSET.
KERNEL_ENTRY_64_OFFSET = 0x200

LOW_RAM_END = 0xA0000
"""End of conventional memory (640 KiB)."""

# --- the 32-bit MMIO gap -----------------------------------------------------------------

MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
"""RAM stops at 3 GiB and continues at 4 GiB; the gap holds all MMIO."""

VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SLOT_SIZE = 0x1000
VIRTIO_MMIO_IRQS: tuple[int, ...] = (5, 6, 7, 10, 11, 12, 13, 14, 15, *range(16, 24))
"""GSIs for virtio-mmio slots in slot order (edge-triggered). IRQ 0/2 are the PIT, 1 the
keyboard, 3/4 the UARTs, 8 the RTC, 9 the ACPI SCI; 16..23 are the KVM IOAPIC's upper pins."""
VIRTIO_MMIO_SLOTS = len(VIRTIO_MMIO_IRQS)

SCI_IRQ = 9
"""FADT SCI_INT (level, active high via a MADT override). Nothing raises it: the platform
has no fixed or general-purpose ACPI events."""

IOAPIC_ADDR = 0xFEC0_0000
IOAPIC_SIZE = 0x1000
IOAPIC_PINS = 24
LAPIC_ADDR = 0xFEE0_0000
LAPIC_SIZE = 0x1000

# Addresses KVM itself needs inside the gap (KVM_SET_TSS_ADDR takes 3 pages, the identity
# map page follows); both must not overlap RAM or other MMIO.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000

# --- I/O ports -----------------------------------------------------------------------------

COM1_PORT = 0x3F8
COM1_IRQ = 4
COM2_PORT = 0x2F8
COM2_IRQ = 3
UART_PORT_COUNT = 8

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_RESET_COMMAND = 0xFE
"""Written to the command port by the kernel's keyboard-controller reboot."""

# The boot-mark and exit-status ports are part of the host-guest contract (ktstr.wire).

PM1A_EVT_PORT = 0x600
PM1_EVT_LEN = 4
"""FADT PM1a_EVT_BLK: status (2 bytes) then enable (2 bytes). No fixed events exist, so both
read as zero."""
PM1A_CNT_PORT = 0x604
PM1_CNT_LEN = 2
"""FADT PM1a_CNT_BLK: Linux's legacy ACPI poweroff writes ``SLP_TYP | SLP_EN`` here."""
S5_SLP_TYP = 5
"""The SLP_TYP value the DSDT's \\_S5 package gives; poweroff writes it to PM1a_CNT."""
PM1_SLP_TYP_SHIFT = 10
PM1_SLP_TYP_MASK = 0x7 << PM1_SLP_TYP_SHIFT
PM1_SLP_EN = 1 << 13
PM1_POWEROFF_VALUE = (S5_SLP_TYP << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN
"""The 16-bit value Linux's ``acpi_hw_legacy_sleep(S5)`` writes to PM1A_CNT_PORT (0x3400)."""


def pm1_control_is_poweroff(value: int) -> bool:
    """True if a value written to PM1A_CNT_PORT requests S5 (soft off)."""
    return bool(value & PM1_SLP_EN) and (value & PM1_SLP_TYP_MASK) >> PM1_SLP_TYP_SHIFT == (
        S5_SLP_TYP
    )


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(gpa, irq) of virtio-mmio slot ``index``."""
    if not 0 <= index < VIRTIO_MMIO_SLOTS:
        raise KtstrError(
            f"virtio-mmio slot {index} does not exist: at most {VIRTIO_MMIO_SLOTS} "
            "virtio devices fit in one VM; attach fewer devices"
        )
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_IRQS[index]


MIN_MEMORY_BYTES = 64 * MiB


def ram_regions(memory_bytes: int) -> list[tuple[int, int]]:
    """Guest RAM as (gpa, size) pieces: from 0 up to the MMIO gap, the rest above 4 GiB.

    These are the memslots; e820 (``loader.build_e820``) describes which parts the
    kernel may use.
    """
    if memory_bytes < MIN_MEMORY_BYTES:
        raise KtstrError(
            f"guest memory {memory_bytes // MiB} MiB is too small: use at least "
            f"{MIN_MEMORY_BYTES // MiB} MiB"
        )
    if memory_bytes % PAGE_SIZE:
        raise KtstrError(f"guest memory {memory_bytes} bytes is not a multiple of 4 KiB")
    low = min(memory_bytes, MMIO_GAP_START)
    regions = [(0, low)]
    if memory_bytes > low:
        regions.append((MMIO_GAP_END, memory_bytes - low))
    return regions


def low_ram_end(regions: list[tuple[int, int]]) -> int:
    """End of the RAM region that starts at 0 (below the MMIO gap)."""
    for gpa, size in regions:
        if gpa == 0:
            return size
    raise KtstrError("guest RAM does not start at address 0")


NUMA_ALIGN = 2 * MiB


def numa_ram_ranges(memory_bytes: int, numa_nodes: int) -> list[list[tuple[int, int]]]:
    """Split guest RAM into ``numa_nodes`` consecutive, equal shares (2 MiB aligned; the
    last node takes the remainder), following ``ram_regions`` around the MMIO gap.

    Node 0 starts at address 0, so it also owns the boot data below 1 MiB. The result is
    what ``acpi.build_acpi_tables`` wants as ``node_ranges``.
    """
    if numa_nodes < 1:
        raise KtstrError(f"numa_nodes must be positive, got {numa_nodes}")
    share = (memory_bytes // numa_nodes) & ~(NUMA_ALIGN - 1)
    if share < NUMA_ALIGN * 2:
        raise KtstrError(
            f"guest memory {memory_bytes // MiB} MiB is too small for {numa_nodes} NUMA nodes"
        )
    pieces = list(ram_regions(memory_bytes))
    nodes: list[list[tuple[int, int]]] = []
    for node in range(numa_nodes):
        want = share if node < numa_nodes - 1 else sum(size for _, size in pieces)
        ranges: list[tuple[int, int]] = []
        while want > 0:
            gpa, size = pieces[0]
            take = min(size, want)
            ranges.append((gpa, take))
            want -= take
            if take == size:
                pieces.pop(0)
            else:
                pieces[0] = (gpa + take, size - take)
        nodes.append(ranges)
    return nodes
