"""Every work type, run for real on this host: a short scenario each (0.4 s, 1-4 workers)
in a ``ktstr-test-<pid>`` cpuset cgroup, asserting from the telemetry what its name
claims; SCHED_DEADLINE applied or refused; parameters validated at construction.

Snapshots of a batch's workers are taken one after another, so counters of partners
are compared with a tolerance (:func:`near`), never for equality.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ktstr.scenario.work as work_pkg
from ktstr import initramfs
from ktstr.errors import KtstrError
from ktstr.scenario.cgroups import CgroupBackend, backend_for, cgroup_mounts
from ktstr.scenario.host import host_topology
from ktstr.scenario.model import CgroupDef, CpusetSpec, SchedPolicy
from ktstr.scenario.runner import Runner, ScenarioContext, execute_defs
from ktstr.scenario.syscalls import SCHED_DEADLINE
from ktstr.scenario.work import (
    WORK_TYPES,
    AluHot,
    AsymmetricWaker,
    CachePipe,
    CacheYield,
    CgroupChurn,
    CpuSpin,
    CrossAffinityChurn,
    EpollStorm,
    FanOutCompute,
    FutexFanOut,
    FutexPingPong,
    IdleChurn,
    IoConvoy,
    IoRandRead,
    IpcVariance,
    NumaMigrationChurn,
    NumaWorkingSetSweep,
    PipeIo,
    PreemptStorm,
    PriorityInversion,
    ProducerConsumerImbalance,
    RtStarvation,
    Sequence,
    SignalStorm,
    SmtSiblingSpin,
    ThunderingHerd,
    WakeChain,
    Work,
)
from ktstr.telemetry import ScenarioResult, WorkerStats

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or cgroup_mounts() == (None, None),
    reason="running work types needs root and a cpuset cgroup controller (v1 or v2)",
)

DURATION = 0.4


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScenarioContext]:
    """A ``ktstr-test-<pid>`` cgroup under the cpuset hierarchy, always removed."""
    v2, v1 = cgroup_mounts()
    base = str(v2 or v1)
    name = f"ktstr-test-{os.getpid()}"
    backend_for(base).create(name)  # v1: copies the parent's cpus and mems
    root = os.path.join(base, name)
    try:
        topo, ids = host_topology()
        yield ScenarioContext(topo, DURATION, root, cpu_ids=ids,
                              scratch_dir=str(tmp_path_factory.mktemp("work")))
    finally:
        CgroupBackend(base).remove(name)
    assert not os.path.exists(root)


def run(ctx: ScenarioContext, work: Work, workers: int, **cg: object) -> ScenarioResult:
    res = execute_defs(ctx, [CgroupDef("w", workers=workers, work=work, **cg)],  # type: ignore[arg-type]
                       duration=DURATION, name=work.name)
    assert len(res.workers) == workers
    assert [w.error for w in res.workers if w.error] == []
    assert all(w.work_units > 0 for w in res.workers), [w.work_units for w in res.workers]
    return res


def near(a: int, b: int, rel: float = 0.1) -> bool:
    return abs(a - b) <= max(5, rel * max(a, b))


def lat(w: WorkerStats) -> int:
    return w.wake_latency.count if w.wake_latency else 0


def needs_cpus(ctx: ScenarioContext, n: int) -> None:
    if ctx.topology.nr_cpus < n:
        pytest.skip(f"needs {n} CPUs")


# ---- CPU and memory ---------------------------------------------------------------


@pytest.mark.parametrize("work", [
    AluHot(), IpcVariance(high_ms=5, low_ms=5, chase_kb=256), NumaWorkingSetSweep(size_mb=8),
    CacheYield(size_kb=64),
], ids=lambda w: w.name)
def test_cpu_and_memory_work_never_blocks(ctx: ScenarioContext, work: Work) -> None:
    for w in run(ctx, work, 2).workers:
        assert w.cpu_ns > 0
        assert w.voluntary_switches <= 10, w  # it never sleeps: off-CPU only when preempted


def test_smt_sibling_spin_pairs_move_in_lockstep(ctx: ScenarioContext) -> None:
    res = run(ctx, SmtSiblingSpin(handoffs=1), 2)
    a, b = res.workers
    assert near(a.work_units, b.work_units), (a.work_units, b.work_units)
    unpinned = any("no SMT siblings" in n for n in res.notes)
    assert unpinned == (ctx.topology.threads_per_core == 1), res.notes


# ---- I/O ----------------------------------------------------------------------------


def test_io_rand_read_reads(ctx: ScenarioContext) -> None:
    res = run(ctx, IoRandRead(file_mb=4, reads=8, drop_every=4), 2)
    assert sum(w.work_units for w in res.workers) * 8 > 100  # whole blocks, or an error


def test_io_convoy_queues_on_one_lock(ctx: ScenarioContext) -> None:
    res = run(ctx, IoConvoy(), 3)  # every worker progresses: the lock is handed on
    assert sum(lat(w) for w in res.workers) > 0  # some found it taken and queued
    units = [w.work_units for w in res.workers]
    if max(units) >= 30:  # a slow disk (writeback elsewhere) leaves too few turns to compare
        assert min(units) * 3 >= max(units), units


# ---- wake-ups -----------------------------------------------------------------------

WAKERS: list[tuple[Work, int, tuple[int, ...]]] = [
    # work, workers, members that sleep and record their wake latency
    (PipeIo(), 2, (0, 1)),
    (FutexPingPong(), 2, (0, 1)),
    (CachePipe(size_kb=64), 2, (0, 1)),
    (AsymmetricWaker(), 2, (1,)),
    (EpollStorm(), 2, (0,)),
    (SignalStorm(), 2, (0, 1)),
    (IdleChurn(), 2, (0, 1)),
    (PriorityInversion(), 3, (0,)),
    (PreemptStorm(), 2, (0,)),
]


@pytest.mark.parametrize(("work", "workers", "sleepers"), WAKERS,
                         ids=[w.name for w, _, _ in WAKERS])
def test_wake_work_records_latency_and_sleeps(ctx: ScenarioContext, work: Work, workers: int,
                                              sleepers: tuple[int, ...]) -> None:
    res = run(ctx, work, workers)
    for i in sleepers:
        w = res.workers[i]
        assert lat(w) > 0 and w.voluntary_switches > 0, w


def test_pipe_work_waits_on_fds_beyond_select_range(ctx: ScenarioContext) -> None:
    """Workers fork from whatever runs the scenario; a pytest session can hold >1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    null = os.open(os.devnull, os.O_RDONLY)
    filler: list[int] = []
    try:
        while not filler or filler[-1] < 1024:
            filler.append(os.dup(null))
        for w in run(ctx, PipeIo(), 2).workers:
            assert lat(w) > 0
    finally:
        for fd in [null, *filler]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("work", [FutexFanOut(waiters=3), ThunderingHerd(waiters=3),
                                  FanOutCompute(followers=3, iterations=500)],
                         ids=lambda w: w.name)
