"""ACPI tables: parsed back field by field, and disassembled by iasl."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktstr.errors import KtstrError
from ktstr.topology import PRESETS, Topology
from ktstr.vmm import layout
from ktstr.vmm.layout import GiB
from ktstr.vmm.x86 import acpi

X2APIC_TOPOLOGY = Topology(1, 33, 5, 1)
"""165 CPUs whose APIC IDs run past 254 (LLC stride 8): needs x2APIC entries."""


@dataclass
class Parsed:
    tables: dict[bytes, bytes] = field(default_factory=dict)
    addrs: dict[bytes, int] = field(default_factory=dict)


def parse_all(t: acpi.AcpiTables) -> Parsed:
    """Follow RSDP -> XSDT -> tables -> DSDT, checking every checksum on the way."""
    mem = t.data

    def at(gpa: int, length: int) -> bytes:
        off = gpa - t.base
        assert off >= 0 and off + length <= len(mem), f"{gpa:#x}+{length} outside the blob"
        return mem[off : off + length]

    rsdp = at(t.rsdp_addr, 36)
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) & 0xFF == 0
    assert sum(rsdp) & 0xFF == 0
    assert rsdp[15] == 2  # revision
    length, xsdt_addr = struct.unpack_from("<IQ", rsdp, 20)
    assert length == 36

    def table_at(gpa: int) -> bytes:
        sig, tlen = struct.unpack_from("<4sI", at(gpa, 8))
        data = at(gpa, tlen)
        assert sum(data) & 0xFF == 0, f"bad checksum in {sig!r}"
        assert data[10:16] == acpi.OEM_ID
        return data

    out = Parsed()
    xsdt = table_at(xsdt_addr)
    assert xsdt[:4] == b"XSDT"
    n = (len(xsdt) - 36) // 8
    for gpa in struct.unpack_from(f"<{n}Q", xsdt, 36):
        data = table_at(gpa)
        out.tables[data[:4]] = data
        out.addrs[data[:4]] = gpa
    out.tables[b"XSDT"] = xsdt
    fadt = out.tables[b"FACP"]
    (dsdt32,) = struct.unpack_from("<I", fadt, 40)
    (x_dsdt,) = struct.unpack_from("<Q", fadt, 140)
    assert dsdt32 == x_dsdt
    out.tables[b"DSDT"] = table_at(x_dsdt)
    return out


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries = []
    off = 44
    while off < len(madt):
        etype, elen = madt[off], madt[off + 1]
        assert elen >= 2
        entries.append((etype, madt[off : off + elen]))
        off += elen
    assert off == len(madt)
    return entries


def madt_cpus(madt: bytes) -> list[int]:
    """APIC IDs of the processor entries, in table order."""
    ids: list[int] = []
    for etype, e in madt_entries(madt):
        if etype == 0:
            uid, apic, flags = struct.unpack_from("<BBI", e, 2)
            assert flags == 1 and uid == len(ids)
            ids.append(apic)
        elif etype == 9:
            apic, flags, uid = struct.unpack_from("<III", e, 4)
            assert apic > 254 and flags == 1 and uid == len(ids)
            ids.append(apic)
    return ids


def srat_entries(srat: bytes) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
    cpus: dict[int, int] = {}
    mem: list[tuple[int, int, int]] = []
    off = 48
    while off < len(srat):
        etype, elen = srat[off], srat[off + 1]
        e = srat[off : off + elen]
        if etype == 0:
            assert elen == 16
            lo, apic, flags, _, hi = struct.unpack_from("<BBIB3s", e, 2)
            assert flags == 1
            cpus[apic] = lo | int.from_bytes(hi, "little") << 8
        elif etype == 2:
            assert elen == 24
            node, apic, flags = struct.unpack_from("<III", e, 4)
            assert flags == 1
            cpus[apic] = node
        elif etype == 1:
            assert elen == 40
            node, _, blo, bhi, llo, lhi, _, flags = struct.unpack_from("<IHIIIIII", e, 2)
            assert flags == 1
            mem.append((node, blo | bhi << 32, llo | lhi << 32))
        else:
            raise AssertionError(f"unexpected SRAT entry type {etype}")
        off += elen
    assert off == len(srat)
    return cpus, mem


def check_tables(topo: Topology, memory: int) -> Parsed:
    ranges = layout.numa_ram_ranges(memory, topo.numa_nodes)
    t = acpi.build_acpi_tables(topo, ranges, layout.ACPI_ADDR)
    assert t.rsdp_addr == layout.ACPI_ADDR and t.rsdp_addr % 16 == 0
    assert len(t.data) <= layout.ACPI_MAX_SIZE
    p = parse_all(t)
    madt = p.tables[b"APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == layout.LAPIC_ADDR and flags & 1
    ids = madt_cpus(madt)
    assert ids == [pl.apic_id for pl in topo.places]
    assert ids[0] == 0 and len(set(ids)) == len(ids)
    kinds = [etype for etype, _ in madt_entries(madt)]
    assert kinds.count(1) == 1
    (ioapic,) = [e for etype, e in madt_entries(madt) if etype == 1]
    assert struct.unpack_from("<II", ioapic, 4) == (layout.IOAPIC_ADDR, 0)
    isos = {e[3]: struct.unpack_from("<IH", e, 4) for etype, e in madt_entries(madt) if etype == 2}
    assert 0 not in isos  # IRQ0 stays on pin 0, matching KVM's default GSI routing
    assert isos[layout.SCI_IRQ] == (layout.SCI_IRQ, 0xD)
    (nmi,) = [e for etype, e in madt_entries(madt) if etype == 4]
    assert nmi[2] == 0xFF and nmi[5] == 1  # all CPUs, LINT1

    cpus, mem = srat_entries(p.tables[b"SRAT"])
    assert cpus == {pl.apic_id: pl.node for pl in topo.places}
    assert sorted(mem) == sorted(
        (node, gpa, size) for node, rs in enumerate(ranges) for gpa, size in rs
    )
    slit = p.tables[b"SLIT"]
    (n,) = struct.unpack_from("<Q", slit, 36)
    assert n == topo.numa_nodes and len(slit) == 44 + n * n
    for i in range(n):
        for j in range(n):
            assert slit[44 + i * n + j] == (10 if i == j else 20)
    return p


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets(preset: str) -> None:
    check_tables(PRESETS[preset], 4 * GiB)


def test_x2apic_entries_for_large_ids() -> None:
    topo = X2APIC_TOPOLOGY
    assert topo.max_apic_id > 254
    p = check_tables(topo, 2 * GiB)
    kinds = [etype for etype, _ in madt_entries(p.tables[b"APIC"])]
    big = sum(1 for pl in topo.places if pl.apic_id > 254)
    assert kinds.count(9) == big and kinds.count(0) == topo.nr_cpus - big
    assert kinds.count(0xA) == 1  # x2APIC NMI


def test_fadt_fields() -> None:
    p = check_tables(PRESETS["tiny-1llc"], 2 * GiB)
    fadt = p.tables[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 3
    (flags,) = struct.unpack_from("<I", fadt, 112)
    assert not flags & (1 << 20)  # not hardware-reduced: Linux keeps the legacy IRQs
    (sci,) = struct.unpack_from("<H", fadt, 46)
    assert sci == layout.SCI_IRQ
    (smi_cmd,) = struct.unpack_from("<I", fadt, 48)
    assert smi_cmd == 0  # already in ACPI mode
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr, gpe0, gpe1 = struct.unpack_from("<8I", fadt, 56)
    assert (pm1a_evt, pm1a_cnt) == (layout.PM1A_EVT_PORT, layout.PM1A_CNT_PORT)
    assert pm_tmr == gpe0 == gpe1 == 0
    assert tuple(fadt[88:90]) == (layout.PM1_EVT_LEN, layout.PM1_CNT_LEN)
    for off, port, length in (
        (148, layout.PM1A_EVT_PORT, layout.PM1_EVT_LEN),
        (172, layout.PM1A_CNT_PORT, layout.PM1_CNT_LEN),
    ):
        space, width, shift, access, addr = struct.unpack_from("<BBBBQ", fadt, off)
        assert (space, width, shift, access, addr) == (1, 8 * length, 0, 2, port)
    (facs32,) = struct.unpack_from("<I", fadt, 36)
    (facs64,) = struct.unpack_from("<Q", fadt, 132)
    tables = acpi.build_acpi_tables(PRESETS["tiny-1llc"], [[(0, 2 * GiB)]])
    facs_addr, facs_len = tables.tables["FACS"]
    assert facs_len == 64 and facs_addr % 64 == 0
    off = facs_addr - tables.base
    assert tables.data[off : off + 64] == acpi.facs()
    assert facs32 == facs64 != 0


def test_facs_layout() -> None:
    facs = acpi.facs()
    assert len(facs) == 64 and facs[:4] == b"FACS"
    assert struct.unpack_from("<I", facs, 4) == (64,)
    assert facs[32] == 2  # version


def test_dsdt_s5_package() -> None:
    dsdt = acpi.dsdt()
    aml = dsdt[36:]
    # Name(_S5_, Package(4){5, 0, 0, 0})
    assert aml == bytes([0x08]) + b"_S5_" + bytes([0x12, 0x07, 0x04, 0x0A, 5, 0, 0, 0])
    slp_typ = aml[aml.index(b"\x0a") + 1]
    assert (slp_typ << 10) | (1 << 13) == layout.PM1_POWEROFF_VALUE


def test_pkg_length_encodings() -> None:
    assert acpi.aml_pkg_length(6) == b"\x07"
    assert acpi.aml_pkg_length(0x3E) == b"\x3f"
    # two-byte form: (1 << 6) | low nibble, then the rest
    enc = acpi.aml_pkg_length(0x3F)
    assert enc[0] >> 6 == 1 and ((enc[1] << 4) | (enc[0] & 0xF)) == 0x3F + 2


def test_node_count_mismatch() -> None:
    with pytest.raises(KtstrError, match="NUMA nodes"):
        acpi.build_acpi_tables(PRESETS["numa2-2llc"], [[(0, GiB)]], layout.ACPI_ADDR)


def test_size_limit() -> None:
    with pytest.raises(KtstrError, match="ACPI tables need"):
        acpi.build_acpi_tables(
            PRESETS["max-64cpu"], layout.numa_ram_ranges(4 * GiB, 4), layout.ACPI_ADDR,
            max_size=1024,
        )  # fmt: skip


def test_256_vcpus_fit() -> None:
    topo = Topology(4, 16, 16, 1)
    assert topo.nr_cpus == 256
    t = acpi.build_acpi_tables(topo, layout.numa_ram_ranges(8 * GiB, 4), layout.ACPI_ADDR)
    assert len(t.data) <= layout.ACPI_MAX_SIZE
    parse_all(t)


@st.composite
def topologies(draw: st.DrawFn) -> Topology:
    nodes = draw(st.integers(1, 8))
    llcs = nodes * draw(st.integers(1, 8))
    threads = draw(st.integers(1, 4))
    cores = draw(st.integers(1, max(1, min(16, 256 // (llcs * threads)))))
    if llcs * cores * threads > 256:
        llcs = nodes
    return Topology(nodes, llcs, cores, threads)


@settings(max_examples=80, deadline=None)
@given(topo=topologies())
def test_random_topologies(topo: Topology) -> None:
    check_tables(topo, 16 * GiB)


# --- iasl --------------------------------------------------------------------------------

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")


def iasl_disassemble(path: Path) -> str:
    assert IASL is not None
    proc = subprocess.run(
        [IASL, "-d", str(path)], capture_output=True, text=True, cwd=path.parent, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    noise = re.compile(r"warning|error|incorrect|invalid", re.IGNORECASE)
    assert not noise.search(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    dsl = path.with_suffix(".dsl").read_text()
    bad = [ln for ln in dsl.splitlines() if "****" in ln or noise.search(ln)]
    assert not bad, "\n".join(bad)
    return dsl


def _dsl_hex(pattern: str, dsl: str) -> list[int]:
    return [int(v, 16) for v in re.findall(pattern + r"\s*: ([0-9A-F]+)", dsl)]


@needs_iasl
@pytest.mark.parametrize(
    "topo",
    [PRESETS["numa2-4llc"], X2APIC_TOPOLOGY, PRESETS["max-cpu"], PRESETS["numa4-192cpu"]],
    ids=str,
)
def test_iasl_disassembles_every_table(tmp_path: Path, topo: Topology) -> None:
    """Each table as iasl decodes it, with the guest memory the topology gets by default."""
    ranges = layout.numa_ram_ranges(topo.default_memory_mb() * layout.MiB, topo.numa_nodes)
    t = acpi.build_acpi_tables(topo, ranges)
    decoded: dict[str, str] = {}
    for sig, (gpa, length) in t.tables.items():
        if sig == "RSDP":
            continue  # not a table iasl reads on its own; checked by parse_all
        path = tmp_path / f"{sig.lower()}.dat"
        path.write_bytes(t.data[gpa - t.base : gpa - t.base + length])
        decoded[sig] = iasl_disassemble(path)
    assert set(decoded) == {"XSDT", "FACP", "FACS", "DSDT", "APIC", "SRAT", "SLIT"}
    madt = decoded["APIC"]
    small = [p for p in topo.places if p.apic_id <= 254]
    big = [p for p in topo.places if p.apic_id > 254]
    assert madt.count("[Processor Local APIC]") == len(small)
    assert madt.count("[Processor Local x2APIC]") == len(big)
    assert _dsl_hex(r"Local Apic ID", madt) == [p.apic_id for p in small]
    assert _dsl_hex(r"Processor x2Apic ID", madt) == [p.apic_id for p in big]
    # Processor UIDs: the logical CPU number, unique across both entry kinds (plus the
    # all-processors UIDs of the two NMI entries).
    uids = _dsl_hex(r"Processor ID", madt) + _dsl_hex(r"Processor UID", madt)
    assert sorted(uids) == [*range(topo.nr_cpus), 0xFF, *([0xFFFFFFFF] if big else [])]
    assert madt.count("[Local APIC NMI]") == 1
    assert madt.count("[Local x2APIC NMI]") == (1 if big else 0)
    assert madt.count("[I/O APIC]") == 1
    assert madt.count("[Interrupt Source Override]") == 1  # the SCI only
    srat = decoded["SRAT"]
    assert srat.count("[Processor Local APIC/SAPIC Affinity]") == len(small)
    assert srat.count("[Processor Local x2APIC Affinity]") == len(big)
    assert _dsl_hex(r"Proximity Domain Low\(8\)", srat) == [p.node for p in small]
    # "Proximity Domain" alone: x2APIC affinity entries, then memory affinity entries.
    domains = _dsl_hex(r"\] +Proximity Domain", srat)
    assert domains == [p.node for p in big] + [n for n, rs in enumerate(ranges) for _ in rs]
    assert srat.count("[Memory Affinity]") == sum(len(r) for r in ranges)
    slit = decoded["SLIT"]
    assert _dsl_hex(r"Localities", slit) == [topo.numa_nodes]
    assert "Hardware Reduced (V5) : 0" in decoded["FACP"]
    assert re.search(r"Name \(_S5, Package \(0x04\)[^{]*\{\s*0x05,", decoded["DSDT"])


@needs_iasl
def test_iasl_recompiles_dsdt(tmp_path: Path) -> None:
    """The disassembled DSDT compiles back to the same AML."""
    assert IASL is not None
    path = tmp_path / "dsdt.dat"
    path.write_bytes(acpi.dsdt())
    iasl_disassemble(path)
    proc = subprocess.run(
        [IASL, "-p", str(tmp_path / "re"), str(tmp_path / "dsdt.dsl")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "re.aml").read_bytes()[36:] == acpi.dsdt()[36:]
