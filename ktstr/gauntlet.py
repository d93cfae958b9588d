"""The gauntlet: every kernel x test x topology preset x scheduler flag profile, within a budget.

:func:`expand` builds the full cross product, dropping variants that break a
test's constraints (too few CPUs, no SMT, ...) or exceed the host's capacity
(:meth:`HostCapacity.allows`). :func:`select` then picks, greedily, the
variant that adds the most new *coverage* per estimated second until the
budget is spent. Coverage is the set of distinct (kernel, scheduler, topology
class, flag profile) tuples; once those are all covered, distinct tuples that
also name the test break ties, so spare budget spreads across tests rather
than repeating one.

At fleet scale the selected plan is split with ``--shard I/N``
(:class:`Shard`): cell ``c`` belongs to shard ``sha256(c.cell_id) mod N + 1``.
The assignment depends on nothing but the cell's own id, so it is the same
whatever order cells come in, and adding or dropping a test moves no other
cell between shards. Every machine of a fleet computes the same plan (same
specs, budget and host class) and keeps its share; the shards together run
each cell exactly once. Everything here is pure: the host capacity is passed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ktstr.errors import KtstrError
from ktstr.meminfo import host_memory_mb
from ktstr.scheduler import Scheduler
from ktstr.topology import PRESETS, Topology
from ktstr.vmm.x86.cpuid import APIC_ID_REACH_8BIT

BOOT_COST_S = 8.0
"""Estimated fixed cost of one VM test (VM start, boot, scheduler attach, teardown)."""
PER_CPU_COST_S = 0.4
"""Estimated extra seconds per guest vCPU (boot and teardown scale with CPUs)."""
VCPU_OVERCOMMIT = 8
"""Guest vCPUs allowed per host CPU; beyond it timing checks turn meaningless."""
HOST_MEMORY_SHARE = 2
"""A guest may take at most 1/HOST_MEMORY_SHARE of the host's RAM."""
SECONDARY_WEIGHT = 1e-3


@dataclass(frozen=True)
class Constraints:
    """What topologies a test can run on (declared on ``@ktstr_test``)."""

    min_cpus: int = 1
    max_cpus: int | None = None
    min_llcs: int = 1
    min_numa_nodes: int = 1
    requires_smt: bool = False
    sched_ext_only: bool = False

    def allows(self, topo: Topology) -> str | None:
        """``None`` when ``topo`` fits, else why not."""
        if topo.nr_cpus < self.min_cpus:
            return f"needs >= {self.min_cpus} CPUs"
        if self.max_cpus is not None and topo.nr_cpus > self.max_cpus:
            return f"needs <= {self.max_cpus} CPUs"
        if topo.llcs < self.min_llcs:
            return f"needs >= {self.min_llcs} LLCs"
        if topo.numa_nodes < self.min_numa_nodes:
            return f"needs >= {self.min_numa_nodes} NUMA nodes"
        if self.requires_smt and topo.threads_per_core < 2:
            return "needs SMT"
        return None