def test_every_follower_is_woken_every_round(ctx: ScenarioContext, work: Work) -> None:
    leader, *followers = run(ctx, work, 4).workers
    assert lat(leader) > 0
    for f in followers:
        assert near(f.work_units, leader.work_units), (f.work_units, leader.work_units)
        assert near(lat(f), f.work_units), (lat(f), f.work_units)
        assert f.voluntary_switches > 0


def test_wake_chain_every_member_progresses(ctx: ScenarioContext) -> None:
    members = run(ctx, WakeChain(length=4), 4).workers
    units = [w.work_units for w in members]
    assert all(near(u, max(units)) for u in units), units
    assert all(lat(w) > 0 and w.voluntary_switches > 0 for w in members)


def test_producers_block_on_slow_consumers(ctx: ScenarioContext) -> None:
    *producers, consumer = run(ctx, ProducerConsumerImbalance(), 3).workers
    produced = sum(p.work_units for p in producers)
    backlog = produced - consumer.work_units
    assert -10 <= backlog <= 4096 // 64 + 10, (produced, consumer.work_units)  # the pipe bounds it
    assert all(p.cpu_share < consumer.cpu_share for p in producers)
    assert all(p.voluntary_switches > 0 for p in producers)  # asleep on the full pipe
    assert lat(consumer) > 0  # item latencies: queueing + wake-up


# ---- churn --------------------------------------------------------------------------


@pytest.mark.parametrize("work", [CrossAffinityChurn(), NumaMigrationChurn(size_kb=64)],
                         ids=lambda w: w.name)
