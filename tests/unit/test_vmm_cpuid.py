"""CPUID topology leaves, checked by re-deriving the topology the way Linux 6.12 does."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktstr.topology import PRESETS, Topology
from ktstr.vmm.x86.cpuid import (
    CPUID1_ECX_TSC_DEADLINE,
    CPUID1_ECX_X2APIC,
    KVM_CPUID_FEATURES,
    KVM_HINTS_REALTIME,
    CpuidEntry,
    cpuid_for_vcpu,
    family_model,
    guest_apic_id_reach,
    vendor,
    xcr0_for,
)

SIG = KVM_SIG = 1


def _vendor_regs(name: str) -> tuple[int, int, int]:
    raw = name.encode()
    ebx, edx, ecx = (int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def _e(fn: int, idx: int, flags: int, eax: int, ebx: int, ecx: int, edx: int) -> CpuidEntry:
    return CpuidEntry(fn, idx, flags, eax, ebx, ecx, edx)


def amd_supported(*, leaf1_eax: int = 0xB00F21, max_basic: int = 0x1C) -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID as measured on an AMD family 0x1A host (topology leaves)."""
    ebx, ecx, edx = _vendor_regs("AuthenticAMD")
    return [
        _e(0x0, 0, 0, max_basic, ebx, ecx, edx),
        _e(0x1, 0, 0, leaf1_eax, 0x1020800, 0x81202000, 0x78BFBFF),
        _e(0x4, 0, SIG, 0, 0, 0, 0),
        _e(0x7, 0, SIG, 0x1, 0x1800002, 0x104, 0x20000000),
        _e(0xB, 0, SIG, 0, 0, 0, 1),
        _e(0x80000000, 0, 0, 0x80000021, ebx, ecx, edx),
        _e(0x80000001, 0, 0, 0xB00F21, 0x40000000, 0x400393, 0x23D3FBFF),
        _e(0x80000006, 0, 0, 0x40802040, 0x60804040, 0x4008140, 0xC009140),
        _e(0x80000008, 0, 0, 0x3030, 0x50020005, 0x7001, 0x0),
        _e(0x8000001D, 0, SIG, 0x121, 0x2C0003F, 0x3F, 0x0),
        _e(0x8000001D, 1, SIG, 0x122, 0x1C0003F, 0x3F, 0x0),
        _e(0x8000001D, 2, SIG, 0x143, 0x3C0003F, 0x3FF, 0x2),
        _e(0x8000001D, 3, SIG, 0x4163, 0x3C0003F, 0x7FFF, 0x1),
        _e(0x8000001D, 4, SIG, 0, 0, 0, 0),
        _e(0x8000001E, 0, 0, 0, 0, 0, 0),
        _e(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
        _e(0x40000001, 0, 0, 0x1007EFB, 0, 0, 0),
    ]


def intel_supported() -> list[CpuidEntry]:
    """A KVM_GET_SUPPORTED_CPUID shape from an Intel host with leaf 0x1F (Sapphire Rapids)."""
    ebx, ecx, edx = _vendor_regs("GenuineIntel")
    return [
        _e(0x0, 0, 0, 0x1F, ebx, ecx, edx),
        _e(0x1, 0, 0, 0x806F8, 0x800, 0xF7FA3223, 0x178BFBFF),
        _e(0x4, 0, SIG, 0xFC004121, 0x2C0003F, 0x3F, 0),
        _e(0x4, 1, SIG, 0xFC004122, 0x1C0003F, 0x3F, 0),
        _e(0x4, 2, SIG, 0xFC004143, 0x3C0003F, 0x7FF, 0),
        _e(0x4, 3, SIG, 0xFC1FC163, 0x3BC0003F, 0xDFFF, 4),
        _e(0x4, 4, SIG, 0, 0, 0, 0),
        _e(0xB, 0, SIG, 0, 0, 0, 0),
        _e(0x1F, 0, SIG, 0, 0, 0, 0),
        _e(0x80000000, 0, 0, 0x80000008, 0, 0, 0),
        _e(0x80000001, 0, 0, 0, 0, 0x121, 0x2C100800),
        _e(0x80000008, 0, 0, 0x3030, 0, 0, 0),
        _e(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
    ]


def _order(n: int) -> int:
    """Linux get_count_order()."""
    return (n - 1).bit_length() if n > 1 else 0


class Cpu:
    """CPUID of one vCPU, queried like the instruction (missing leaf -> zeros)."""

    def __init__(self, entries: Sequence[CpuidEntry]) -> None:
        self.entries = {(e.function, e.index if e.flags & SIG else 0): e for e in entries}
        self.sig = {e.function for e in entries if e.flags & SIG}

    def __call__(self, fn: int, idx: int = 0) -> tuple[int, int, int, int]:
        e = self.entries.get((fn, idx if fn in self.sig else 0))
        return (e.eax, e.ebx, e.ecx, e.edx) if e else (0, 0, 0, 0)


def linux_view(entries: Sequence[CpuidEntry]) -> dict[str, int]:
    """apicid, smt shift, package shift and an LLC key, following 6.12's parsers."""
    cpu = Cpu(entries)
    ven = vendor(entries)
    fam, model = family_model(entries)
    max_basic = cpu(0)[0]
    max_ext = cpu(0x80000000)[0]
    apicid = cpu(1)[1] >> 24
    shifts = {"smt": 0, "core": 0}

    def parse_ext(leaf: int) -> bool:
        nonlocal apicid
        sub = 0
        while True:
            eax, ebx, ecx, edx = cpu(leaf, sub)
            if not ebx & 0xFFFF or not (ecx >> 8) & 0xFF:
                break
            dom = {1: "smt", 2: "core"}[(ecx >> 8) & 0xFF]
            if dom == "smt":
                apicid = edx
                shifts["smt"] = shifts["core"] = eax & 0x1F
            else:
                assert edx == apicid
                shifts["core"] = eax & 0x1F
            sub += 1
        return sub > 0

    def parse_ext_any() -> bool:
        if max_basic >= 0x1F and parse_ext(0x1F):
            return True
        return max_basic >= 0xB and parse_ext(0xB)

    llc: int | None = None
    if ven == "GenuineIntel":
        if not parse_ext_any():
            ncores = ((cpu(4, 0)[0] >> 26) & 0x3F) + 1
            core_shift = _order(ncores)
            smt = _order((cpu(1)[1] >> 16) & 0xFF) - core_shift if cpu(1)[3] & (1 << 28) else 0
            shifts = {"smt": smt, "core": core_shift + smt}
        sub, last = 0, (0, 0)
        while (eax := cpu(4, sub)[0]) & 0x1F:
            last = max(last, ((eax >> 5) & 7, ((eax >> 14) & 0xFFF) + 1))
            sub += 1
        llc = apicid >> _order(last[1])
    else:
        topoext = bool(cpu(0x80000001)[2] & (1 << 22))
        has_x = parse_ext_any()
        if not has_x:
            ecx = cpu(0x80000008)[2]
            sft = (ecx >> 12) & 0xF or _order((ecx & 0xFF) + 1)
            shifts = {"smt": 0, "core": sft}
        node_id = None
        if topoext:
            eax, ebx, ecx, _ = cpu(0x8000001E)
            if not has_x:
                apicid = eax
                if fam >= 0x17:
                    shifts["smt"] = _order(((ebx >> 8) & 0xFF) + 1)
            node_id = ecx & 0xFF
            assert (ecx >> 8) & 7 == 0  # one node per package
            if cpu(0x80000006)[3]:
                if fam < 0x17:
                    llc = node_id
                elif fam == 0x17 and model <= 0x1F:
                    llc = apicid >> 3
                else:
                    n = 0
                    while cpu(0x8000001D, n)[0] & 0x1F:
                        n += 1
                    share = ((cpu(0x8000001D, n - 1)[0] >> 14) & 0xFFF) + 1
                    llc = apicid >> _order(share)
        if llc is None:
            llc = apicid >> shifts["core"]
    assert max_ext >= 0x80000000 or ven == "GenuineIntel"
    return {"apicid": apicid, "smt": shifts["smt"], "core": shifts["core"], "llc": llc}


def check_topology(topo: Topology, supported: list[CpuidEntry]) -> None:
    views = [linux_view(cpuid_for_vcpu(supported, topo, p)) for p in topo.places]
    assert [v["apicid"] for v in views] == [p.apic_id for p in topo.places]
    # Every CPU reports the same shifts (Linux complains about mismatches).
    assert len({(v["smt"], v["core"]) for v in views}) == 1
    smt = views[0]["smt"]
    # SMT siblings: same apicid >> smt shift.
    for p, v in zip(topo.places, views, strict=True):
        sibs = [q.cpu for q, w in zip(topo.places, views, strict=True)
                if w["apicid"] >> smt == v["apicid"] >> smt]  # fmt: skip
        assert sibs == topo.siblings(p.cpu)
        same_llc = [q.cpu for q, w in zip(topo.places, views, strict=True) if w["llc"] == v["llc"]]
        assert same_llc == topo.cpus_in_llc(p.llc)


SUPPLIERS = {
    "amd-fam1a": amd_supported,
    "amd-no-leaf-b": lambda: amd_supported(max_basic=0xA),
    "amd-fam10": lambda: amd_supported(leaf1_eax=0x100F42),  # family 0x10: LLC = node id
    "amd-zen1": lambda: amd_supported(leaf1_eax=0x800F12),  # 0x17/0x01: L3 hidden
    "intel": intel_supported,
}


@pytest.mark.parametrize("host", sorted(SUPPLIERS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets(preset: str, host: str) -> None:
    check_topology(PRESETS[preset], SUPPLIERS[host]())


@st.composite
def topologies(draw: st.DrawFn) -> Topology:
    nodes = draw(st.integers(1, 4))
    llcs = nodes * draw(st.integers(1, 4))
    threads = draw(st.integers(1, 3))
    cores = draw(st.integers(1, min(12, 256 // (llcs * threads))))
    return Topology(nodes, llcs, cores, threads)


@settings(max_examples=60, deadline=None)
@given(topo=topologies(), host=st.sampled_from(sorted(SUPPLIERS)))
def test_random_topologies(topo: Topology, host: str) -> None:
    check_topology(topo, SUPPLIERS[host]())


def test_leaf_values_for_smt_2llc() -> None:
    topo = PRESETS["smt-2llc"]  # 1n2l2c2t: apic ids 0,1,2,3,4,5,6,7
    place = topo.place(5)
    out = {(e.function, e.index): e for e in cpuid_for_vcpu(amd_supported(), topo, place)}
    assert place.apic_id == 5
    assert out[(1, 0)].ebx >> 24 == 5
    assert (out[(1, 0)].ebx >> 16) & 0xFF == 4
    assert out[(1, 0)].edx & (1 << 28)
    assert out[(1, 0)].ecx & (1 << 31)
    assert [(out[(0xB, i)].eax, out[(0xB, i)].ebx, out[(0xB, i)].ecx) for i in range(3)] == [
        (1, 2, 0x100), (2, 4, 0x201), (0, 0, 2)
    ]  # fmt: skip
    assert all(out[(0xB, i)].edx == 5 for i in range(3))
    assert out[(0x80000001, 0)].ecx & 0b10  # CmpLegacy
    assert out[(0x80000008, 0)].ecx & 0xF0FF == 0x2003
    assert [(out[(0x8000001D, i)].eax >> 14) & 0xFFF for i in range(4)] == [1, 1, 1, 3]
    e = out[(0x8000001E, 0)]
    assert (e.eax, e.ebx & 0xFFFF, e.ecx & 0x7FF) == (5, 0x100, 1)
    # Untouched leaves pass through.
    assert out[(0x40000001, 0)] == amd_supported()[-1]
    assert out[(7, 0)].ebx == 0x1800002


def test_single_cpu_package_has_no_htt() -> None:
    topo = Topology(1, 2, 1, 1)
    out = {(e.function, e.index): e for e in cpuid_for_vcpu(intel_supported(), topo, topo.place(1))}
    assert not out[(1, 0)].edx & (1 << 28)
    assert [(out[(0x4, i)].eax >> 14) & 0xFFF for i in range(4)] == [0, 0, 0, 0]
    assert out[(0x1F, 1)].eax == 0 and out[(0x1F, 1)].ebx == 1


def test_input_not_modified() -> None:
    supported = intel_supported()
    before = list(supported)
    cpuid_for_vcpu(supported, PRESETS["large-8llc"], PRESETS["large-8llc"].place(33))
    assert supported == before


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_real_supported_cpuid() -> None:
    from ktstr.vmm.kvm import Kvm

    kvm = Kvm()
    try:
        raw = kvm.supported_cpuid()
    finally:
        kvm.close()
    supported = [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in raw]
    for name in ("smt-2llc", "odd-3llc", "numa2-8llc", "max-64cpu"):
        check_topology(PRESETS[name], supported)


@pytest.mark.parametrize("deadline", [False, True])
def test_tsc_deadline_bit_follows_the_capability(deadline: bool) -> None:
    topo = Topology(1, 1, 2, 1)
    # KVM never reports the bit; the Intel fixture has it set, the AMD one clear: either
    # way the guest sees exactly what the capability says.
    for supported in (amd_supported(), intel_supported()):
        out = cpuid_for_vcpu(supported, topo, topo.place(0), tsc_deadline=deadline)
        leaf1 = next(e for e in out if e.function == 1)
        assert bool(leaf1.ecx & CPUID1_ECX_TSC_DEADLINE) == deadline
        assert leaf1.ecx & (1 << 31)  # hypervisor bit untouched by the option


def test_xcr0_covers_every_offered_state_component() -> None:
    xsave = [_e(0x1, 0, 0, 0, 0, 1 << 26, 0), _e(0xD, 0, SIG, 0x207, 0x240, 0xA88, 0)]
    assert xcr0_for(xsave) == 0x207
    assert xcr0_for([_e(0x1, 0, 0, 0, 0, 1 << 26, 0), _e(0xD, 0, SIG, 0x6, 0, 0, 1)]) == (
        1 << 32 | 0x7
    )  # EDX holds components 32..63; x87 is always on
    assert xcr0_for([_e(0x1, 0, 0, 0, 0, 0, 0), _e(0xD, 0, SIG, 0x207, 0, 0, 0)]) == 0
    assert xcr0_for(intel_supported()) == 0  # no leaf 0xD


def test_largest_preset_keeps_x2apic_and_full_ids() -> None:
    """252 vCPUs, APIC IDs up to 433: leaf 1 keeps x2APIC, 0xB/0x8000001E carry the full ID."""
    topo = PRESETS["max-cpu"]
    last = topo.place(topo.nr_cpus - 1)
    assert last.apic_id == 433
    for supported in (amd_supported(), intel_supported()):
        out = cpuid_for_vcpu(supported, topo, last)
        leaf1 = next(e for e in out if e.function == 1)
        assert leaf1.ecx & CPUID1_ECX_X2APIC  # both fixtures offer it; it is kept
        assert leaf1.ebx >> 24 == 433 & 0xFF  # the 8-bit legacy field truncates
        assert {e.edx for e in out if e.function in (0xB, 0x1F)} == {433}
    check_topology(topo, amd_supported())
    check_topology(topo, intel_supported())


def test_guest_apic_id_reach() -> None:
    # The measured AMD host's KVM (in-kernel IOAPIC) offers no extended destination ID.
    assert guest_apic_id_reach(amd_supported()) == 255
    assert guest_apic_id_reach([]) == 255
    ext = [
        e if e.function != 0x40000001 else _e(0x40000001, 0, 0, e.eax | 1 << 15, 0, 0, 0)
        for e in amd_supported()
    ]
    assert guest_apic_id_reach(ext) == 0x7FFF
    # The paravirt leaf passes through, so a KVM that offers the bit reaches the guest.
    out = cpuid_for_vcpu(ext, PRESETS["max-cpu"], PRESETS["max-cpu"].place(251))
    assert guest_apic_id_reach(out) == 0x7FFF


def test_realtime_hint_is_set_only_when_asked() -> None:
    topo, place = Topology.parse("1n1l2c1t"), Topology.parse("1n1l2c1t").places[0]

    def edx(**kw: bool | None) -> int:
        out = {(e.function, e.index): e for e in cpuid_for_vcpu(amd_supported(), topo, place,
                                                                  **kw)}  # type: ignore[arg-type]
        return out[(KVM_CPUID_FEATURES, 0)].edx

    assert edx() == 0  # as KVM reported it
    assert edx(hints_realtime=True) & KVM_HINTS_REALTIME
    assert not edx(hints_realtime=False) & KVM_HINTS_REALTIME
