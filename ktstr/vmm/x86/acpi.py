"""ACPI tables for the guest: RSDP, XSDT, FADT, FACS, DSDT, MADT, SRAT, SLIT.

Linux takes CPU enumeration (MADT), NUMA placement (SRAT, SLIT) and the
poweroff path (FADT + DSDT ``\\_S5``) from these. The platform is a legacy-PC
ACPI one, not hardware-reduced: a hardware-reduced FADT makes Linux drop the
legacy PIC, and then the raw ISA IRQs of the UARTs (3, 4) and of the
``virtio_mmio.device=`` slots (5, 6, 7, 10..15) have no interrupt mapping.
PM1a event/control blocks are two system-I/O ports from ``layout``; there is
no PM timer, no GPE block and no SMI command port (so Linux finds the platform
already in ACPI mode). Poweroff is Linux's ``acpi_hw_legacy_sleep(S5)``:
``SLP_TYP << 10 | SLP_EN`` written to PM1a_CNT (``layout.PM1_POWEROFF_VALUE``).
IRQ0 has no interrupt source override: KVM's default routing sends GSI 0
(the in-kernel PIT) to IOAPIC pin 0.

Logical CPU order is MADT order, which is ``Topology.places`` order (boot CPU,
APIC ID 0, first). APIC IDs below 255 use xAPIC entries (MADT type 0, SRAT type
0); larger ones x2APIC entries (MADT type 9, SRAT type 2), as the ACPI spec
requires and Linux expects (it ignores x2APIC entries below 255 when xAPIC ones
exist).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ktstr.errors import KtstrError
from ktstr.topology import Topology
from ktstr.vmm import layout
from ktstr.vmm.x86.tables import checksum

OEM_ID = b"KTSTR "
OEM_TABLE_ID = b"KTSTRVM "
OEM_REVISION = 1
CREATOR_ID = b"KTST"
CREATOR_REVISION = 1
HEADER_SIZE = 36

RSDP_SIZE = 36
RSDP_SIGNATURE = b"RSD PTR "

# FADT
FADT_REVISION = 6
FADT_MINOR_REVISION = 3
FADT_SIZE = 276
FADT_F_WBINVD = 1 << 0
FADT_F_PWR_BUTTON = 1 << 4
"""Set = no fixed-feature power button."""
FADT_F_SLP_BUTTON = 1 << 5
FACS_SIZE = 64
FACS_VERSION = 2
FACS_ALIGN = 64
IAPC_NO_VGA = 1 << 2
IAPC_NO_CMOS_RTC = 1 << 5
"""No 8042 flag: Linux skips probing the keyboard controller (reset still works)."""
HYPERVISOR_VENDOR = b"KTSTRVMM"
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_ACCESS_WORD = 2
GAS_ACCESS_DWORD = 3

# MADT
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1
MADT_LAPIC = 0
MADT_IOAPIC = 1
MADT_ISO = 2
MADT_LAPIC_NMI = 4
MADT_X2APIC = 9
MADT_X2APIC_NMI = 0xA
LAPIC_ENABLED = 1
ISO_FLAGS_CONFORMING = 0x0
ISO_FLAGS_LEVEL_HIGH = 0x1 | (0x3 << 2)
"""Active high (polarity 01), level triggered (trigger mode 11)."""
NMI_FLAGS_EDGE_HIGH = 0x1 | (0x1 << 2)
ALL_PROCESSORS_UID = 0xFF
ALL_PROCESSORS_X2UID = 0xFFFFFFFF
NMI_LINT = 1
IOAPIC_ID = 0
"""Matches the ID register of KVM's in-kernel IOAPIC after reset."""
XAPIC_MAX_ID = 254
"""xAPIC entries hold IDs 0..254 (255 is broadcast)."""

# SRAT / SLIT
SRAT_REVISION = 3
SRAT_CPU_AFFINITY = 0
SRAT_MEMORY_AFFINITY = 1
SRAT_X2APIC_AFFINITY = 2
SRAT_ENABLED = 1
SLIT_REVISION = 1
LOCAL_DISTANCE = 10
REMOTE_DISTANCE = 20

DSDT_REVISION = 2
XSDT_REVISION = 1


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: standard header (with length and checksum) + ``body``."""
    assert len(signature) == 4
    length = HEADER_SIZE + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        length,
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    data = bytearray(header + body)
    data[9] = checksum(bytes(data))
    return bytes(data)


def gas(space: int, bit_width: int, address: int, access_size: int) -> bytes:
    """Generic Address Structure (12 bytes)."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def rsdp(xsdt_addr: int) -> bytes:
    """ACPI 2.0+ root pointer: checksum over the first 20 bytes, extended over all 36."""
    data = bytearray(
        struct.pack("<8sB6sBIIQB3x", RSDP_SIGNATURE, 0, OEM_ID, 2, 0, RSDP_SIZE, xsdt_addr, 0)
    )
    data[8] = checksum(bytes(data[:20]))
    data[32] = checksum(bytes(data))
    return bytes(data)


