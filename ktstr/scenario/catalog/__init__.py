"""Named scenarios that scale to the topology they are given.

Each entry builds its steps from :class:`Params` (topology, workers per cgroup); ``n``
below is the number of CPUs. Worker counts that must be even (pairs) or divide the CPUs
evenly (pinning) are chosen so a correct scheduler passes the default checks. The entries
live in themed modules; this package is their one registry.
"""

from __future__ import annotations

from ktstr.errors import KtstrError
from ktstr.scenario.catalog import cgroups, core, performance, workloads
from ktstr.scenario.catalog.base import CATEGORIES, Params, Scenario
from ktstr.scenario.model import (
    AddCgroup,
    Affinity,
    CaptureCgroupProcs,
    ClearCpuset,
    CpusetSpec,
    FreezeCgroup,
    KillPayload,
    MoveAllTasks,
    RemoveCgroup,
    RunPayload,
    SetAffinity,
    SetControls,
    SetCpuset,
    Step,
    SwapCpusets,
    UnfreezeCgroup,
    WaitPayload,
)
from ktstr.topology import Topology

__all__ = ["CATALOG", "CATEGORIES", "Params", "Scenario", "default_names", "get", "validate"]

_ENTRIES: list[Scenario] = [*core.ENTRIES, *cgroups.ENTRIES, *workloads.ENTRIES,
                            *performance.ENTRIES]

CATALOG: dict[str, Scenario] = {s.name: s for s in _ENTRIES}


def get(name: str) -> Scenario:
    try:
        return CATALOG[name]
    except KeyError:
        raise KtstrError(
            f"no scenario named {name!r}; `ktstr list` shows the {len(CATALOG)} scenarios"
        ) from None


def default_names() -> list[str]:
    return [s.name for s in _ENTRIES if s.in_default_run]


def validate(steps: list[Step], topology: Topology) -> None:
    """Walk ``steps`` without running them: every op names a live cgroup and every
    cpuset/affinity resolves on ``topology`` (raises KtstrError otherwise)."""
    import os.path
    import random

    from ktstr.scenario.cpuset import resolve_affinity, resolve_cpuset

    specs: dict[str, CpusetSpec | None] = {}
    affs: dict[str, Affinity] = {}
    payloads: set[str] = set()

    def resolve() -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for name in sorted(specs, key=lambda n: n.count("/")):
            parent = os.path.dirname(name)
            base = out[parent] if parent else tuple(range(topology.nr_cpus))
            spec = specs[name]
            out[name] = base if spec is None else resolve_cpuset(spec, topology, base)
        for name, aff in affs.items():
            resolve_affinity(aff, topology, out[name], 0, random.Random(0))
        return out

    def need(name: str) -> str:
        if name not in specs:
            raise KtstrError(f"no cgroup {name!r} at this point of the scenario")
        return name

    for step in steps:
        for op in step.ops:
            if isinstance(op, AddCgroup):
                for full, d in op.cgroup.flatten(op.parent):
                    specs[full] = d.cpuset
                    affs[full] = d.affinity
                    d.work.check_workers(d.worker_count(topology.nr_cpus))
            elif isinstance(op, RemoveCgroup):
                for n in [n for n in specs if n == need(op.name) or n.startswith(op.name + "/")]:
                    del specs[n]
                    del affs[n]
            elif isinstance(op, SetCpuset):
                specs[need(op.name)] = op.cpuset
            elif isinstance(op, ClearCpuset):
                specs[need(op.name)] = None
            elif isinstance(op, SwapCpusets):
                specs[need(op.a)], specs[need(op.b)] = specs[op.b], specs[op.a]
            elif isinstance(op, SetAffinity):
                affs[need(op.name)] = op.affinity
            elif isinstance(op, MoveAllTasks):
                need(op.src), need(op.dst)
            elif isinstance(op, SetControls | FreezeCgroup | UnfreezeCgroup | CaptureCgroupProcs):
                need(op.name)
            elif isinstance(op, RunPayload):
                if op.cgroup is not None:
                    need(op.cgroup)
                if op.name in payloads:
                    raise KtstrError(f"payload {op.name!r} is already running at this point")
                if not op.wait:
                    payloads.add(op.name)
            elif isinstance(op, WaitPayload | KillPayload):
                if op.label not in payloads:
                    raise KtstrError(f"no running payload {op.label!r} at this point")
                payloads.discard(op.label)
            resolve()
