"""The gauntlet: every test x topology preset x scheduler flag profile, within a budget.

:func:`expand` builds the full cross product, dropping variants that break a
test's constraints (too few CPUs, no SMT, ...) or exceed the host's capacity.
:func:`select` then picks, greedily, the variant that adds the most new
*coverage* per estimated second until the budget is spent. Coverage is the
set of distinct (scheduler, topology class, flag profile) triples; once those
are all covered, distinct (test, scheduler, topology class, profile) tuples
break ties, so spare budget spreads across tests rather than repeating one.
Everything here is pure: the host capacity is passed in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ktstr.errors import KtstrError
from ktstr.scheduler import Scheduler
from ktstr.topology import PRESETS, Topology

BOOT_COST_S = 8.0
"""Estimated fixed cost of one VM test (VM start, boot, scheduler attach, teardown)."""
PER_CPU_COST_S = 0.4
"""Estimated extra seconds per guest vCPU (boot and teardown scale with CPUs)."""
VCPU_OVERCOMMIT = 8
"""Guest vCPUs allowed per host CPU; beyond it timing checks turn meaningless."""
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
    memory_mb: int = 512
    constraints: Constraints = field(default_factory=Constraints)
    scheduler: str | None = None
    """Set when the test pins its own scheduler: it runs only under that one."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GauntletTest:
        return cls(
            name=str(data["name"]),
            duration_s=float(data.get("duration_s", 2.0)),
            memory_mb=int(data.get("memory_mb", 512)),
            constraints=Constraints(**(data.get("constraints") or {})),
            scheduler=data.get("scheduler"),
        )


@dataclass(frozen=True)
class HostCapacity:
    cpus: int
    memory_mb: int

    @classmethod
    def detect(cls) -> HostCapacity:
        mem_kb = 0
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
        except OSError:
            pass
        return cls(cpus=os.cpu_count() or 1, memory_mb=mem_kb // 1024)

    def allows(self, topo: Topology, memory_mb: int) -> str | None:
        if topo.nr_cpus > self.cpus * VCPU_OVERCOMMIT:
            return f"{topo.nr_cpus} vCPUs > {VCPU_OVERCOMMIT} x {self.cpus} host CPUs"
        if memory_mb > self.memory_mb // 2:
            return f"{memory_mb} MB guest > half of the host's {self.memory_mb} MB"
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
    test: str
    scheduler: str
    profile: str
    preset: str
    topology: str
    cost_s: float

    @property
    def id(self) -> str:
        return f"{self.scheduler}@{self.profile}-{self.preset}"

    @property
    def topo_class(self) -> str:
        return topology_class(Topology.parse(self.topology))

    def coverage(self) -> tuple[str, str, str]:
        return (self.scheduler, self.topo_class, self.profile)

    def detail(self) -> tuple[str, str, str, str]:
        return (self.test, *self.coverage())


def expand(
    tests: Sequence[GauntletTest],
    schedulers: Sequence[Scheduler],
    host: HostCapacity,
    presets: Mapping[str, Topology] = PRESETS,
    sched_ext: bool = True,
) -> list[Variant]:
    """The full cross product, minus what constraints, capacity or the kernel rule out."""
    out: list[Variant] = []
    for test in tests:
        for sched in schedulers:
            if test.scheduler is not None and test.scheduler != sched.name:
                continue
            if sched.sched_ext and not sched_ext:
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
                        )
                    )
    return out


def select(variants: Iterable[Variant], budget_s: float | None) -> list[Variant]:
    """Greedy budgeted selection: most new coverage per estimated second first.

    Deterministic: ties go to the cheaper variant, then by name. ``None``
    budget keeps everything.
    """
    pool = sorted(set(variants), key=lambda v: (v.cost_s, v.test, v.id))
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


def coverage_of(variants: Iterable[Variant]) -> set[tuple[str, str, str]]:
    return {v.coverage() for v in variants}


def write_plan(variants: Sequence[Variant], path: Path) -> None:
    path.write_text(json.dumps([asdict(v) for v in variants], indent=1) + "\n")


def read_plan(path: Path) -> list[Variant]:
    try:
        rows = json.loads(path.read_text())
        return [Variant(**row) for row in rows]
    except (OSError, ValueError, TypeError) as err:
        raise KtstrError(f"gauntlet plan {path}: unreadable ({err}); regenerate it") from err