def test_affinity_churn_migrates(ctx: ScenarioContext, work: Work) -> None:
    needs_cpus(ctx, 2)
    res = run(ctx, work, 2)
    for w in res.workers:
        assert w.migrations >= w.work_units // 2 and len(w.cpus_used) >= 2, w  # every unit
    if isinstance(work, NumaMigrationChurn) and ctx.topology.numa_nodes == 1:
        assert any("one NUMA node" in n and "halves" in n for n in res.notes), res.notes


def _leaf_pids(runner: Runner, leaf: str) -> set[int]:
    return set(runner.backend.pids(f"w/{leaf}"))


def test_cgroup_churn_moves_between_two_leaves(ctx: ScenarioContext) -> None:
    runner = Runner(ctx, "cgroup_churn")
    try:
        runner.add(CgroupDef("w", workers=2, work=CgroupChurn(iterations=20000)))
        pids = {h.pid for h in runner.live}
        seen: dict[str, set[int]] = {leaf: set() for leaf in CgroupChurn.leaves}
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not all(s >= pids for s in seen.values()):
            for leaf, s in seen.items():
                s |= _leaf_pids(runner, leaf) & pids
        res = runner.finish()
    finally:
        runner.close()
    assert all(s == pids for s in seen.values()), seen
    assert all(w.work_units > 0 and w.error is None for w in res.workers)
    assert not os.path.exists(os.path.join(ctx.cgroup_root, "w"))  # leaves went with it


def test_cgroup_churn_outside_the_runner_says_what_it_needs() -> None:
    from ktstr.scenario import worker

    h = worker.spawn(worker.WorkerSpec(cgroup="cg", index=0, work=CgroupChurn(),
                                       attach=lambda pid: None))
    try:
        deadline = time.monotonic() + 10
        while h.state != worker.FAILED:
            assert time.monotonic() < deadline, "the worker should have failed at once"
            time.sleep(0.01)
        assert h.error is not None and "needs the two leaf cgroups" in h.error, h.error
    finally:
        worker.kill_and_reap(h.pid)


# ---- real time and deadline --------------------------------------------------------


def _policy(pid: int) -> int:
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK


def _hold_sampling(runner: Runner, seconds: float, pids: list[int]) -> dict[int, set[int]]:
    """Policies seen per pid while holding."""
    seen: dict[int, set[int]] = {p: set() for p in pids}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        runner.hold(0.05)
        for p in pids:
            seen[p].add(_policy(p))
    return seen


def test_rt_starvation_starves_a_normal_task_on_its_cpu(ctx: ScenarioContext) -> None:
    runner = Runner(ctx, "rt_starvation")
    try:
        runner.add(CgroupDef("victim", CpusetSpec.exact([0]), workers=1, work=CpuSpin()))
        runner.add(CgroupDef("rt", CpusetSpec.exact([0]), workers=1,
                             work=RtStarvation(spin_ms=40, sleep_ms=10)))
        rt_pid = next(h.pid for h in runner.live if h.cgroup == "rt")
        policies = _hold_sampling(runner, DURATION, [rt_pid])[rt_pid]
        res = runner.finish()
    finally:
        runner.close()
    rt = res.worker("rt", 0)
    victim = res.worker("victim", 0)
    assert rt.error is None and victim.error is None
    fell_back = any("SCHED_FIFO 10 refused" in n for n in res.notes)
    assert fell_back or policies == {os.SCHED_FIFO}, (policies, res.notes)
    assert rt.cpu_share > victim.cpu_share
    assert victim.cpu_share < 0.35, victim.cpu_share  # it got the sleeps, little else


def test_preempt_storm_preempts_its_spinner(ctx: ScenarioContext) -> None:
    runner = Runner(ctx, "preempt_storm")
    try:
        runner.add(CgroupDef("w", workers=2, work=PreemptStorm()))
        preemptor = runner.live[0].pid
        policies = _hold_sampling(runner, DURATION, [preemptor])[preemptor]
        res = runner.finish()
    finally:
        runner.close()
    storm, spinner = res.workers
    fell_back = any("SCHED_FIFO 10 refused" in n for n in res.notes)
    assert fell_back or os.SCHED_FIFO in policies, (policies, res.notes)
    assert lat(storm) > 0 and spinner.involuntary_switches > 0
    if not fell_back:  # a woken FIFO task runs at once, whatever hogs its CPU
        assert storm.wake_latency is not None and storm.wake_latency.p50_us < 1000, storm


