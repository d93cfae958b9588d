"""What a catalog scenario is: a name, a category, and steps built for a topology."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ktstr.scenario.model import AddCgroup, CgroupDef, CpusetSpec, Step
from ktstr.scenario.payload import Payload
from ktstr.topology import Topology

CATEGORIES = ("basic", "cpuset", "stress", "affinity", "sched_class", "advanced", "stall",
              "dynamic", "nested", "interaction", "performance")
"""Every scenario is in one of these (``advanced``: imbalance and cgroup-control cases)."""


@dataclass(frozen=True)
class Params:
    topology: Topology
    workers: int | None = None
    """Workers per cgroup (None: one per CPU)."""

    @property
    def n(self) -> int:
        return self.topology.nr_cpus

    @property
    def w(self) -> int:
        return self.workers if self.workers else self.n

    @property
    def halves(self) -> tuple[CpusetSpec | None, CpusetSpec | None]:
        """Two disjoint cpusets when there are at least two CPUs, else no cpuset."""
        if self.n >= 2:
            return CpusetSpec.disjoint(0, 2), CpusetSpec.disjoint(1, 2)
        return None, None


@dataclass(frozen=True)
class Scenario:
    name: str
    category: str
    description: str
    build: Callable[[Params], list[Step]]
    checks: Mapping[str, Any] = field(default_factory=dict)
    """Threshold overrides for this scenario (see ktstr.checks.Checks)."""
    in_default_run: bool = True
    """False for scenarios that are expected to fail a check (negative tests)."""
    payloads: tuple[Payload, ...] = ()
    """Programs its RunPayload steps run (a VM packs them; a host must have them)."""

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"scenario {self.name}: category {self.category!r} is not one of "
                             f"{', '.join(CATEGORIES)}")

    def steps(self, params: Params) -> list[Step]:
        return self.build(params)


def one(*defs: CgroupDef) -> list[Step]:
    return [Step(ops=tuple(AddCgroup(d) for d in defs))]


def even(k: int) -> int:
    return max(2, k + (k % 2))




DYNAMIC = {"fairness_spread_pct": 25.0}
"""Dynamic scenarios compare workers whose cpusets changed mid-run: a looser spread."""
