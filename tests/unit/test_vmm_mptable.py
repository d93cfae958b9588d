"""MP table: parsed back the way Linux's mpparse reads it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktstr.errors import KtstrError
from ktstr.topology import PRESETS, Topology
from ktstr.vmm import layout
from ktstr.vmm.x86 import mptable

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(data: bytes, base: int) -> dict[str, list[tuple[int, ...]]]:
    """Scan for _MP_ on 16-byte boundaries, then walk the config table entries."""
    offsets = [o for o in range(0, len(data) - 15, 16) if data[o : o + 4] == b"_MP_"]
    assert offsets == [0]
    fp = data[:16]
    assert sum(fp) & 0xFF == 0
    phys, length, rev, _, feature1 = struct.unpack_from("<IBBBB", fp, 4)
    assert (length, rev, feature1) == (1, 4, 0)
    cfg_off = phys - base
    assert data[cfg_off : cfg_off + 4] == b"PCMP"
    (tlen, rev, _, _, _, _, _, count, lapic) = struct.unpack_from(
        "<HBB8s12sIHHI", data, cfg_off + 4
    )
    cfg = data[cfg_off : cfg_off + tlen]
    assert len(cfg) == tlen and rev == 4
    assert sum(cfg) & 0xFF == 0
    assert lapic == layout.LAPIC_ADDR
    out: dict[str, list[tuple[int, ...]]] = {
        "cpu": [],
        "bus": [],
        "ioapic": [],
        "io": [],
        "local": [],
    }
    off = 44
    for _ in range(count):
        etype = cfg[off]
        size = ENTRY_SIZES[etype]
        e = cfg[off : off + size]
        if etype == 0:
            out["cpu"].append(struct.unpack_from("<BBBI", e, 1))
        elif etype == 1:
            out["bus"].append((e[1], e[2:8]))  # type: ignore[arg-type]
        elif etype == 2:
            out["ioapic"].append(struct.unpack_from("<BBBI", e, 1))
        elif etype == 3:
            out["io"].append(struct.unpack_from("<BHBBBB", e, 1))
        else:
            out["local"].append(struct.unpack_from("<BHBBBB", e, 1))
        off += size
    assert off == tlen, "entry count and table length disagree"
    return out


def check(topo: Topology) -> dict[str, list[tuple[int, ...]]]:
    data = mptable.build_mptable(topo, layout.MPTABLE_ADDR)
    assert len(data) <= layout.MPTABLE_MAX_SIZE
    t = parse(data, layout.MPTABLE_ADDR)
    listed = [p for p in topo.places if p.apic_id <= 254]
    assert [c[0] for c in t["cpu"]] == [p.apic_id for p in listed]
    flags = [c[2] for c in t["cpu"]]
    assert flags[0] == 3 and all(f == 1 for f in flags[1:])  # BSP only on CPU 0
    assert t["bus"] == [(0, b"ISA   ")]
    assert t["ioapic"] == [(0, 0x11, 1, layout.IOAPIC_ADDR)]
    wiring = {src_irq: pin for (kind, _, bus, src_irq, apic, pin) in t["io"] if kind == 0}
    assert wiring == {0: 2, **{i: i for i in range(1, 16) if i != 2}}
    assert sorted((kind, lint) for kind, _, _, _, dest, lint in t["local"]) == [(1, 1), (3, 0)]
    assert all(dest == 0xFF for _, _, _, _, dest, _ in t["local"])
    return t


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets(preset: str) -> None:
    check(PRESETS[preset])


def test_large_apic_ids_are_left_out() -> None:
    topo = Topology(1, 33, 5, 1)  # APIC IDs up to 260
    t = check(topo)
    assert len(t["cpu"]) == sum(1 for p in topo.places if p.apic_id <= 254) < topo.nr_cpus


def test_largest_preset_lists_the_xapic_cpus_only() -> None:
    t = check(PRESETS["max-cpu"])  # 1n14l9c2t: LLCs 0..7 have IDs < 255, LLCs 8..13 not
    assert len(t["cpu"]) == 8 * 18 and max(c[0] for c in t["cpu"]) == 7 << 5 | 8 << 1 | 1


def test_256_cpus_fit_below_acpi() -> None:
    data = mptable.build_mptable(Topology(1, 16, 16, 1))
    assert layout.MPTABLE_ADDR + len(data) <= layout.ACPI_ADDR


def test_unaligned_base() -> None:
    with pytest.raises(KtstrError, match="aligned"):
        mptable.build_mptable(PRESETS["tiny-1llc"], 0x9FC08)


@settings(max_examples=50, deadline=None)
@given(
    nodes=st.integers(1, 4),
    llcs=st.integers(1, 4),
    cores=st.integers(1, 8),
    threads=st.integers(1, 2),
)
def test_random(nodes: int, llcs: int, cores: int, threads: int) -> None:
    check(Topology(nodes, nodes * llcs, cores, threads))
