"""Scenarios that exercise one work type each (or a few side by side): CPU and memory
behaviour, I/O, wake-up patterns, churn, and real-time pressure."""

from __future__ import annotations

from collections.abc import Callable

from ktstr.scenario.catalog.base import DYNAMIC, Params, Scenario, one
from ktstr.scenario.controls import CgroupControls, CpuMax
from ktstr.scenario.model import Affinity, CgroupDef, CpusetSpec, SchedPolicy, Step
from ktstr.scenario.work import (
    AluHot,
    AsymmetricWaker,
    CachePipe,
    CacheYield,
    CgroupChurn,
    CpuSpin,
    CrossAffinityChurn,
    EpollStorm,
    FanOutCompute,
    ForkExit,
    FutexFanOut,
    IdleChurn,
    IoConvoy,
    IoRandRead,
    IpcVariance,
    NumaMigrationChurn,
    NumaWorkingSetSweep,
    PreemptStorm,
    PriorityInversion,
    ProducerConsumerImbalance,
    RtStarvation,
    SignalStorm,
    SmtSiblingSpin,
    ThunderingHerd,
    WakeChain,
    Work,
)


def _groups(work: Work, k: int) -> int:
    """At least ``k`` workers, rounded up to whole groups of ``work``."""
    g = work.group()
    return g * max(1, -(-k // g))


def _alone(work: Work, per_cpu: float = 1.0, name: str = "w",
           beside: bool = False) -> Callable[[Params], list[Step]]:
    """One cgroup running ``work`` (about ``per_cpu`` workers per CPU), with spinners
    beside it if ``beside``."""
    def build(p: Params) -> list[Step]:
        defs = [CgroupDef(name, workers=_groups(work, max(1, round(per_cpu * p.w))), work=work)]
        if beside:
            defs.append(CgroupDef("spin", workers=max(1, p.w // 2), work=CpuSpin()))
        return one(*defs)
    return build


def _deadline_mix(p: Params) -> list[Step]:
    dl = SchedPolicy.deadline(runtime_us=2000, deadline_us=10_000, period_us=10_000)
    return one(CgroupDef("deadline", workers=1, policy=dl), CgroupDef("normal", workers=p.w))


def _rt_starvation(p: Params) -> list[Step]:
    last = p.n - 1
    return one(CgroupDef("rt", CpusetSpec.exact([last]), workers=1,
                         work=RtStarvation(spin_ms=950.0, sleep_ms=50.0)),
               CgroupDef("victims", CpusetSpec.exact([last]), workers=2))


def _weights_with_bandwidth(p: Params) -> list[Step]:
    heavy = CgroupControls(weight=200, cpu_max=CpuMax.cpus(max(0.5, p.n / 4)))
    return one(CgroupDef("heavy_capped", workers=2 * p.w, controls=heavy),
               CgroupDef("light", workers=2 * p.w, controls=CgroupControls(weight=100)))


def _weights_in_llc(p: Params) -> list[Step]:
    llc = CpusetSpec.llc(0)
    return one(CgroupDef("a", llc, workers=2 * p.w, controls=CgroupControls(weight=300)),
               CgroupDef("b", llc, workers=2 * p.w, controls=CgroupControls(weight=100)))


_PINNED_BESIDE = {"fairness_spread_pct": 35.0}
"""A free worker left on CPU 0 beside its two pinned ones for a fraction f of the run
shows a spread of about f * 67 points: 35 catches one left there for over half the run,
and leaves the balancer the few hundred ms it takes to move it in a 1 s run."""


def _affinity_imbalance(p: Params) -> list[Step]:
    return one(CgroupDef("pinned0", workers=max(2, p.w // 2), affinity=Affinity.exact([0])),
               CgroupDef("free", workers=p.w))


def _fork_imbalance(p: Params) -> list[Step]:
    a, b = p.halves
    return one(CgroupDef("forkers", a, workers=p.w, work=ForkExit()),
               CgroupDef("spinners", b, workers=2 * p.w))


_PERIODIC = {"fairness_spread_pct": None}
"""Mixed-role groups (leaders and followers, producers and consumers, signallers and
waiters) are uneven by design."""
_YIELDERS = {"fairness_spread_pct": None}
"""A yielder beside spinners waits for as long as the spinner on its CPU runs: its off-CPU
time is what it hands away, so it says where it was placed, not how fair the scheduler is."""

ENTRIES = [
    # stress
    Scenario("alu_hot", "stress", "integer multiply/xor loops on every CPU", _alone(AluHot())),
    Scenario("ipc_variance", "stress", "workers alternating high-IPC and pointer-chasing "
             "phases", _alone(IpcVariance())),
    Scenario("io_rand_read", "stress", "random 4 KB preads of a 16 MB scratch file",
             _alone(IoRandRead(), beside=True)),
    Scenario("io_convoy", "stress", "writers taking turns on one file under one lock, with "
             "fsync", _alone(IoConvoy(), per_cpu=1.5), _PERIODIC),
    Scenario("idle_churn", "stress", "short bursts and 50 us sleeps: constant idle entry and "
             "exit", _alone(IdleChurn(), per_cpu=2.0)),
    Scenario("cache_yield", "stress", "touch a 256 KB working set, then sched_yield",
             _alone(CacheYield(), beside=True), _YIELDERS),
    Scenario("numa_working_set_sweep", "stress", "sweep a 64 MB working set page by page",
             _alone(NumaWorkingSetSweep())),
    Scenario("fan_out_compute", "stress", "a leader hands work to followers and waits for "
             "all", _alone(FanOutCompute()), _PERIODIC),
    Scenario("epoll_storm", "stress", "pairs signalling bursts of eventfds to epoll waiters",
             _alone(EpollStorm()), _PERIODIC),
    Scenario("signal_storm", "stress", "pairs exchanging bursts of real-time signals",
             _alone(SignalStorm())),
    Scenario("smt_sibling_spin", "stress", "pairs spinning on one cache line, on SMT "
             "siblings where there are any", _alone(SmtSiblingSpin())),
    # interaction
    Scenario("wake_chain", "interaction", "a ring of four workers, each waking the next",
             _alone(WakeChain())),
    Scenario("futex_fan_out", "interaction", "one waker wakes three futex waiters per round",
             _alone(FutexFanOut()), _PERIODIC),
    Scenario("thundering_herd", "interaction", "seven waiters woken at once, every round",
             _alone(ThunderingHerd()), _PERIODIC),
    Scenario("asymmetric_waker", "interaction", "a heavy worker wakes a light partner per "
             "unit", _alone(AsymmetricWaker()), _PERIODIC),
    Scenario("cache_pipe", "interaction", "pairs passing a 256 KB buffer through a pipe",
             _alone(CachePipe())),
    Scenario("producer_consumer_imbalance", "interaction", "fast producers, one slow consumer, "
             "a small pipe", _alone(ProducerConsumerImbalance()), _PERIODIC),
    # affinity
    Scenario("cross_affinity_churn", "affinity", "workers re-pinning themselves across LLCs "
             "every unit", _alone(CrossAffinityChurn()), DYNAMIC),
    Scenario("numa_migration_churn", "affinity", "workers moving between NUMA nodes' CPUs "
             "with their memory", _alone(NumaMigrationChurn()), DYNAMIC),
    # sched_class
    Scenario("deadline_mix", "sched_class", "a SCHED_DEADLINE worker (2 ms every 10 ms) "
             "beside normal ones", _deadline_mix, {"fairness_spread_pct": None}),
    Scenario("preempt_storm", "sched_class", "a SCHED_FIFO worker waking every millisecond "
             "to preempt a spinner", _alone(PreemptStorm()), _PERIODIC),
    # stall
    Scenario("rt_starvation", "stall", "a SCHED_FIFO spinner at a 95% duty cycle starves "
             "normal workers on its CPU (expected to fail starvation)", _rt_starvation,
             in_default_run=False),
    # dynamic
    Scenario("cgroup_churn", "dynamic", "workers moving themselves between two leaf cgroups "
             "every unit", _alone(CgroupChurn()), DYNAMIC),
    # advanced
    Scenario("priority_inversion", "advanced", "a low-priority lock holder, a high-priority "
             "waiter, medium spinners", _alone(PriorityInversion()), _PERIODIC),
    Scenario("cgroup_weight_with_bandwidth", "advanced", "the heavier of two weighted "
             "cgroups is also capped by cpu.max", _weights_with_bandwidth,
             {"fairness_spread_pct": 25.0, "bandwidth_pct": 10.0, "starvation": False,
              "max_gap_ms": None}),
    Scenario("cgroup_weights_in_llc", "advanced", "cgroups weighted 3:1 inside one LLC's "
             "cpuset", _weights_in_llc, {"fairness_spread_pct": 25.0,
                                         "weight_share_pct": 35.0}),
    Scenario("affinity_imbalance", "advanced", "workers pinned to CPU 0 beside free ones",
             _affinity_imbalance, _PINNED_BESIDE),
    Scenario("fork_imbalance", "advanced", "fork/exit loops on one half, spinners on the "
             "other", _fork_imbalance),
]
