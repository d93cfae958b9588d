"""Intel MultiProcessor Specification 1.4 table (legacy CPU/IRQ enumeration).

Linux prefers the ACPI MADT; this table is the fallback for ``acpi=off`` and for
tools that scan for ``_MP_``. The floating pointer sits at ``layout.MPTABLE_ADDR``
(0x9FC00, the last KiB of conventional memory, which Linux scans) and the
configuration table follows it directly.

Limit: MP processor entries carry an 8-bit APIC ID and 255 means broadcast, so
CPUs whose APIC ID exceeds 254 cannot be described and are left out; the MADT
lists every CPU. That is safe because Linux reads this table only when ACPI did
not already enumerate the local APICs and the IOAPIC (``default_get_smp_config``
in ``arch/x86/kernel/mpparse.c`` returns early on ``acpi_lapic && acpi_ioapic``),
so with ACPI on, the MADT wins; with ``acpi=off`` such a guest comes up with the
CPUs below APIC ID 255 only. Interrupt wiring matches the MADT: ISA IRQ 0 goes
to IOAPIC pin 2 (so source IRQ 2, the cascade, has no entry), every other ISA
IRQ to its own pin; LINT0 is ExtINT and LINT1 NMI on all local APICs.
"""

from __future__ import annotations

import struct

from ktstr.errors import KtstrError
from ktstr.topology import Topology
from ktstr.vmm import layout
from ktstr.vmm.x86.tables import checksum

FLOATING_SIGNATURE = b"_MP_"
CONFIG_SIGNATURE = b"PCMP"
SPEC_REV = 4
"""1.4"""
FLOATING_SIZE = 16
CONFIG_HEADER_SIZE = 44
OEM_ID = b"KTSTR   "
PRODUCT_ID = b"KTSTR VMM   "

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4

CPU_ENABLED = 1 << 0
CPU_BOOTSTRAP = 1 << 1
LAPIC_VERSION = 0x14
"""What KVM's in-kernel local APIC reports."""
IOAPIC_VERSION = 0x11
"""What KVM's in-kernel IOAPIC reports."""
IOAPIC_ENABLED = 1
IOAPIC_ID = 0
CPU_SIGNATURE = 0x600
"""Family 6: only informational; Linux reads the real signature from CPUID."""
CPU_FEATURES = 0x201
"""FPU | APIC."""

INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
INT_FLAGS_CONFORMING = 0
ISA_BUS_ID = 0
ALL_LAPICS = 0xFF
MAX_APIC_ID = 254
ISA_IRQS = 16
IRQ0_PIN = 2


def _isa_irq_pins() -> list[tuple[int, int]]:
    """(ISA IRQ, IOAPIC pin) pairs, the same wiring the MADT overrides describe."""
    pairs = []
    for irq in range(ISA_IRQS):
        if irq == IRQ0_PIN:
            continue  # pin 2 is taken by IRQ 0; IRQ 2 is the PIC cascade
        pairs.append((irq, IRQ0_PIN if irq == 0 else irq))
    return pairs


def build_mptable(topology: Topology, base: int = layout.MPTABLE_ADDR) -> bytes:
    """Floating pointer at ``base`` followed by the configuration table."""
    if base % 16:
        raise KtstrError(f"MP floating pointer must be 16-byte aligned, got {base:#x}")
    entries = bytearray()
    count = 0
    for p in topology.places:
        if p.apic_id > MAX_APIC_ID:
            continue  # not expressible in 8 bits: the MADT's x2APIC entries carry it
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if p.cpu == 0 else 0)
        entries += struct.pack(
            "<BBBBII8x", ENTRY_PROCESSOR, p.apic_id, LAPIC_VERSION, flags,
            CPU_SIGNATURE, CPU_FEATURES,
        )  # fmt: skip
        count += 1
    entries += struct.pack("<BB6s", ENTRY_BUS, ISA_BUS_ID, b"ISA   ")
    entries += struct.pack(
        "<BBBBI", ENTRY_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, IOAPIC_ENABLED, layout.IOAPIC_ADDR
    )
    count += 2
    for irq, pin in _isa_irq_pins():
        entries += struct.pack(
            "<BBHBBBB", ENTRY_IO_INTERRUPT, INT_TYPE_INT, INT_FLAGS_CONFORMING,
            ISA_BUS_ID, irq, IOAPIC_ID, pin,
        )  # fmt: skip
        count += 1
    for int_type, lint in ((INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)):
        entries += struct.pack(
            "<BBHBBBB", ENTRY_LOCAL_INTERRUPT, int_type, INT_FLAGS_CONFORMING,
            ISA_BUS_ID, 0, ALL_LAPICS, lint,
        )  # fmt: skip
        count += 1

    header = struct.pack(
        "<4sHBB8s12sIHHIHBB",
        CONFIG_SIGNATURE, CONFIG_HEADER_SIZE + len(entries), SPEC_REV, 0,
        OEM_ID, PRODUCT_ID, 0, 0, count, layout.LAPIC_ADDR, 0, 0, 0,
    )  # fmt: skip
    config = bytearray(header + entries)
    config[7] = checksum(bytes(config))

    floating = bytearray(
        struct.pack("<4sIBBB5s", FLOATING_SIGNATURE, base + FLOATING_SIZE, 1, SPEC_REV, 0, bytes(5))
    )
    floating[10] = checksum(bytes(floating))
    data = bytes(floating + config)
    if len(data) > layout.MPTABLE_MAX_SIZE:
        raise KtstrError(f"MP table of {len(data)} bytes exceeds {layout.MPTABLE_MAX_SIZE}")
    return data
