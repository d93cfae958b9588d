"""Churn: work that keeps changing how or where it runs (processes, nice, policy,
affinity across LLCs and NUMA nodes, cgroups, idle transitions)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ktstr.errors import KtstrError
from ktstr.scenario.cgroups import own_cpuset_cpus
from ktstr.scenario.syscalls import set_timer_slack
from ktstr.scenario.work.base import (
    Work,
    check_range,
    cpuset_cpus,
    group_cpus,
    set_affinity,
    spin,
)
from ktstr.scenario.work.memory import touch

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime


@dataclass(frozen=True)
class ForkExit(Work):
    """fork() a child that exits at once, reap it: one unit."""

    name: ClassVar[str] = "fork_exit"

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                os._exit(0)
            os.waitpid(pid, 0)
            if not rt.tick():
                return


@dataclass(frozen=True)
class NiceSweep(Work):
    """Walk the worker's nice value from ``low`` to ``high`` and back, one step per unit."""

    name: ClassVar[str] = "nice_sweep"
    low: int = 0
    high: int = 19
    iterations: int = 1000

    def run(self, rt: WorkerRuntime) -> None:
        values = list(range(self.low, self.high + 1))
        values += values[-2:0:-1]
        i = 0
        while True:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, values[i % len(values)])
            i += 1
            spin(self.iterations)
            if not rt.tick():
                return


@dataclass(frozen=True)
class AffinityChurn(Work):
    """Re-pin to a random CPU of the cgroup's cpuset every unit."""

    name: ClassVar[str] = "affinity_churn"
    iterations: int = 1000

    def run(self, rt: WorkerRuntime) -> None:
        allowed = cpuset_cpus(rt)
        while True:
            if not set_affinity({rt.rng.choice(allowed)}):
                allowed = own_cpuset_cpus() or allowed
            spin(self.iterations)
            if not rt.tick():
                return


@dataclass(frozen=True)
class PolicyChurn(Work):
    """Cycle SCHED_OTHER -> SCHED_BATCH -> SCHED_IDLE each unit.

    Real-time classes are left out on purpose: a churning RT task could
    monopolise a CPU of the machine running the scenario.
    """

    name: ClassVar[str] = "policy_churn"
    iterations: int = 1000

    def run(self, rt: WorkerRuntime) -> None:
        policies = (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE)
        i = 0
        while True:
            os.sched_setscheduler(0, policies[i % 3], os.sched_param(0))
            i += 1
            spin(self.iterations)
            if not rt.tick():
                return


def _churn_groups(rt: WorkerRuntime, work: str, by: str) -> list[list[int]]:
    """The cpuset's CPUs grouped by ``by`` ("llc" or "node") of the runner's topology;
    with fewer than two groups, ``llc`` falls back to single CPUs and ``node`` to two
    halves of the CPUs (noted). One CPU: one group, nothing to churn (noted)."""
    cpus = cpuset_cpus(rt)
    if len(cpus) < 2:
        rt.note(f"{work}: one allowed CPU, nothing to move between")
        return [cpus]
    groups = group_cpus(rt, cpus, lambda p: getattr(p, by)) if rt.places else [cpus]
    if len(groups) >= 2:
        return groups
    if by == "llc":
        rt.note(f"{work}: the allowed CPUs share one LLC; moving between CPUs instead")
        return [[c] for c in cpus]
    rt.note(f"{work}: the allowed CPUs are on one NUMA node; alternating between the two "
            "halves of them instead")
    half = len(cpus) // 2
    return [cpus[:half], cpus[half:]]


@dataclass(frozen=True)
class CrossAffinityChurn(Work):
    """Every unit the worker pins itself to a CPU of the next LLC (round robin over
    the LLCs of its cpuset, a random CPU inside it): each unit crosses an LLC, unlike
    AffinityChurn's random CPU. With one LLC it moves to another CPU each unit."""

    name: ClassVar[str] = "cross_affinity_churn"
    iterations: int = 1000

    def __post_init__(self) -> None:
        check_range(self, "iterations", 0)

    def run(self, rt: WorkerRuntime) -> None:
        groups = _churn_groups(rt, self.name, "llc")
        g = rt.member
        while True:
            g = (g + 1) % len(groups)
            if not set_affinity({rt.rng.choice(groups[g])}):
                groups = _churn_groups(rt, self.name, "llc")  # the cpuset changed
            spin(self.iterations)
            if not rt.tick():
                return


