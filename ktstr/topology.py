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
"""Upper bound on vCPUs per VM (x2APIC IDs stay addressable; KVM's usual limit)."""

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
        if text in PRESETS:
            return PRESETS[text]
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

    def _check_index(self, what: str, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise KtstrError(f"topology {self.label}: no {what} {index} (it has {count})")


def _preset(label: str) -> Topology:
    return Topology(*(int(g) for g in _LABEL_RE.match(label).groups()))  # type: ignore[union-attr]


PRESETS: dict[str, Topology] = {
    name: _preset(label)
    for name, label in {
        "min-2cpu": "1n1l2c1t",
        "tiny-1llc": "1n1l4c1t",
        "tiny-2llc": "1n2l2c1t",
        "smt-1llc": "1n1l2c2t",
        "smt-2llc": "1n2l2c2t",
        "odd-3llc": "1n3l3c1t",
        "odd-5llc": "1n5l3c1t",
        "medium-4llc": "1n4l4c1t",
        "medium-4llc-smt": "1n4l2c2t",
        "wide-1llc": "1n1l16c1t",
        "numa2-2llc": "2n2l2c1t",
        "numa2-4llc": "2n4l2c2t",
        "numa2-8llc": "2n8l2c2t",
        "numa4-4llc": "4n4l4c1t",
        "numa4-8llc": "4n8l2c1t",
        "large-8llc": "1n8l4c2t",
        "large-numa2": "2n8l4c1t",
        "max-64cpu": "4n8l4c2t",
    }.items()
}
"""Named shapes from 2 to 64 vCPUs, for tests and gauntlets."""
