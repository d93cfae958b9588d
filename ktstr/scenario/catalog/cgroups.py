"""Scenarios about cgroups themselves: weights, bandwidth, idle groups, uclamp, memory
limits, freezing, nesting, and load that is uneven across cgroups, LLCs and cpusets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ktstr.checks import Checks
from ktstr.scenario.catalog.base import DYNAMIC, Params, Scenario, one
from ktstr.scenario.controls import CgroupControls, CpuMax
from ktstr.scenario.model import (
    AddCgroup,
    CaptureCgroupProcs,
    CgroupDef,
    CpusetSpec,
    FreezeCgroup,
    RemoveCgroup,
    SchedPolicy,
    SetControls,
    Spawn,
    Step,
    StopCgroup,
    UnfreezeCgroup,
)
from ktstr.scenario.work import CachePressure, CpuSpin

_SHARES = {"fairness_spread_pct": 25.0}
"""Weighted siblings share CPUs unevenly on purpose; spread is judged loosely within each."""


WORKERS_PER_CPU = 2
"""Workers of each weighted cgroup per CPU (:func:`_weighted`)."""


def _weight_controls(weight: int, nice: bool) -> CgroupControls:
    return CgroupControls(weight_nice=weight) if nice else CgroupControls(weight=weight)


def _weighted_checks(*weights: int, nice: bool = False, share_pct: float) -> dict[str, Any]:
    """Checks of :func:`_weighted` siblings. The lightest one's workers get a small share
    of a CPU by design (weight 50 of 750 gives each 3.3 %), below the starvation check's
    10 %: a worker is starved when it gets under half of what its weight is owed."""
    cpu = [_weight_controls(w, nice).effective_weight for w in weights]
    owed_pct = 100.0 * min(cpu) / sum(cpu) / WORKERS_PER_CPU
    return {**_SHARES, "weight_share_pct": share_pct,
            "starvation_cpu_pct": min(Checks().starvation_cpu_pct, owed_pct / 2)}


def _weighted(*weights: int, nice: bool = False) -> Callable[[Params], list[Step]]:
    def build(p: Params) -> list[Step]:
        return one(*(
            CgroupDef(f"w{i}", workers=WORKERS_PER_CPU * p.w, controls=_weight_controls(w, nice))
            for i, w in enumerate(weights)
        ))
    return build


def _weight_change(p: Params) -> list[Step]:
    return [
        Step((AddCgroup(CgroupDef("a", workers=2 * p.w)),
              AddCgroup(CgroupDef("b", workers=2 * p.w))), hold=0.5),
        Step((SetControls("a", CgroupControls(weight=400)),), hold=0.5),
    ]


def _bandwidth_half(p: Params) -> list[Step]:
    return one(CgroupDef("capped", workers=p.w,
                         controls=CgroupControls(cpu_max=CpuMax.cpus(0.5))))


def _bandwidth_beside_free(p: Params) -> list[Step]:
    limit = max(0.25, p.n / 4)
    capped = CgroupControls(cpu_max=CpuMax.cpus(limit))
    return one(CgroupDef("capped", workers=p.w, controls=capped), CgroupDef("free", workers=p.w))


def _idle_group(p: Params) -> list[Step]:
    # The normal cgroup leaves half the CPUs free; the idle one may only soak those up.
    return one(CgroupDef("normal", workers=max(1, p.n // 2)),
               CgroupDef("idle", workers=p.n, controls=CgroupControls(idle=True)))


def _uclamp(p: Params) -> list[Step]:
    return one(CgroupDef("boosted", workers=p.w,
                         controls=CgroupControls(uclamp_min=50.0, uclamp_max=100.0)),
               CgroupDef("capped", workers=p.w,
                         controls=CgroupControls(uclamp_min=0.0, uclamp_max=20.0)))


def _memory_max(p: Params) -> list[Step]:
    return one(CgroupDef("limited", workers=p.w, work=CachePressure(size_kb=4096),
                         controls=CgroupControls(memory_max=256 << 20)))


def _llc_imbalance(p: Params) -> list[Step]:
    return one(CgroupDef("heavy", workers=3 * p.w), CgroupDef("light", workers=max(1, p.w // 2)))


def _cpuset_overlap_imbalance(p: Params) -> list[Step]:
    return one(CgroupDef("a", CpusetSpec.overlap(0, 2, 0.5), workers=2 * p.w),
               CgroupDef("b", CpusetSpec.overlap(1, 2, 0.5), workers=max(1, p.w // 2)))


def _load_oscillation(p: Params) -> list[Step]:
    steps = [Step((AddCgroup(CgroupDef("base", workers=p.w)),
                   AddCgroup(CgroupDef("burst", workers=0))), hold=0.2)]
    for _ in range(2):
        steps += [Step((Spawn("burst", 2 * p.w),), hold=0.2),
                  Step((StopCgroup("burst"),), hold=0.2)]
    return steps


def _uneven_cgroups(p: Params) -> list[Step]:
    return one(CgroupDef("single", workers=1), CgroupDef("crowd", workers=3 * p.w))


def _churn_add_remove(p: Params) -> list[Step]:
    steps = [Step((AddCgroup(CgroupDef("base", workers=p.w)),), hold=0.2)]
    for i in range(3):
        steps += [Step((AddCgroup(CgroupDef(f"tmp{i}", workers=p.w)),), hold=0.15),
                  Step((RemoveCgroup(f"tmp{i}"),), hold=0.12)]
    return steps


def _freeze_thaw(p: Params) -> list[Step]:
    return [
        Step((AddCgroup(CgroupDef("steady", workers=p.w)),
              AddCgroup(CgroupDef("frozen", workers=p.w))), hold=0.3),
        Step((FreezeCgroup("frozen"), CaptureCgroupProcs("frozen")), hold=0.35),
        Step((UnfreezeCgroup("frozen"),), hold=0.35),
    ]


def _nested_weights(p: Params) -> list[Step]:
    return one(CgroupDef("outer", workers=0, children=(
        CgroupDef("big", workers=2 * p.w, controls=CgroupControls(weight=300)),
        CgroupDef("small", workers=2 * p.w, controls=CgroupControls(weight=100)),
    )))


def _nested_deep(p: Params) -> list[Step]:
    leaf = max(1, p.w // 2)
    return one(CgroupDef("l1", workers=0, children=(
        CgroupDef("l2a", workers=leaf, children=(CgroupDef("l3", workers=leaf),)),
        CgroupDef("l2b", workers=leaf),
    )))


def _cpuset_overlap(p: Params) -> list[Step]:
    return one(CgroupDef("a", CpusetSpec.overlap(0, 2, 0.5), workers=p.w),
               CgroupDef("b", CpusetSpec.overlap(1, 2, 0.5), workers=p.w))


def _cpuset_single_cpu(p: Params) -> list[Step]:
    return one(*(CgroupDef(f"cpu{c}", CpusetSpec.exact([c]), workers=2)
                 for c in range(min(p.n, 8))))


def _idle_policy_mix(p: Params) -> list[Step]:
    return one(CgroupDef("normal", workers=max(1, p.n // 2), work=CpuSpin()),
               CgroupDef("idle_policy", workers=p.n, policy=SchedPolicy.idle()))


ENTRIES = [
    Scenario("cgroup_weight_2to1", "advanced", "two saturated sibling cgroups, cpu.weight "
             "200:100: CPU time 2:1", _weighted(200, 100),
             _weighted_checks(200, 100, share_pct=20.0)),
    Scenario("cgroup_weight_tiers", "advanced", "four saturated cgroups weighted "
             "50/100/200/400", _weighted(50, 100, 200, 400),
             _weighted_checks(50, 100, 200, 400, share_pct=45.0)),
    Scenario("cgroup_nice_weights", "advanced", "cpu.weight.nice -5 beside +5 (about 10:1)",
             _weighted(-5, 5, nice=True), _weighted_checks(-5, 5, nice=True, share_pct=50.0)),
    Scenario("cgroup_weight_change_midrun", "advanced", "equal cgroups, then one weighted "
             "x4 mid-run", _weight_change, _SHARES),
    Scenario("cgroup_bandwidth_half", "advanced", "cpu.max of half a CPU on a cgroup that "
             "wants all of them", _bandwidth_half,
             {"bandwidth_pct": 10.0, "starvation": False, "max_gap_ms": None}),
    Scenario("cgroup_bandwidth_beside_free", "advanced", "a cgroup capped at a quarter of the "
             "CPUs beside an unlimited one", _bandwidth_beside_free,
             {"bandwidth_pct": 10.0, "starvation": False, "max_gap_ms": None}),
    Scenario("cgroup_idle_group", "advanced", "a cpu.idle cgroup soaks up the CPUs a normal "
             "one leaves", _idle_group, {"fairness_spread_pct": None}),
    Scenario("cgroup_uclamp", "advanced", "cgroups with cpu.uclamp.min 50 and uclamp.max 20",
             _uclamp),
    Scenario("cgroup_memory_max", "advanced", "cache-pressure workers under memory.max 256 MB",
             _memory_max),
    Scenario("llc_imbalance", "advanced", "three workers per CPU in one cgroup, a few in "
             "another", _llc_imbalance),
    Scenario("cpuset_overlap_imbalance", "advanced", "overlapping cpusets with 4:1 worker "
             "counts", _cpuset_overlap_imbalance, DYNAMIC),
    Scenario("load_oscillation", "advanced", "a burst cgroup's workers come and go twice",
             _load_oscillation, DYNAMIC),
    Scenario("uneven_cgroups", "advanced", "one lone worker beside three per CPU",
             _uneven_cgroups),
    Scenario("cgroup_churn_add_remove", "dynamic", "three short-lived cgroups added and "
             "removed beside a steady one", _churn_add_remove, DYNAMIC),
    Scenario("cgroup_freeze_thaw", "dynamic", "a cgroup frozen for a third of the run, then "
             "thawed: it resumes", _freeze_thaw),
    Scenario("nested_weights", "nested", "children weighted 300:100 inside one parent",
             _nested_weights, {**_SHARES, "weight_share_pct": 35.0}),
    Scenario("nested_deep", "nested", "three levels of cgroups with workers at each",
             _nested_deep),
    Scenario("cpuset_overlap", "cpuset", "two cgroups whose cpusets overlap by half",
             _cpuset_overlap, DYNAMIC),
    Scenario("cpuset_single_cpu", "cpuset", "one cgroup per CPU, each confined to it",
             _cpuset_single_cpu),
    Scenario("idle_policy_mix", "sched_class", "SCHED_IDLE workers beside normal ones that "
             "leave CPUs free", _idle_policy_mix, {"fairness_spread_pct": None}),
]
