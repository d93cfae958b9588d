"""Lock contention: a shared critical section, and priority inversion around one."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ktstr.errors import KtstrError
from ktstr.scenario.syscalls import WAKE_ALL
from ktstr.scenario.work.base import (
    POLL_S,
    Line,
    Work,
    check_range,
    group_member,
    scratch_file,
    shared_mapping,
    spin,
)

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime


@contextlib.contextmanager
def record_lock(fd: int) -> Iterator[None]:
    """Hold the POSIX record lock on ``fd`` (per process: forked workers contend)."""
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)


class HandoffLock:
    """A POSIX record lock on a shared fd that is handed on to a waiter.

    POSIX locks are not fair: a releaser that keeps running takes the lock again
    before the waiter it woke gets a CPU, and under load the waiters never do. So
    a releaser that sees a waiter waits (at most POLL_S) until someone else has
    taken it. Lines from ``first`` of the shared mapping: its ``word`` counts
    acquisitions (written only under the lock), ``q[0]`` is the last release time;
    then one line per member whose ``word`` says it is waiting (its own writer).
    """

    def __init__(self, fd: int, mm: mmap.mmap, first: int, members: int, me: int) -> None:
        self.fd = fd
        self.state = Line(mm, first)
        self.waiting = [Line(mm, first + 1 + i).word for i in range(members)]
        self.me = me

    @staticmethod
    def lines(members: int) -> int:
        return 1 + members

    def acquire(self) -> bool:
        """Take the lock; True if it was held by someone else (this worker slept)."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.waiting[self.me].value = 1
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            self.waiting[self.me].value = 0
            waited = True
        acq = self.state.word
        acq.value = acq.value + 1
        acq.wake(WAKE_ALL)  # a releaser waiting for the hand-off
        return waited

    @property
    def released_ns(self) -> int:
        return int(self.state.q[0])

    def release(self) -> None:
        acq = self.state.word
        gen = acq.value
        self.state.q[0] = time.monotonic_ns()
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        if not any(w.value for i, w in enumerate(self.waiting) if i != self.me):
            return
        end = time.monotonic() + POLL_S
        while acq.value == gen and (left := end - time.monotonic()) > 0:
            acq.wait(gen, left)

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """``with lock.held() as waited:``"""
        waited = self.acquire()
        try:
            yield waited
        finally:
            self.release()


@dataclass(frozen=True)
class MutexContention(Work):
    """All workers of a batch contend for one POSIX record lock around a short critical section."""

    name: ClassVar[str] = "mutex_contention"
    hold_iterations: int = 300
    outside_iterations: int = 300

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        return scratch_file(scratch_dir, "ktstr-lock-")

    def run(self, rt: WorkerRuntime) -> None:
        fd = rt.shared
        while True:
            with record_lock(fd):
                spin(self.hold_iterations)
            spin(self.outside_iterations)
            if not rt.tick():
                return


@dataclass(frozen=True)
class PriorityInversion(Work):
    """Trios share one lock, three priority tiers by member (``member % 3``):

    0. high (``high_nice``): takes the lock for ``high_iterations``, then sleeps
       ``high_sleep_us``; records how long each acquisition waited.
    1. medium (``medium_nice``): never touches the lock, spins ``medium_iterations``.
    2. low (``low_nice``): holds the lock for ``hold_iterations`` at a time.

    While the medium member keeps the low holder off its CPU, the high one waits
    behind both: the inversion shows as the tail of the high member's waits. A nice
    value the kernel refuses (a negative one needs CAP_SYS_NICE) is noted and that
    member keeps its cgroup's nice.
    """

    name: ClassVar[str] = "priority_inversion"
    group_size: ClassVar[int] = 3
    high_nice: int = -10
    medium_nice: int = 0
    low_nice: int = 10
    hold_iterations: int = 3000
    high_iterations: int = 100
    high_sleep_us: int = 1000
    medium_iterations: int = 2000

    def __post_init__(self) -> None:
        for f in ("high_nice", "medium_nice", "low_nice"):
            check_range(self, f, -20, 19)
        if not self.high_nice < self.medium_nice < self.low_nice:
            raise KtstrError(
                f"work {self.name}: needs high_nice < medium_nice < low_nice, got "
                f"{self.high_nice}, {self.medium_nice}, {self.low_nice}"
            )
        for f in ("hold_iterations", "high_iterations", "medium_iterations"):
            check_range(self, f, 1)
        check_range(self, "high_sleep_us", 0)

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        trios = workers // 3
        return ([scratch_file(scratch_dir, "ktstr-pi-") for _ in range(trios)],
                shared_mapping(trios * HandoffLock.lines(3)))

    def run(self, rt: WorkerRuntime) -> None:
        trio, tier = group_member(rt, self)
        fds, mm = rt.shared
        lock = HandoffLock(fds[trio], mm, trio * HandoffLock.lines(3), 3, tier)
        nice = (self.high_nice, self.medium_nice, self.low_nice)[tier]
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as err:
            rt.note(f"{self.name}: nice {nice} refused ({err.strerror}); tier {tier} keeps "
                    f"nice {os.getpriority(os.PRIO_PROCESS, 0)}")
        if tier == 1:
            while True:
                spin(self.medium_iterations)
                if not rt.tick():
                    return
        if tier == 2:
            while True:
                with lock.held():
                    spin(self.hold_iterations)
                if not rt.tick():
                    return
        while True:
            t0 = time.monotonic_ns()
            with lock.held():
                rt.record_latency(time.monotonic_ns() - t0)
                spin(self.high_iterations)
            if not rt.tick():
                return
            time.sleep(self.high_sleep_us / 1e6)