def test_deadline_policy_runs_or_reports_the_refusal(ctx: ScenarioContext) -> None:
    runner = Runner(ctx, "deadline")
    try:
        runner.add(CgroupDef("dl", workers=1, work=CpuSpin(),
                             policy=SchedPolicy.deadline(2000, 10_000)))
        pid = runner.live[0].pid
        policies = _hold_sampling(runner, DURATION, [pid])[pid]
        res = runner.finish()
    finally:
        runner.close()
    (w,) = res.workers
    assert w.policy == "deadline:2000/10000/10000us"
    if w.error:  # this kernel refused it: the reason is in the telemetry, the worker ran on
        assert "SCHED_DEADLINE" in w.error and "refused by the kernel" in w.error, w.error
        assert w.work_units > 0
    else:
        assert policies == {SCHED_DEADLINE}
        assert w.cpu_share < 0.3, w.cpu_share  # 2 ms of every 10 ms: the reservation holds


def test_deadline_refused_by_the_kernel_is_a_telemetry_error(ctx: ScenarioContext) -> None:
    floor = Path("/proc/sys/kernel/sched_deadline_period_min_us")
    if not floor.exists() or int(floor.read_text()) <= 50:
        pytest.skip("needs sched_deadline_period_min_us > 50 for a period the kernel refuses")
    res = execute_defs(ctx, [CgroupDef("dl", workers=1, work=CpuSpin(),
                                       policy=SchedPolicy.deadline(10, 50))],
                       duration=0.2, name="deadline_refused")
    (w,) = res.workers
    assert w.error is not None and "refused by the kernel: EINVAL" in w.error, w.error
    assert "period within kernel.sched_deadline_period_min_us" in w.error
    assert w.work_units > 0  # it ran on under its previous policy
    errors = next(c for c in res.checks if c["name"] == "worker_errors")
    assert not errors["passed"] and "SCHED_DEADLINE" in errors["message"]
    assert res.passed is False


# ---- validation and registry --------------------------------------------------------

INVALID: list[tuple[Callable[[], object], str]] = [
    (lambda: AluHot(iterations=0), "work alu_hot: iterations must be >= 1, got 0"),
    (lambda: SmtSiblingSpin(handoffs=0), "smt_sibling_spin: handoffs must be >= 1"),
    (lambda: IpcVariance(chase_kb=1), "ipc_variance: chase_kb must be between 4 and"),
    (lambda: IoRandRead(block=1000), "io_rand_read: block must be a multiple of 512"),
    (lambda: IoRandRead(file_mb=0), "io_rand_read: file_mb must be between 1 and 4096"),
    (lambda: IoConvoy(block=0), "io_convoy: block must be between 1"),
    (lambda: IdleChurn(sleep_us=0), "idle_churn: sleep_us must be between 1 and"),
    (lambda: CacheYield(size_kb=1, stride=4096), "cache_yield: stride must be between 1 and 1024"),
    (lambda: CachePipe(size_kb=0), "cache_pipe: size_kb must be between 1"),
    (lambda: FutexFanOut(waiters=0), "futex_fan_out: waiters must be between 1 and 255"),
    (lambda: FanOutCompute(skew=1.5), "fan_out_compute: skew must be between 0 and 0.99"),
    (lambda: AsymmetricWaker(heavy_iterations=0), "asymmetric_waker: heavy_iterations"),
    (lambda: WakeChain(length=1), "wake_chain: length must be between 2 and 256, got 1"),
    (lambda: EpollStorm(fds=4, burst=5), "epoll_storm: burst must be between 1 and 4, got 5"),
    (lambda: ThunderingHerd(waiters=0), "thundering_herd: waiters must be between 1"),
    (lambda: CrossAffinityChurn(iterations=-1), "cross_affinity_churn: iterations must be >= 0"),
    (lambda: NumaMigrationChurn(size_kb=0), "numa_migration_churn: size_kb must be between"),
    (lambda: CgroupChurn(iterations=-1), "cgroup_churn: iterations must be >= 0"),
    (lambda: NumaWorkingSetSweep(size_mb=0), "numa_working_set_sweep: size_mb must be between"),
    (lambda: PriorityInversion(high_nice=5, medium_nice=0),
     "priority_inversion: needs high_nice < medium_nice < low_nice, got 5, 0, 10"),
    (lambda: PriorityInversion(low_nice=20), "priority_inversion: low_nice must be between -20"),
    (lambda: ProducerConsumerImbalance(pipe_kb=2), "producer_consumer_imbalance: pipe_kb must be"),
    (lambda: SignalStorm(burst=0), "signal_storm: burst must be between 1 and 64"),
    (lambda: PreemptStorm(burst_us=2000, interval_us=1000),
     "preempt_storm: burst_us must be between 1 and 1000, got 2000"),
    (lambda: PreemptStorm(priority=100), "preempt_storm: priority must be between 1 and 99"),
    (lambda: RtStarvation(spin_ms=99, sleep_ms=1),
     r"rt_starvation: spin_ms / \(spin_ms \+ sleep_ms\) must be <= 0.95 \(got 0.990\)"),
    (lambda: RtStarvation(spin_ms=2000, sleep_ms=500), "rt_starvation: spin_ms must be between"),
    (lambda: SchedPolicy.deadline(5000, 1000, 10_000),
     "deadline: needs 0 < runtime <= deadline <= period, got runtime 5000000 ns, "
     "deadline 1000000 ns, period 10000000 ns"),
    (lambda: SchedPolicy.deadline(1000, 20_000, 10_000), "0 < runtime <= deadline <= period"),
    (lambda: SchedPolicy.deadline(0, 1000), "0 < runtime <= deadline <= period"),
    (lambda: SchedPolicy(SchedPolicy.fifo().kind, 5, runtime_ns=1),
     "sched policy fifo takes no runtime/deadline/period"),
]


