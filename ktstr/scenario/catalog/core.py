"""The first scenarios: steady load, cpusets, affinity, classes, simple interaction."""

from __future__ import annotations

from ktstr.checks import FAIRNESS_SPREAD_PCT
from ktstr.scenario.catalog.base import DYNAMIC, Params, Scenario, even, one
from ktstr.scenario.model import (
    AddCgroup,
    Affinity,
    CgroupDef,
    ClearCpuset,
    CpusetSpec,
    MoveAllTasks,
    RemoveCgroup,
    SchedPolicy,
    SetAffinity,
    SetCpuset,
    Step,
    SwapCpusets,
)
from ktstr.scenario.work import (
    AffinityChurn,
    Bursty,
    CachePressure,
    CpuSpin,
    ForkExit,
    FutexPingPong,
    IoSync,
    Mixed,
    MutexContention,
    NiceSweep,
    PipeIo,
    PolicyChurn,
    Sequence,
    Sleep,
    YieldHeavy,
)


def _steady(p: Params) -> list[Step]:
    return one(CgroupDef("cg0", workers=p.w), CgroupDef("cg1", workers=p.w))


def _steady_llc(p: Params) -> list[Step]:
    t = p.topology
    return one(*(
        CgroupDef(f"llc{i}", CpusetSpec.llc(i), workers=p.workers or t.cpus_per_llc)
        for i in range(min(t.llcs, 8))
    ))


def _oversubscribed(p: Params) -> list[Step]:
    return one(CgroupDef("cg0", workers=2 * p.w), CgroupDef("cg1", workers=2 * p.w))


def _cpuset_apply(p: Params) -> list[Step]:
    a, b = p.halves
    first = one(CgroupDef("cg0", workers=p.w), CgroupDef("cg1", workers=p.w))
    first[0] = Step(first[0].ops, hold=0.5)
    ops = tuple(SetCpuset(n, s) for n, s in (("cg0", a), ("cg1", b)) if s is not None)
    return [*first, Step(ops, hold=0.5)]


def _cpuset_clear(p: Params) -> list[Step]:
    a, b = p.halves
    return [
        Step((AddCgroup(CgroupDef("cg0", a, workers=p.w)),
              AddCgroup(CgroupDef("cg1", b, workers=p.w))), hold=0.5),
        Step((ClearCpuset("cg0"), ClearCpuset("cg1")), hold=0.5),
    ]


def _cpuset_resize(p: Params) -> list[Step]:
    return [
        Step((AddCgroup(CgroupDef("cg0", CpusetSpec.range(0, 0.5), workers=p.w)),), hold=0.34),
        Step((SetCpuset("cg0", CpusetSpec.range(0, 1)),), hold=0.33),
        Step((SetCpuset("cg0", CpusetSpec.range(0.5, 1)),), hold=0.33),
    ]


def _swap(p: Params) -> list[Step]:
    a, b = p.halves
    return [
        Step((AddCgroup(CgroupDef("cg0", a, workers=p.w)),
              AddCgroup(CgroupDef("cg1", b, workers=p.w))), hold=0.5),
        Step((SwapCpusets("cg0", "cg1"),), hold=0.5),
    ]


def _cgroup_add(p: Params) -> list[Step]:
    return [
        Step((AddCgroup(CgroupDef("cg0", workers=p.w)),), hold=0.4),
        Step((AddCgroup(CgroupDef("cg1", workers=p.w)),), hold=0.6),
    ]


def _cgroup_remove(p: Params) -> list[Step]:
    return [
        Step((AddCgroup(CgroupDef("cg0", workers=p.w)),
              AddCgroup(CgroupDef("cg1", workers=p.w))), hold=0.5),
        Step((RemoveCgroup("cg1"),), hold=0.5),
    ]


def _affinity_change(p: Params) -> list[Step]:
    return [
        Step((AddCgroup(CgroupDef("cg0", workers=p.n)),), hold=0.5),
        Step((SetAffinity("cg0", Affinity.single()),), hold=0.5),
    ]


def _affinity_pinned(p: Params) -> list[Step]:
    return one(CgroupDef("pinned", workers=p.n, affinity=Affinity.single()),
                CgroupDef("free", workers=p.w))


