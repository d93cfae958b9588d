"""CPU topology as code: NUMA nodes, LLCs, cores, SMT threads.

The single source of truth for topology math. The VMM encodes it into CPUID
and ACPI tables; scenarios resolve cpuset specs against it; checks compare
what the guest saw with it.

CPU numbering: logical CPU ``i`` is the ``i``-th entry of the MADT, ordered
node-major, then LLC, core, thread. LLCs are split evenly between NUMA
nodes, so LLC ``l`` lives on node ``l // llcs_per_node``.

APIC IDs follow the x86 convention of power-of-two fields:
``apic_id = llc << (bits(cores) + bits(threads)) | core << bits(threads) | thread``
with ``bits(n) = ceil(log2(n))``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ktstr.errors import KtstrError

MAX_VCPUS = 256
"""Upper bound on vCPUs per VM: the test kernel's ``CONFIG_NR_CPUS`` (``kernels/ktstr.kconfig``)."""

MEMORY_PER_VCPU_MB = 64
MIN_GUEST_MEMORY_MB = 256
"""Guest memory floor: ``Topology.default_memory_mb`` never returns less."""

BOOT_BASE_S = 60.0
"""Boot budget of a guest with up to ``BOOT_FLAT_VCPUS`` vCPUs (the historic fixed 60 s)."""
BOOT_FLAT_VCPUS = 16
BOOT_PER_VCPU_S = 0.5
"""Extra boot budget per vCPU beyond ``BOOT_FLAT_VCPUS``: APs are brought up one after
another, and per-CPU setup (percpu areas, sched domains, sched_ext's per-CPU state) grows
with the count. Generous on purpose: a timeout that fires on a slow but healthy boot is a
false failure, and under nested emulation a vCPU costs ~0.1 s of guest uptime."""

_LABEL_RE = re.compile(r"^(\d+)n(\d+)l(\d+)c(\d+)t$")


def field_bits(count: int) -> int:
    """Bits needed for an APIC ID field holding ``count`` values: ceil(log2 count)."""
    return (count - 1).bit_length() if count > 1 else 0


@dataclass(frozen=True)
class CpuPlace:
    """Where one logical CPU sits in the topology."""

    cpu: int
    node: int
    llc: int
    core: int
    """Global core index (unique across LLCs)."""
    thread: int
    apic_id: int


