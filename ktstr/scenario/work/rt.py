"""Real-time pressure: a SCHED_FIFO task preempting CPU hogs, bounded RT starvation.

Both are bounded by their own duty cycle, never only by the kernel's RT throttling,
so neither can wedge the machine running them (a host in host mode included).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ktstr.errors import KtstrError
from ktstr.scenario.syscalls import set_timer_slack
from ktstr.scenario.work.base import (
    Work,
    check_range,
    cpuset_cpus,
    group_member,
    set_affinity,
    sleep_polling,
    spin,
    spin_for,
)

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime

FALLBACK_NICE = -20


def become_realtime(rt: WorkerRuntime, work: str, priority: int) -> bool:
    """SCHED_FIFO at ``priority``; if the kernel refuses (no CAP_SYS_NICE, a v2 cpu
    cgroup without RT runtime), nice -20 instead, noted in the scenario's notes."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except OSError as err:
        why = err.strerror
    try:
        os.setpriority(os.PRIO_PROCESS, 0, FALLBACK_NICE)
        rt.note(f"{work}: SCHED_FIFO {priority} refused ({why}); ran at nice "
                f"{FALLBACK_NICE} instead")
    except OSError as err:
        rt.note(f"{work}: SCHED_FIFO {priority} refused ({why}) and nice {FALLBACK_NICE} "
                f"too ({err.strerror}); ran at its cgroup's policy")
    return False


@dataclass(frozen=True)
class PreemptStorm(Work):
    """Groups of one preemptor and ``spinners`` CPU-bound spinners. The preemptor
    (SCHED_FIFO ``priority``, or nice -20 where RT is refused) sleeps ``interval_us``,
    wakes and runs a ``burst_us`` burst, over and over: every wake preempts a spinner.

    With ``pin`` a group shares one CPU of the cpuset (group i on the i-th CPU), so
    the preemption is certain. The preemptor records its timer wake latency (timer
    slack 1 ns); its duty cycle is burst / (burst + interval), at most 50 %.
    """

    name: ClassVar[str] = "preempt_storm"
    spinners: int = 1
    interval_us: int = 1000
    burst_us: int = 100
    priority: int = 10
    iterations: int = 1000
    pin: bool = True

    def __post_init__(self) -> None:
        check_range(self, "spinners", 1, 255)
        check_range(self, "interval_us", 10, 1_000_000)
        check_range(self, "burst_us", 1, self.interval_us)
        check_range(self, "priority", 1, 99)
        check_range(self, "iterations", 1)

    def group(self) -> int:
        return self.spinners + 1

    def run(self, rt: WorkerRuntime) -> None:
        grp, idx = group_member(rt, self)
        if self.pin:
            cpus = cpuset_cpus(rt)
            set_affinity({cpus[grp % len(cpus)]})
        if idx:
            while True:
                spin(self.iterations)
                if not rt.tick():
                    return
        become_realtime(rt, self.name, self.priority)
        set_timer_slack(1)
        interval, burst = self.interval_us * 1000, self.burst_us * 1000
        while True:
            t0 = time.monotonic_ns()
            time.sleep(interval / 1e9)
            rt.record_latency(time.monotonic_ns() - t0 - interval)
            spin_for(burst)
            if not rt.tick():
                return


@dataclass(frozen=True)
class RtStarvation(Work):
    """A SCHED_FIFO spinner per CPU: worker i pins itself to the i-th CPU of its cpuset
    and spins ``spin_ms`` (ticking every ``iterations``), then sleeps ``sleep_ms``.

    SCHED_OTHER tasks on that CPU get only the sleeps. The duty cycle is capped at
    95 % and a spin at 1 s, so even a host running it keeps breathing; where RT is
    refused it spins at nice -20 instead (noted).
    """

    name: ClassVar[str] = "rt_starvation"
    spin_ms: float = 90.0
    sleep_ms: float = 10.0
    priority: int = 10
    iterations: int = 1000

    def __post_init__(self) -> None:
        check_range(self, "spin_ms", 0.1, 1000.0)
        check_range(self, "sleep_ms", 1.0, 10_000.0)
        check_range(self, "priority", 1, 99)
        check_range(self, "iterations", 1)
        duty = self.spin_ms / (self.spin_ms + self.sleep_ms)
        if duty > 0.95:
            raise KtstrError(
                f"work {self.name}: spin_ms / (spin_ms + sleep_ms) must be <= 0.95 (got "
                f"{duty:.3f}); a longer sleep keeps the CPU from being wedged"
            )

    def run(self, rt: WorkerRuntime) -> None:
        cpus = cpuset_cpus(rt)
        set_affinity({cpus[rt.member % len(cpus)]})
        become_realtime(rt, self.name, self.priority)
        spin_ns = int(self.spin_ms * 1e6)
        while True:
            end = time.monotonic_ns() + spin_ns
            while time.monotonic_ns() < end:
                spin(self.iterations)
                if not rt.tick():
                    return
            if not sleep_polling(rt, self.sleep_ms / 1000):
                return