def xsdt(table_addrs: Sequence[int]) -> bytes:
    return table(b"XSDT", XSDT_REVISION, struct.pack(f"<{len(table_addrs)}Q", *table_addrs))


def fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(36, "<I", facs_addr)
    put(40, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)
    put(46, "<H", layout.SCI_IRQ)
    put(56, "<I", layout.PM1A_EVT_PORT)
    put(64, "<I", layout.PM1A_CNT_PORT)
    put(88, "<BB", layout.PM1_EVT_LEN, layout.PM1_CNT_LEN)
    put(109, "<H", IAPC_NO_VGA | IAPC_NO_CMOS_RTC)
    put(112, "<I", FADT_F_WBINVD | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON)
    put(131, "<B", FADT_MINOR_REVISION)
    put(132, "<Q", facs_addr)
    put(140, "<Q", dsdt_addr)
    pm1_evt = gas(GAS_SYSTEM_IO, 8 * layout.PM1_EVT_LEN, layout.PM1A_EVT_PORT, GAS_ACCESS_WORD)
    pm1_cnt = gas(GAS_SYSTEM_IO, 8 * layout.PM1_CNT_LEN, layout.PM1A_CNT_PORT, GAS_ACCESS_WORD)
    body[148 - HEADER_SIZE : 160 - HEADER_SIZE] = pm1_evt
    body[172 - HEADER_SIZE : 184 - HEADER_SIZE] = pm1_cnt
    put(268, "<8s", HYPERVISOR_VENDOR)
    return table(b"FACP", FADT_REVISION, bytes(body))