@dataclass(frozen=True)
class Topology:
    """A machine shape: ``numa_nodes`` x ``llcs`` x ``cores_per_llc`` x ``threads_per_core``.

    ``llcs`` is the total number of last-level caches; it must be a multiple
    of ``numa_nodes``.
    """

    numa_nodes: int = 1
    llcs: int = 1
    cores_per_llc: int = 2
    threads_per_core: int = 1

    def __post_init__(self) -> None:
        for name in ("numa_nodes", "llcs", "cores_per_llc", "threads_per_core"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KtstrError(f"topology: {name} must be a positive integer, got {value!r}")
        if self.llcs % self.numa_nodes:
            raise KtstrError(
                f"topology {self.label}: llcs ({self.llcs}) must be a multiple of "
                f"numa_nodes ({self.numa_nodes})"
            )
        if self.nr_cpus > MAX_VCPUS:
            raise KtstrError(
                f"topology {self.label}: {self.nr_cpus} vCPUs exceeds the maximum of {MAX_VCPUS}"
            )

    @classmethod
    def parse(cls, text: str) -> Topology:
        """A label like ``1n2l4c2t`` or a preset name like ``tiny-2llc``."""
        text = text.strip()
        named = PRESETS.get(text) or EXTRA_NAMES.get(text)
        if named is not None:
            return named
        match = _LABEL_RE.match(text)
        if not match:
            raise KtstrError(
                f"topology {text!r}: expected a label like 1n2l4c2t "
                f"(nodes, llcs, cores per llc, threads per core) or a preset "
                f"({', '.join(sorted(PRESETS))})"
            )
        return cls(*(int(g) for g in match.groups()))

    @property
    def label(self) -> str:
        return f"{self.numa_nodes}n{self.llcs}l{self.cores_per_llc}c{self.threads_per_core}t"

    def __str__(self) -> str:
        return self.label

    @property
    def nr_cpus(self) -> int:
        return self.llcs * self.cores_per_llc * self.threads_per_core

    @property
    def nr_cores(self) -> int:
        return self.llcs * self.cores_per_llc

    @property
    def llcs_per_node(self) -> int:
        return self.llcs // self.numa_nodes

    @property
    def cpus_per_llc(self) -> int:
        return self.cores_per_llc * self.threads_per_core

    @property
    def cpus_per_node(self) -> int:
        return self.llcs_per_node * self.cpus_per_llc

    @property
    def thread_bits(self) -> int:
        return field_bits(self.threads_per_core)

    @property
    def core_bits(self) -> int:
        return field_bits(self.cores_per_llc)

    @property
    def llc_shift(self) -> int:
        """APIC ID bit where the LLC field starts (also the LLC-sharing shift for CPUID 0x4)."""
        return self.core_bits + self.thread_bits

    def apic_id(self, llc: int, core_in_llc: int, thread: int) -> int:
        return (llc << self.llc_shift) | (core_in_llc << self.thread_bits) | thread

    @property
    def max_apic_id(self) -> int:
        return self.apic_id(self.llcs - 1, self.cores_per_llc - 1, self.threads_per_core - 1)

    @cached_property
    def places(self) -> tuple[CpuPlace, ...]:
        out: list[CpuPlace] = []
        for llc in range(self.llcs):
            for core in range(self.cores_per_llc):
                for thread in range(self.threads_per_core):
                    out.append(
                        CpuPlace(
                            cpu=len(out),
                            node=llc // self.llcs_per_node,
                            llc=llc,
                            core=llc * self.cores_per_llc + core,
                            thread=thread,
                            apic_id=self.apic_id(llc, core, thread),
                        )
                    )
        return tuple(out)

    def place(self, cpu: int) -> CpuPlace:
        if not 0 <= cpu < self.nr_cpus:
            raise KtstrError(f"topology {self.label}: no CPU {cpu} (it has {self.nr_cpus})")
        return self.places[cpu]

    def cpus_in_llc(self, llc: int) -> list[int]:
        self._check_index("llc", llc, self.llcs)
        start = llc * self.cpus_per_llc
        return list(range(start, start + self.cpus_per_llc))

    def cpus_in_node(self, node: int) -> list[int]:
        self._check_index("numa node", node, self.numa_nodes)
        start = node * self.cpus_per_node
        return list(range(start, start + self.cpus_per_node))

    def llcs_in_node(self, node: int) -> list[int]:
        self._check_index("numa node", node, self.numa_nodes)
        start = node * self.llcs_per_node
        return list(range(start, start + self.llcs_per_node))

    def siblings(self, cpu: int) -> list[int]:
        """SMT siblings of ``cpu``, itself included."""
        first = cpu - self.place(cpu).thread
        return list(range(first, first + self.threads_per_core))

    def node_memory_mb(self, memory_mb: int) -> list[int]:
        """Split guest memory evenly across nodes; it must divide exactly."""
        if memory_mb % self.numa_nodes:
            raise KtstrError(
                f"memory {memory_mb} MB does not divide evenly across "
                f"{self.numa_nodes} NUMA nodes; use a multiple of {self.numa_nodes}"
            )
        return [memory_mb // self.numa_nodes] * self.numa_nodes

    def default_memory_mb(self, requested: int | None = None) -> int:
        """Guest memory in MB: ``max(64 MB x vCPUs, 256 MB, requested)``.

        The one place this default lives. Rounded up to a multiple of ``numa_nodes`` so
        that ``node_memory_mb`` accepts it (a no-op for the presets: their vCPU counts are
        multiples of their node counts).
        """
        want = max(MEMORY_PER_VCPU_MB * self.nr_cpus, MIN_GUEST_MEMORY_MB, requested or 0)
        return -(-want // self.numa_nodes) * self.numa_nodes

    def kvm_limits_error(self, max_vcpus: int, max_vcpu_id: int) -> str | None:
        """Why this host's KVM cannot create these vCPUs, or ``None``.

        ``max_vcpus`` is ``KVM_CHECK_EXTENSION(KVM_CAP_MAX_VCPUS)``, ``max_vcpu_id`` is
        ``KVM_CAP_MAX_VCPU_ID`` (vCPU ids, which are the APIC IDs, must be below it; 0
        means the capability is missing, and then the limit is ``max_vcpus``). Checked
        before creating vCPUs so that a too-large topology fails with its reason rather
        than an EINVAL from KVM_CREATE_VCPU halfway through.
        """
        id_limit = max_vcpu_id or max_vcpus
        if self.nr_cpus > max_vcpus:
            return (
                f"topology {self.label} has {self.nr_cpus} vCPUs but this host's KVM allows "
                f"{max_vcpus} per VM (KVM_CAP_MAX_VCPUS); use a smaller topology"
            )
        if self.max_apic_id >= id_limit:
            return (
                f"topology {self.label} needs APIC ID {self.max_apic_id} but this host's KVM "
                f"accepts vCPU ids below {id_limit} (KVM_CAP_MAX_VCPU_ID); use a topology "
                "with power-of-two cores per LLC (denser APIC IDs) or fewer LLCs"
            )
        return None

    def _check_index(self, what: str, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise KtstrError(f"topology {self.label}: no {what} {index} (it has {count})")


def boot_budget_s(topology: Topology) -> float:
    """Seconds a guest of this size may take to boot to its init (vCPU-scaled).

    ``BOOT_BASE_S`` up to ``BOOT_FLAT_VCPUS`` vCPUs, then ``BOOT_PER_VCPU_S`` per extra vCPU:
    16 vCPUs -> 60 s, 64 -> 84 s, 128 -> 116 s, 252 -> 178 s. Use it wherever a fixed boot
    allowance stands today (the VM runner's and ``ktstr boot``'s 60 s defaults).
    """
    return BOOT_BASE_S + BOOT_PER_VCPU_S * max(0, topology.nr_cpus - BOOT_FLAT_VCPUS)


def run_timeout_s(topology: Topology, duration_s: float) -> float:
    """Hard timeout of one test VM: twice the scenario's duration plus the boot budget.

    The same shape as the test runner's ``duration * 2 + BOOT_ALLOWANCE_S``, with the boot
    part scaled by ``boot_budget_s``.
    """
    return 2 * duration_s + boot_budget_s(topology)


def _preset(label: str) -> Topology:
    return Topology(*(int(g) for g in _LABEL_RE.match(label).groups()))  # type: ignore[union-attr]


@dataclass(frozen=True)
class Preset:
    """A named topology the gauntlet runs, with what it is for."""

    name: str
    topology: Topology
    description: str


PRESET_TABLE: tuple[Preset, ...] = tuple(
    Preset(name, _preset(label), description)
    for name, label, description in (
        ("tiny-1llc", "1n1l4c1t", "4 cores sharing one LLC: the smallest useful machine"),
        ("tiny-2llc", "1n2l2c1t", "two LLCs of 2 cores: the smallest cross-LLC case"),
        ("smt-1llc", "1n1l2c2t", "2 SMT cores on one LLC: sibling placement only"),
        ("numa2-2llc", "2n2l2c1t", "two NUMA nodes of one 2-core LLC: the smallest NUMA case"),
        ("smt-2llc", "1n2l2c2t", "two LLCs of 2 SMT cores"),
        ("odd-3llc", "1n3l3c1t", "three LLCs of 3 cores: non-power-of-two counts everywhere"),
        ("odd-7llc", "1n7l2c1t", "seven small LLCs: many LLC domains, odd count"),
        ("odd-5llc", "1n5l3c1t", "five LLCs of 3 cores: APIC ID gaps from the 3-core field"),
        ("medium-4llc", "1n4l4c1t", "four LLCs of 4 cores"),
        ("medium-4llc-smt", "1n4l2c2t", "four LLCs of 2 SMT cores"),
        ("wide-1llc", "1n1l16c1t", "16 cores on one LLC: one big LLC domain"),
        ("numa2-4llc", "2n4l2c2t", "two nodes of two SMT LLCs"),
        ("numa4-4llc", "4n4l4c1t", "four nodes of one 4-core LLC each"),
        ("numa4-8llc", "4n8l2c1t", "four nodes of two 2-core LLCs"),
        ("numa2-8llc", "2n8l2c2t", "two nodes of four SMT LLCs"),
        ("large-numa2", "2n8l4c1t", "two nodes of four 4-core LLCs"),
        ("numa2-wide-smt", "2n2l8c2t", "two nodes of one 8-core SMT LLC each: wide LLCs"),
        ("numa4-32cpu", "4n8l4c1t", "four nodes of two 4-core LLCs"),
        ("large-8llc", "1n8l4c2t", "eight LLCs of 4 SMT cores, 64 CPUs"),
        ("max-64cpu", "4n8l4c2t", "four nodes of two 4-core SMT LLCs, 64 CPUs"),
        ("wide-4llc-smt", "1n4l16c2t", "four LLCs of 16 SMT cores, 128 CPUs: very wide LLCs"),
        ("large-128cpu", "1n8l8c2t", "eight LLCs of 8 SMT cores, 128 CPUs"),
        ("numa4-192cpu", "4n12l8c2t", "four nodes of three 8-core SMT LLCs, 192 CPUs"),
        ("huge-15llc", "1n15l8c2t", "fifteen LLCs of 8 SMT cores, 240 CPUs (APIC IDs < 255)"),
        ("max-cpu", "1n14l9c2t", "fourteen LLCs of 9 SMT cores, 252 CPUs, APIC IDs up to 433"),
    )
)
"""The gauntlet's shapes: 25 presets from 4 to 252 vCPUs, up to 4 NUMA nodes, in vCPU order
(ties: fewer nodes first). ``max-cpu`` is the one whose APIC IDs need x2APIC."""

PRESETS: dict[str, Topology] = {p.name: p.topology for p in PRESET_TABLE}
"""Preset name -> topology, the set the gauntlet crosses tests with."""

EXTRA_NAMES: dict[str, Topology] = {"min-2cpu": _preset("1n1l2c1t")}
"""Names ``Topology.parse`` accepts that are not gauntlet presets (below its 4-vCPU floor)."""