@dataclass(frozen=True)
class GauntletTest:
    """One suite test as the gauntlet sees it (from the plugin's collection dump)."""

    name: str
    duration_s: float = 2.0
    memory_mb: int | None = None
    """The test's request; None: the topology's default (``Topology.default_memory_mb``)."""
    constraints: Constraints = field(default_factory=Constraints)
    scheduler: str | None = None
    """Set when the test pins its own scheduler: it runs only under that one."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GauntletTest:
        return cls(
            name=str(data["name"]),
            duration_s=float(data.get("duration_s", 2.0)),
            memory_mb=None if data.get("memory_mb") is None else int(data["memory_mb"]),
            constraints=Constraints(**(data.get("constraints") or {})),
            scheduler=data.get("scheduler"),
        )


@dataclass(frozen=True)
class HostCapacity:
    """What one host can run. A preset fits when all three hold:

    - vCPUs <= ``VCPU_OVERCOMMIT`` x host CPUs;
    - the guest's memory, ``Topology.default_memory_mb(test's request)`` (64 MB per vCPU,
      256 MB floor), <= host RAM / ``HOST_MEMORY_SHARE``;
    - the topology's highest APIC ID <= ``apic_id_reach``: the highest ID a Linux guest
      brings online on this VMM (``cpuid.guest_apic_id_reach``; 255 with KVM's in-kernel
      IOAPIC), so e.g. max-cpu (APIC IDs up to 433) is left out rather than booted with
      108 of its CPUs offline.
    """

    cpus: int
    memory_mb: int
    apic_id_reach: int = APIC_ID_REACH_8BIT

    @classmethod
    def detect(cls) -> HostCapacity:
        return cls(cpus=os.cpu_count() or 1, memory_mb=host_memory_mb())

    def allows(self, topo: Topology, memory_mb: int | None) -> str | None:
        """``None`` when ``topo`` (with the test's requested memory) fits, else why not."""
        if topo.nr_cpus > self.cpus * VCPU_OVERCOMMIT:
            return f"{topo.nr_cpus} vCPUs > {VCPU_OVERCOMMIT} x {self.cpus} host CPUs"
        guest = topo.default_memory_mb(memory_mb)
        if guest > self.memory_mb // HOST_MEMORY_SHARE:
            return f"{guest} MB guest > 1/{HOST_MEMORY_SHARE} of the host's {self.memory_mb} MB"
        if topo.max_apic_id > self.apic_id_reach:
            return (
                f"APIC IDs up to {topo.max_apic_id} > {self.apic_id_reach}, the highest a guest "
                "brings online here"
            )
        return None


def topology_class(topo: Topology) -> str:
    """Coarse shape used for coverage: numa/multi-llc/single-llc, plus smt."""
    if topo.numa_nodes > 1:
        base = "numa"
    elif topo.llcs > 1:
        base = "multi-llc"
    else:
        base = "single-llc"
    return f"{base}+smt" if topo.threads_per_core > 1 else base


def estimate_cost(test: GauntletTest, topo: Topology) -> float:
    return BOOT_COST_S + test.duration_s + PER_CPU_COST_S * topo.nr_cpus


@dataclass(frozen=True)
class Variant:
    """One gauntlet cell: a test on one kernel, scheduler profile and preset."""

    test: str
    scheduler: str
    profile: str
    preset: str
    topology: str
    cost_s: float
    kernel: str = ""
    """Kernel id; empty when the plan is for the one kernel its run boots."""

    @property
    def id(self) -> str:
        """The pytest parameter id (the kernel is the run's, not part of it)."""
        return f"{self.scheduler}@{self.profile}-{self.preset}"

    @property
    def cell_id(self) -> str:
        """Unique across the whole gauntlet; what sharding hashes."""
        return f"{self.kernel}/{self.test}[{self.id}]"

    @property
    def topo_class(self) -> str:
        return topology_class(Topology.parse(self.topology))

    def coverage(self) -> tuple[str, ...]:
        return (self.kernel, self.scheduler, self.topo_class, self.profile)

    def detail(self) -> tuple[str, ...]:
        return (self.test, *self.coverage())


def expand(
    tests: Sequence[GauntletTest],
    schedulers: Sequence[Scheduler],
    host: HostCapacity,
    presets: Mapping[str, Topology] = PRESETS,
    sched_ext: bool = True,
    kernels: Mapping[str, bool] | None = None,
) -> list[Variant]:
    """The full cross product, minus what constraints, capacity or the kernel rule out.

    ``kernels`` maps kernel ids to whether each has sched_ext; without it the plan is
    for one unnamed kernel whose sched_ext support is ``sched_ext``.
    """
    out: list[Variant] = []
    for kernel, has_sched_ext in (kernels if kernels is not None else {"": sched_ext}).items():
        for test in tests:
            for sched in schedulers:
                if test.scheduler is not None and test.scheduler != sched.name:
                    continue
                if sched.sched_ext and not has_sched_ext:
                    continue
                if test.constraints.sched_ext_only and not sched.sched_ext:
                    continue
                for preset, topo in presets.items():
                    if test.constraints.allows(topo) or host.allows(topo, test.memory_mb):
                        continue
                    for prof in sched.profiles():
                        out.append(
                            Variant(
                                test=test.name,
                                scheduler=sched.name,
                                profile=prof.name,
                                preset=preset,
                                topology=topo.label,
                                cost_s=estimate_cost(test, topo),
                                kernel=kernel,
                            )
                        )
    return out


def select(variants: Iterable[Variant], budget_s: float | None) -> list[Variant]:
    """Greedy budgeted selection: most new coverage per estimated second first.

    Deterministic: ties go to the cheaper variant, then by name. ``None``
    budget keeps everything.
    """
    pool = sorted(set(variants), key=lambda v: (v.cost_s, v.cell_id))
    if budget_s is None:
        return pool
    if budget_s <= 0:
        raise KtstrError(f"--budget {budget_s}: give a positive number of seconds")
    covered: set[tuple[str, ...]] = set()
    chosen: list[Variant] = []
    remaining = budget_s
    while pool:
        best: Variant | None = None
        best_score = 0.0
        for v in pool:
            if v.cost_s > remaining:
                continue
            gain = (v.coverage() not in covered) + SECONDARY_WEIGHT * (v.detail() not in covered)
            score = gain / v.cost_s
            if score > best_score:
                best, best_score = v, score
        if best is None:
            break
        chosen.append(best)
        covered.update((best.coverage(), best.detail()))
        remaining -= best.cost_s
        pool.remove(best)
    return chosen


def coverage_of(variants: Iterable[Variant]) -> set[tuple[str, ...]]:
    return {v.coverage() for v in variants}


_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    """``--shard I/N``: this machine runs shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD_RE.match(text.strip())
        if not match:
            raise KtstrError(f"--shard {text!r}: expected I/N with whole numbers, e.g. 2/4")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise KtstrError(f"--shard {text}: the shard count N must be at least 1")
        if not 1 <= index <= count:
            raise KtstrError(f"--shard {text}: the shard index I must be between 1 and {count}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, variant: Variant) -> bool:
        return shard_of(variant.cell_id, self.count) == self.index


def shard_of(cell_id: str, count: int) -> int:
    """The 1-based shard of a cell: a stable hash (not Python's salted ``hash``) mod count."""
    digest = hashlib.sha256(cell_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def take_shard(variants: Iterable[Variant], shard: Shard | None) -> list[Variant]:
    """The cells of ``shard`` in their given order; everything when ``shard`` is None."""
    return [v for v in variants if shard is None or shard.owns(v)]


def parse_kernels(text: str) -> list[str]:
    """``--kernels 6.12,6.1``: ids in the given order, duplicates dropped; at least one."""
    ids = list(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    if not ids:
        raise KtstrError(f"--kernels {text!r}: give one or more kernel ids, e.g. 6.12,6.1")
    bad = [k for k in ids if "/" in k]
    if bad:
        raise KtstrError(f"--kernels: {bad[0]!r} is not a kernel id (no '/' allowed)")
    return ids


def write_plan(variants: Sequence[Variant], path: Path) -> None:
    path.write_text(json.dumps([asdict(v) for v in variants], indent=1) + "\n")


def read_plan(path: Path) -> list[Variant]:
    try:
        rows = json.loads(path.read_text())
        return [Variant(**row) for row in rows]
    except (OSError, ValueError, TypeError) as err:
        raise KtstrError(f"gauntlet plan {path}: unreadable ({err}); regenerate it") from err