def facs() -> bytes:
    """Firmware ACPI Control Structure: required on non-hardware-reduced platforms; no checksum."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, FACS_VERSION, 0)


# --- AML -------------------------------------------------------------------------------

AML_ZERO = 0x00
AML_ONE = 0x01
AML_NAME_OP = 0x08
AML_BYTE_PREFIX = 0x0A
AML_PACKAGE_OP = 0x12


def aml_pkg_length(content_len: int) -> bytes:
    """PkgLength encoding for ``content_len`` bytes following it (length includes itself)."""
    if content_len + 1 < 0x40:
        return bytes([content_len + 1])
    for extra in (1, 2, 3):
        total = content_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0xF)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([lead]) + rest
    raise KtstrError("AML package too large")


def aml_integer(value: int) -> bytes:
    if value == 0:
        return bytes([AML_ZERO])
    if value == 1:
        return bytes([AML_ONE])
    if value <= 0xFF:
        return bytes([AML_BYTE_PREFIX, value])
    raise KtstrError(f"AML integer {value} not supported here")


def aml_name_package(name: str, values: Sequence[int]) -> bytes:
    """``Name(NAME, Package(){values...})``."""
    encoded = name.encode()
    assert len(encoded) == 4
    content = bytes([len(values)]) + b"".join(aml_integer(v) for v in values)
    return (
        bytes([AML_NAME_OP])
        + encoded
        + bytes([AML_PACKAGE_OP])
        + aml_pkg_length(len(content))
        + content
    )


def dsdt() -> bytes:
    """DSDT whose only content is ``\\_S5_``: SLP_TYPa = layout.S5_SLP_TYP."""
    return table(b"DSDT", DSDT_REVISION, aml_name_package("_S5_", [layout.S5_SLP_TYP, 0, 0, 0]))


# --- MADT / SRAT / SLIT ------------------------------------------------------------------


def madt(topology: Topology) -> bytes:
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    any_x2apic = False
    for p in topology.places:
        if p.apic_id <= XAPIC_MAX_ID and p.cpu <= 0xFF:
            body += struct.pack("<BBBBI", MADT_LAPIC, 8, p.cpu, p.apic_id, LAPIC_ENABLED)
        else:
            any_x2apic = True
            body += struct.pack("<BBHIII", MADT_X2APIC, 16, 0, p.apic_id, LAPIC_ENABLED, p.cpu)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, layout.IOAPIC_ADDR, 0)
    body += struct.pack(
        "<BBBBIH", MADT_ISO, 10, 0, layout.SCI_IRQ, layout.SCI_IRQ, ISO_FLAGS_LEVEL_HIGH
    )
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS_UID, NMI_FLAGS_EDGE_HIGH, 1)
    if any_x2apic:
        body += struct.pack(
            "<BBHIB3x", MADT_X2APIC_NMI, 12, NMI_FLAGS_EDGE_HIGH, ALL_PROCESSORS_X2UID, NMI_LINT
        )
    return table(b"APIC", MADT_REVISION, bytes(body))


def srat(topology: Topology, node_ranges: Sequence[Sequence[tuple[int, int]]]) -> bytes:
    body = bytearray(struct.pack("<IQ", 1, 0))  # reserved: 1 for compatibility
    for p in topology.places:
        if p.apic_id <= XAPIC_MAX_ID:
            body += struct.pack(
                "<BBBBIB3sI",
                SRAT_CPU_AFFINITY, 16, p.node & 0xFF, p.apic_id, SRAT_ENABLED, 0,
                (p.node >> 8).to_bytes(3, "little"), 0,
            )  # fmt: skip
        else:
            body += struct.pack(
                "<BBHIIIII", SRAT_X2APIC_AFFINITY, 24, 0, p.node, p.apic_id, SRAT_ENABLED, 0, 0
            )
    for node, ranges in enumerate(node_ranges):
        for gpa, size in ranges:
            body += struct.pack(
                "<BBIHIIIIIIQ",
                SRAT_MEMORY_AFFINITY, 40, node, 0,
                gpa & 0xFFFFFFFF, gpa >> 32, size & 0xFFFFFFFF, size >> 32,
                0, SRAT_ENABLED, 0,
            )  # fmt: skip
    return table(b"SRAT", SRAT_REVISION, bytes(body))


def slit(nodes: int) -> bytes:
    matrix = bytes(
        LOCAL_DISTANCE if i == j else REMOTE_DISTANCE for i in range(nodes) for j in range(nodes)
    )
    return table(b"SLIT", SLIT_REVISION, struct.pack("<Q", nodes) + matrix)


@dataclass(frozen=True)
class AcpiTables:
    """All tables, laid out contiguously for guest address ``base``."""

    data: bytes
    rsdp_addr: int
    base: int
    tables: dict[str, tuple[int, int]]
    """Signature -> (gpa, length), for diagnostics and tests."""


def _align(value: int, to: int = 16) -> int:
    return (value + to - 1) & ~(to - 1)


def build_acpi_tables(
    topology: Topology,
    node_ranges: Sequence[Sequence[tuple[int, int]]],
    base: int = layout.ACPI_ADDR,
    *,
    max_size: int = layout.ACPI_MAX_SIZE,
) -> AcpiTables:
    """RSDP at ``base``, then XSDT, FADT, FACS, DSDT, MADT, SRAT and SLIT.

    ``node_ranges[n]`` lists the guest-physical RAM ranges (gpa, size) of NUMA node n.
    """
    if len(node_ranges) != topology.numa_nodes:
        raise KtstrError(
            f"topology {topology.label} has {topology.numa_nodes} NUMA nodes but memory was "
            f"split into {len(node_ranges)}"
        )
    blobs: dict[str, bytes] = {
        "DSDT": dsdt(),
        "APIC": madt(topology),
        "SRAT": srat(topology, node_ranges),
        "SLIT": slit(topology.numa_nodes),
    }
    # Layout: RSDP | XSDT | FADT | FACS | DSDT | APIC | SRAT | SLIT, each 16-byte aligned
    # (the FACS 64-byte aligned).
    listed = [sig for sig in ("APIC", "SRAT", "SLIT") if sig in blobs]
    xsdt_addr = _align(base + RSDP_SIZE)
    xsdt_len = HEADER_SIZE + 8 * (1 + len(listed))
    fadt_addr = _align(xsdt_addr + xsdt_len)
    facs_addr = _align(fadt_addr + FADT_SIZE, FACS_ALIGN)
    blobs["FACS"] = facs()
    addr = _align(facs_addr + FACS_SIZE)
    where: dict[str, tuple[int, int]] = {"FACS": (facs_addr, FACS_SIZE)}
    for sig in ("DSDT", *listed):
        where[sig] = (addr, len(blobs[sig]))
        addr = _align(addr + len(blobs[sig]))
    blobs["FACP"] = fadt(where["DSDT"][0], facs_addr)
    where["FACP"] = (fadt_addr, FADT_SIZE)
    blobs["XSDT"] = xsdt([fadt_addr] + [where[sig][0] for sig in listed])
    where["XSDT"] = (xsdt_addr, xsdt_len)
    blobs["RSDP"] = rsdp(xsdt_addr)
    where["RSDP"] = (base, RSDP_SIZE)
    size = addr - base
    if size > max_size:
        raise KtstrError(
            f"ACPI tables need {size} bytes but {max_size} are reserved at {base:#x}; "
            "use fewer vCPUs or NUMA nodes"
        )
    out = bytearray(size)
    for sig, (gpa, length) in where.items():
        assert len(blobs[sig]) == length
        out[gpa - base : gpa - base + length] = blobs[sig]
    return AcpiTables(data=bytes(out), rsdp_addr=base, base=base, tables=where)