@pytest.mark.parametrize(("make", "message"), INVALID, ids=[m for _, m in INVALID])
def test_bad_parameters_raise_at_construction(make: Callable[[], object], message: str) -> None:
    with pytest.raises(KtstrError, match=message):
        make()


@pytest.mark.parametrize(("work", "workers", "message"), [
    (WakeChain(length=4), 6, "wake_chain runs workers in groups of 4; use a multiple of 4"),
    (PriorityInversion(), 4, "priority_inversion runs workers in groups of 3"),
    (ProducerConsumerImbalance(producers=3, consumers=2), 4, "in groups of 5"),
    (FutexFanOut(waiters=2), 4, "futex_fan_out runs workers in groups of 3"),
    (SignalStorm(), 3, "signal_storm runs workers in pairs; use an even worker count"),
])
def test_group_sizes_are_checked_before_the_fork(work: Work, workers: int, message: str) -> None:
    with pytest.raises(KtstrError, match=message):
        work.make_shared(workers, "/tmp")
    with pytest.raises(KtstrError, match=message):  # a dry run's check, and a sequence's
        Sequence(phases=((CpuSpin(), 1.0), (work, 1.0))).check_workers(workers)


def test_deadline_policy_describes_itself() -> None:
    p = SchedPolicy.deadline(500, 2000, 4000)
    assert (p.runtime_ns, p.deadline_ns, p.period_ns) == (500_000, 2_000_000, 4_000_000)
    assert p.deadline_params == (500_000, 2_000_000, 4_000_000)
    assert p.describe() == "deadline:500/2000/4000us"
    assert SchedPolicy.deadline(100, 1000).period_ns == 1_000_000  # period = deadline
    assert SchedPolicy.fifo(3).deadline_params is None


def test_every_work_type_is_registered_and_exported() -> None:
    classes = {obj for name in work_pkg.__all__ if isinstance(obj := getattr(work_pkg, name), type)
               and issubclass(obj, Work) and obj is not Work}
    assert set(WORK_TYPES.values()) == classes
    assert len(WORK_TYPES) == 39
    assert all(n == c.name and n.islower() and " " not in n for n, c in WORK_TYPES.items())
    assert all(c.__doc__ for c in classes)


def test_the_initramfs_packer_finds_every_work_module() -> None:
    search = initramfs.search_path(initramfs.BaseSpec())
    packed = initramfs.find_modules([], search, ("ktstr.scenario.runner",))
    pkg = Path(work_pkg.__file__).parent
    wanted = {f"ktstr.scenario.work.{p.stem}" for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert wanted | {"ktstr.scenario.work", "ktstr.scenario.syscalls"} <= set(packed)