def _affinity_llc(p: Params) -> list[Step]:
    per = p.topology.llcs
    return one(CgroupDef("llc_aligned", workers=per * max(1, p.w // per),
                          affinity=Affinity.llc_aligned()))


def _mixed(p: Params) -> list[Step]:
    k = max(1, p.w // 2)
    return one(
        CgroupDef("spin", workers=k, work=CpuSpin()),
        CgroupDef("yield", workers=k, work=YieldHeavy()),
        CgroupDef("mixed", workers=k, work=Mixed()),
        CgroupDef("cache", workers=k, work=CachePressure(size_kb=1024)),
    )


def _nested_steady(p: Params) -> list[Step]:
    a, b = p.halves
    return one(CgroupDef("outer", workers=0, children=(
        CgroupDef("inner0", a, workers=p.w), CgroupDef("inner1", b, workers=p.w),
    )))


def _nested_move(p: Params) -> list[Step]:
    return [
        Step((AddCgroup(CgroupDef("outer", workers=0, children=(
            CgroupDef("src", workers=p.w), CgroupDef("dst", workers=p.w),
        ))),), hold=0.5),
        Step((MoveAllTasks("outer/src", "outer/dst"),), hold=0.5),
    ]


def _fork_exit(p: Params) -> list[Step]:
    return one(CgroupDef("forkers", workers=p.w, work=ForkExit()),
                CgroupDef("spin", workers=max(1, p.w // 2)))


def _nice_sweep(p: Params) -> list[Step]:
    return one(CgroupDef("sweep", workers=p.w, work=NiceSweep()),
                CgroupDef("spin", workers=p.w))


def _pipe_io(p: Params) -> list[Step]:
    return one(CgroupDef("pipes", workers=even(p.w), work=PipeIo()))


def _futex(p: Params) -> list[Step]:
    return one(CgroupDef("futex", workers=even(p.w), work=FutexPingPong()))


FIFO_ON_MS, FIFO_OFF_MS = 20, 80
_FIFO_MIX = {"fairness_spread_pct":
             FAIRNESS_SPREAD_PCT + 100.0 * FIFO_ON_MS / (FIFO_ON_MS + FIFO_OFF_MS)}
"""The normal worker sharing the RT worker's CPU loses the RT duty cycle (20 %) that the
others do not: a scheduler need not migrate it around every burst to even that out."""


def _fifo_mix(p: Params) -> list[Step]:
    # RT work that sleeps four fifths of the time, pinned to one CPU: normal
    # workers must still run in its gaps.
    last = p.n - 1
    return one(
        CgroupDef("rt", CpusetSpec.exact([last]), workers=1, policy=SchedPolicy.fifo(1),
                  work=Bursty(on_ms=FIFO_ON_MS, off_ms=FIFO_OFF_MS)),
        CgroupDef("normal", workers=p.w),
    )


def _fifo_hog(p: Params) -> list[Step]:
    # Negative test: a SCHED_FIFO spinner and normal spinners on the same one
    # CPU. Only RT throttling keeps the victims alive; they must show as starved.
    # The hog starts first: victims started before it would run freely until it
    # arrives (a few hundred ms under emulation), a share that hides the starvation.
    last = p.n - 1
    return one(
        CgroupDef("hog", CpusetSpec.exact([last]), workers=1, policy=SchedPolicy.fifo(10)),
        CgroupDef("victims", CpusetSpec.exact([last]), workers=2),
    )


def _host_contention(p: Params) -> list[Step]:
    return one(CgroupDef("heavy", workers=4 * p.w), CgroupDef("yielders", workers=p.w,
                                                               work=YieldHeavy()))


def _io_sync(p: Params) -> list[Step]:
    return one(CgroupDef("io", workers=p.w, work=IoSync()))


def _bursty(p: Params) -> list[Step]:
    return one(CgroupDef("bursty", workers=2 * p.w, work=Bursty()))


def _cache(p: Params) -> list[Step]:
    return one(CgroupDef("cache", workers=p.w, work=CachePressure()))


def _mutex(p: Params) -> list[Step]:
    return one(CgroupDef("mutex", workers=max(2, p.w), work=MutexContention()))


def _policy_churn(p: Params) -> list[Step]:
    return one(CgroupDef("churn", workers=p.w, work=PolicyChurn()),
                CgroupDef("spin", workers=p.w))


def _affinity_churn(p: Params) -> list[Step]:
    return one(CgroupDef("churn", workers=p.w, work=AffinityChurn()))


def _sequence(p: Params) -> list[Step]:
    seq = Sequence(phases=((CpuSpin(), 0.2), (Sleep(), 0.1), (YieldHeavy(), 0.2)))
    return one(CgroupDef("phases", workers=p.w, work=seq))


def _batch_mix(p: Params) -> list[Step]:
    return one(CgroupDef("normal", workers=p.w),
                CgroupDef("batch", workers=p.w, policy=SchedPolicy.batch()))


ENTRIES = [
    Scenario("steady", "basic", "two cgroups, one CPU-bound worker per CPU each", _steady),
    Scenario("steady_llc", "basic", "one cgroup per LLC, confined to it", _steady_llc),
    Scenario("oversubscribed", "basic", "two cgroups, two workers per CPU each", _oversubscribed),
    Scenario("batch_mix", "sched_class", "SCHED_BATCH cgroup next to a normal one", _batch_mix),
    Scenario("cpuset_apply_midrun", "cpuset", "split the CPUs between two cgroups mid-run",
             _cpuset_apply, DYNAMIC),
    Scenario("cpuset_clear_midrun", "cpuset", "drop two disjoint cpusets mid-run",
             _cpuset_clear, DYNAMIC),
    Scenario("cpuset_resize_midrun", "cpuset", "grow then move a cpuset mid-run",
             _cpuset_resize, DYNAMIC),
    Scenario("cpuset_swap_midrun", "cpuset", "swap two disjoint cpusets mid-run", _swap,
             DYNAMIC),
    Scenario("cgroup_add_midrun", "dynamic", "a second cgroup joins mid-run", _cgroup_add),
    Scenario("cgroup_remove_midrun", "dynamic", "a cgroup is removed mid-run", _cgroup_remove),
    Scenario("affinity_change", "affinity", "pin each worker to its own CPU mid-run",
             _affinity_change, DYNAMIC),
    Scenario("affinity_pinned", "affinity", "one pinned worker per CPU beside free workers",
             _affinity_pinned),
    Scenario("affinity_llc", "affinity", "workers pinned to the CPUs of one LLC each",
             _affinity_llc),
    Scenario("mixed_workloads", "stress", "spin, yield, mixed and cache workers side by side",
             _mixed),
    Scenario("nested_steady", "nested", "two child cgroups with disjoint cpusets",
             _nested_steady),
    Scenario("nested_task_move", "nested", "move every task between sibling cgroups mid-run",
             _nested_move, DYNAMIC),
    Scenario("fork_exit_churn", "stress", "fork/exit loops beside CPU-bound workers",
             _fork_exit),
    Scenario("nice_sweep", "sched_class", "workers sweeping nice 0..19 beside fixed ones",
             _nice_sweep),
    Scenario("pipe_io", "interaction", "pairs bouncing a token over pipes", _pipe_io),
    Scenario("futex_pingpong", "interaction", "pairs handing a futex word back and forth",
             _futex),
    Scenario("sched_fifo_mix", "sched_class", "a bursty SCHED_FIFO worker on one CPU beside "
             "normal workers", _fifo_mix, _FIFO_MIX),
    Scenario("host_contention", "stress", "four workers per CPU plus yielders",
             _host_contention),
    Scenario("io_sync", "stress", "64 KB write + fdatasync + 100 us sleep loops", _io_sync),
    Scenario("bursty", "stress", "50 ms on / 100 ms off workers", _bursty),
    Scenario("cache_pressure", "stress", "random writes over 4 MB buffers", _cache),
    Scenario("mutex_contention", "interaction", "workers contending for one lock", _mutex),
    Scenario("policy_churn", "sched_class", "workers cycling normal/batch/idle", _policy_churn,
             {"fairness_spread_pct": None, "starvation_gap_ms": 1500.0}),
    Scenario("affinity_churn", "affinity", "workers re-pinning to random CPUs", _affinity_churn,
             DYNAMIC),
    Scenario("sequence_phases", "advanced", "spin, sleep and yield phases in a loop", _sequence),
    Scenario("fifo_hog_starvation", "stall", "a SCHED_FIFO spinner starves normal workers "
             "on one CPU (expected to fail starvation)", _fifo_hog, in_default_run=False),
]