@dataclass(frozen=True)
class NumaMigrationChurn(Work):
    """Every unit the worker moves its affinity to all CPUs of the next NUMA node of
    its cpuset and touches its ``size_kb`` working set there.

    The working set was placed on the node the worker started on (first touch), so
    on every other node its accesses are remote. On a one-node topology it
    alternates between the lower and the upper half of its CPUs instead (noted in
    the scenario's notes).
    """

    name: ClassVar[str] = "numa_migration_churn"
    size_kb: int = 256
    iterations: int = 0

    def __post_init__(self) -> None:
        check_range(self, "size_kb", 1, 1 << 20)
        check_range(self, "iterations", 0)

    def run(self, rt: WorkerRuntime) -> None:
        groups = _churn_groups(rt, self.name, "node")
        buf = bytearray(self.size_kb * 1024)
        touch(buf, 64)
        g = rt.member
        while True:
            g = (g + 1) % len(groups)
            if not set_affinity(groups[g]):
                groups = _churn_groups(rt, self.name, "node")
            touch(buf, 64)
            spin(self.iterations)
            if not rt.tick():
                return


@dataclass(frozen=True)
class CgroupChurn(Work):
    """Every unit the worker moves itself to the other of two sibling leaf cgroups
    (``<cgroup>/churn_a``, ``<cgroup>/churn_b``) that the runner creates for it, then
    spins ``iterations``: cgroup migration on the hot path (attach, cpuset and
    scheduler-group changes).

    The leaves inherit the cgroup's CPUs. Moving resets a v1 cpuset worker's affinity
    to the cpuset, and a MoveAllTasks of these workers lasts until their next unit.
    """

    name: ClassVar[str] = "cgroup_churn"
    leaves: ClassVar[tuple[str, str]] = ("churn_a", "churn_b")
    iterations: int = 1000

    def __post_init__(self) -> None:
        check_range(self, "iterations", 0)

    def cgroup_leaves(self) -> tuple[str, ...]:
        return self.leaves

    def run(self, rt: WorkerRuntime) -> None:
        if len(rt.cgroup_leaves) < 2:
            raise KtstrError(
                f"work {self.name} needs the two leaf cgroups the scenario runner makes for "
                "it; run it through ktstr.scenario.runner"
            )
        fds = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY)
               for d in rt.cgroup_leaves[:2]]
        pid = str(os.getpid()).encode()
        i = 0
        try:
            while True:
                os.write(fds[i % 2], pid)
                i += 1
                spin(self.iterations)
                if not rt.tick():
                    return
        finally:
            for fd in fds:
                os.close(fd)


@dataclass(frozen=True)
class IdleChurn(Work):
    """Very short bursts (``iterations``), each followed by a ``sleep_us`` sleep: a CPU
    goes idle and wakes again every unit.

    Timer slack is set to 1 ns, so the oversleep it records as wake latency is the
    timer-to-running delay (idle exit included), not the kernel's default 50 us slack.
    """

    name: ClassVar[str] = "idle_churn"
    iterations: int = 50
    sleep_us: int = 50

    def __post_init__(self) -> None:
        check_range(self, "iterations", 0)
        check_range(self, "sleep_us", 1, 1_000_000)

    def run(self, rt: WorkerRuntime) -> None:
        set_timer_slack(1)
        want = self.sleep_us * 1000
        secs = self.sleep_us / 1e6
        while True:
            spin(self.iterations)
            t0 = time.monotonic_ns()
            time.sleep(secs)
            rt.record_latency(time.monotonic_ns() - t0 - want)
            if not rt.tick():
                return
