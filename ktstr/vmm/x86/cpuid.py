"""Per-vCPU CPUID: edit KVM_GET_SUPPORTED_CPUID so the guest sees the declared topology.

Linux 6.12 derives its CPU topology from these leaves (``arch/x86/kernel/cpu/
topology_*.c``, ``cacheinfo.c``); every one present in the supported list is
rewritten consistently:

=================  ==========================================================
leaf               what the guest derives from it
=================  ==========================================================
0x1 EBX[31:24]     initial APIC ID (8 bits; the full ID comes from 0xB/0x8000001E)
0x1 EBX[23:16]     addressable IDs per package; with EDX.HTT the legacy SMT shift
0x1 ECX            hypervisor bit (set), x2APIC (kept as KVM supports it), TSC-deadline
                   timer (set when KVM_CAP_TSC_DEADLINE_TIMER: KVM_GET_SUPPORTED_CPUID
                   never reports it; with it Linux skips LAPIC timer calibration)
0x4 (Intel)        cache sharing EAX[25:14]: LLC-wide for the last level, per
                   core below; EAX[31:26] cores per package (legacy core count);
                   ``llc_id``/``l2c_id`` on Intel come from here
0xB, 0x1F          x2APIC levels: SMT (shift = thread bits) and CORE (shift =
                   ``Topology.llc_shift``), EDX = x2APIC ID. They set the SMT and
                   package shifts on Intel and on AMD (``cpu_parse_topology_ext``)
0x80000001 ECX     CmpLegacy (multi-core package); TopoExt kept as supported
0x80000008 ECX     NC = CPUs per package - 1, ApicIdCoreIdSize = package shift
                   (AMD core shift when 0xB is absent)
0x8000001D         AMD cache sharing (family >= 0x17 ``llc_id``, sysfs shared maps)
0x8000001E         EAX x2APIC ID, EBX core id / threads per core - 1 (AMD SMT
                   shift when 0xB is absent), ECX node id / nodes per package - 1
                   (family < 0x17 ``llc_id`` is this node id)
0x40000000..       KVM paravirt leaves: passed through untouched
=================  ==========================================================

Model: one LLC is one package. The package shift is ``llc_shift``, so every path
through the guest's parsers (Intel 0x1F/0xB/legacy, AMD 0xB/0x80000008/
0x8000001E, any family) puts the same CPUs in the same LLC. NUMA nodes come from
the ACPI SRAT, not CPUID; the scheduler's package level spans the node anyway
(x86's PKG sched domain uses the node mask). Sharing counts are reported as
*addressable IDs* (powers of two, as hardware does) because Linux turns them
into APIC-ID shifts with ``get_count_order``.

Two CPU models hard-code the LLC as ``apicid >> 3``: AMD family 0x17 models
0x00-0x1F and Hygon. On those hosts the L3 descriptor in 0x80000006 EDX is
cleared, which makes Linux fall back to the package (= LLC) for ``llc_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ktstr.topology import CpuPlace, Topology

KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1

VENDOR_INTEL = "GenuineIntel"
VENDOR_AMD = "AuthenticAMD"
VENDOR_HYGON = "HygonGenuine"

# Leaf 1
CPUID1_ECX_X2APIC = 1 << 21
CPUID1_ECX_TSC_DEADLINE = 1 << 24
CPUID1_ECX_XSAVE = 1 << 26
CPUID1_ECX_HYPERVISOR = 1 << 31
CPUID1_EDX_HTT = 1 << 28
# Leaf 0x80000001
EXT1_ECX_CMP_LEGACY = 1 << 1
EXT1_ECX_TOPOEXT = 1 << 22

# KVM paravirt features (leaf 0x40000001 EAX)
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_MSI_EXT_DEST_ID = 1 << 15
KVM_HINTS_REALTIME = 1 << 0
"""Leaf 0x40000001 EDX: vCPUs are never preempted (performance mode's pinned vCPUs)."""
APIC_ID_REACH_8BIT = 255
APIC_ID_REACH_EXT_DEST = 0x7FFF

# 0xB / 0x1F level types
LEVEL_INVALID = 0
LEVEL_SMT = 1
LEVEL_CORE = 2

CACHE_TYPE_NULL = 0


@dataclass(frozen=True)
class CpuidEntry:
    """One ``kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def vendor(entries: Sequence[CpuidEntry]) -> str:
    """The vendor string of leaf 0 (EBX, EDX, ECX), e.g. ``AuthenticAMD``."""
    for e in entries:
        if e.function == 0:
            raw = b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))
            return raw.decode("ascii", "replace")
    return ""


def family_model(entries: Sequence[CpuidEntry]) -> tuple[int, int]:
    """Display family and model from leaf 1 EAX, computed the way Linux does."""
    for e in entries:
        if e.function == 1:
            fam = (e.eax >> 8) & 0xF
            model = (e.eax >> 4) & 0xF
            if fam == 0xF:
                fam += (e.eax >> 20) & 0xFF
            if fam >= 0x6:
                model += ((e.eax >> 16) & 0xF) << 4
            return fam, model
    return 0, 0


def _set_bits(value: int, lo: int, width: int, field: int) -> int:
    mask = ((1 << width) - 1) << lo
    return (value & ~mask) | ((field << lo) & mask)


def _flag(value: int, bit: int, on: bool) -> int:
    return value | bit if on else value & ~bit


def _max_leaf(entries: Sequence[CpuidEntry], base: int) -> int:
    for e in entries:
        if e.function == base and e.index == 0:
            return e.eax
    return 0


def _level_entries(function: int, topo: Topology, apic_id: int) -> list[CpuidEntry]:
    """Subleaves of 0xB/0x1F: SMT, CORE (= package), then the terminating invalid level."""
    flags = KVM_CPUID_FLAG_SIGNIFICANT_INDEX
    return [
        CpuidEntry(
            function, 0, flags, topo.thread_bits, topo.threads_per_core,
            (LEVEL_SMT << 8) | 0, apic_id,
        ),
        CpuidEntry(
            function, 1, flags, topo.llc_shift, topo.cpus_per_llc,
            (LEVEL_CORE << 8) | 1, apic_id,
        ),
        CpuidEntry(function, 2, flags, 0, 0, (LEVEL_INVALID << 8) | 2, apic_id),
    ]  # fmt: skip


def _cache_sharing(entries: list[CpuidEntry], function: int, topo: Topology) -> list[CpuidEntry]:
    """Rewrite EAX[25:14] (and on leaf 4 EAX[31:26]) of every valid cache subleaf."""
    subleaves = [e for e in entries if e.function == function and e.eax & 0x1F != CACHE_TYPE_NULL]
    if not subleaves:
        return entries
    last_level = max((e.eax >> 5) & 0x7 for e in subleaves)
    llc_ids = 1 << topo.llc_shift
    core_ids = 1 << topo.thread_bits
    out = []
    for e in entries:
        if e in subleaves:
            level = (e.eax >> 5) & 0x7
            sharing = llc_ids if level == last_level else core_ids
            eax = _set_bits(e.eax, 14, 12, sharing - 1)
            if function == 4:
                eax = _set_bits(eax, 26, 6, min((1 << topo.core_bits) - 1, 63))
            e = replace(e, eax=eax)
        out.append(e)
    return out


def cpuid_for_vcpu(
    supported: Sequence[CpuidEntry],
    topology: Topology,
    place: CpuPlace,
    *,
    tsc_deadline: bool = False,
    hints_realtime: bool | None = None,
) -> list[CpuidEntry]:
    """The CPUID table for the vCPU at ``place``: ``supported`` with topology leaves edited.

    ``hints_realtime`` sets (True) or clears (False) KVM_HINTS_REALTIME; None leaves
    what KVM reports. Pure: the input is not modified. Leaves absent from ``supported`` (other than
    0xB/0x1F subleaves, which are generated when the max basic leaf covers them) stay
    absent, so a host without e.g. TopoExt yields a guest without it.
    """
    topo = topology
    apic_id = place.apic_id
    ven = vendor(supported)
    fam, model = family_model(supported)
    max_basic = _max_leaf(supported, 0)
    package_ids = 1 << topo.llc_shift
    multi = topo.cpus_per_llc > 1

    out: list[CpuidEntry] = []
    for e in supported:
        fn = e.function
        if fn in (0xB, 0x1F):
            continue  # regenerated below
        if fn == 1:
            ebx = _set_bits(e.ebx, 24, 8, apic_id & 0xFF)
            ebx = _set_bits(ebx, 16, 8, min(package_ids, 0xFF))
            e = replace(
                e,
                ebx=ebx,
                ecx=_flag(e.ecx | CPUID1_ECX_HYPERVISOR, CPUID1_ECX_TSC_DEADLINE, tsc_deadline),
                edx=_flag(e.edx, CPUID1_EDX_HTT, package_ids > 1),
            )
        elif fn == 0x80000001:
            e = replace(e, ecx=_flag(e.ecx, EXT1_ECX_CMP_LEGACY, multi))
        elif fn == KVM_CPUID_FEATURES and hints_realtime is not None:
            e = replace(e, edx=_flag(e.edx, KVM_HINTS_REALTIME, hints_realtime))
        elif fn == 0x80000006 and (ven == VENDOR_HYGON or (fam == 0x17 and model <= 0x1F)):
            e = replace(e, edx=0)
        elif fn == 0x80000008:
            ecx = _set_bits(e.ecx, 0, 8, topo.cpus_per_llc - 1)
            ecx = _set_bits(ecx, 12, 4, topo.llc_shift)
            e = replace(e, ecx=ecx)
        elif fn == 0x8000001E:
            core_in_llc = place.core % topo.cores_per_llc
            e = replace(
                e,
                eax=apic_id,
                ebx=(e.ebx & ~0xFFFF) | ((topo.threads_per_core - 1) << 8) | (core_in_llc & 0xFF),
                ecx=(e.ecx & ~0x7FF) | (place.llc & 0xFF),  # one node per package
                edx=0,
            )
        out.append(e)

    out = _cache_sharing(out, 4, topo)
    out = _cache_sharing(out, 0x8000001D, topo)
    if max_basic >= 0xB:
        out += _level_entries(0xB, topo, apic_id)
    if max_basic >= 0x1F:
        out += _level_entries(0x1F, topo, apic_id)
    out.sort(key=lambda e: (e.function, e.index))
    return out


def has_leaf(entries: Sequence[CpuidEntry], function: int) -> bool:
    return any(e.function == function for e in entries)


def guest_apic_id_reach(supported: Sequence[CpuidEntry]) -> int:
    """The highest APIC ID a Linux guest brings online on this KVM, from its supported CPUID.

    x2APIC entries in the MADT and the x2APIC bit of leaf 1 let Linux enumerate any ID,
    but without interrupt remapping ``try_to_enable_x2apic`` (``arch/x86/kernel/apic/
    apic.c``) caps usable IDs at 255 (what an IOAPIC/MSI destination can name) unless the
    hypervisor offers KVM_FEATURE_MSI_EXT_DEST_ID (15 bits); CPUs above the cap fail
    bring-up ("has invalid APIC ID ... Aborting bringup"). KVM's in-kernel IOAPIC, which
    this VMM uses, cannot route extended destination IDs, so KVM does not offer the
    feature: with KVM as it is, the answer is 255. Should KVM grow the support it will
    report the bit itself, and the passed-through paravirt leaf carries it to the guest.
    """
    for e in supported:
        if e.function == KVM_CPUID_FEATURES and e.eax & KVM_FEATURE_MSI_EXT_DEST_ID:
            return APIC_ID_REACH_EXT_DEST
    return APIC_ID_REACH_8BIT


def xcr0_for(entries: Sequence[CpuidEntry]) -> int:
    """XCR0 enabling every state component leaf 0xD offers (x87 at least), 0 without XSAVE.

    Set before the guest starts so that KVM computes leaf 0xD.0 EBX (XSAVE area size for
    the enabled components) for the XCR0 Linux is about to program: where the guest's
    XSETBV does not reach KVM (nested under an emulator), EBX would otherwise stay at the
    x87/SSE-only size and Linux warns about an XSAVE size mismatch.
    """
    xsave = any(e.function == 1 and e.ecx & CPUID1_ECX_XSAVE for e in entries)
    if not xsave:
        return 0
    for e in entries:
        if e.function == 0xD and e.index == 0:
            return (e.eax | e.edx << 32) | 1
    return 0


def vendor_name(entries: Sequence[CpuidEntry]) -> str:
    """'intel', 'amd', 'hygon' or the raw vendor string, for messages."""
    ven = vendor(entries)
    return {VENDOR_INTEL: "intel", VENDOR_AMD: "amd", VENDOR_HYGON: "hygon"}.get(ven, ven)
