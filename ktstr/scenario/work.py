"""Work types: what a worker process does in its loop.

Each type is a frozen dataclass; ``run(rt)`` executes in the forked worker
and calls ``rt.tick()`` after every unit of work (that is the progress
checkpoint the gap and starvation checks use). ``make_shared`` runs in the
parent before the fork and builds what a batch of workers shares (pipes,
futex words, a lock file). Blocking waits poll ``rt.poll()`` at least every
50 ms so a stop request is honoured promptly.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import select
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ktstr.errors import KtstrError

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime

_POLL_S = 0.05


def spin(iterations: int) -> int:
    """Pure CPU work in the interpreter (about 30-60 ns per iteration)."""
    x = 0
    for i in range(iterations):
        x += i * i
    return x


@dataclass(frozen=True)
class Work:
    """Base class. ``group_size`` 2 means workers run as pairs (0-1, 2-3, ...)."""

    name: ClassVar[str] = "work"
    group_size: ClassVar[int] = 1

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        if workers % self.group_size:
            raise KtstrError(
                f"work {self.name} runs workers in pairs; use an even worker count "
                f"(got {workers})"
            )
        return None

    def run(self, rt: WorkerRuntime) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class CpuSpin(Work):
    name: ClassVar[str] = "cpu_spin"
    iterations: int = 2000

    def run(self, rt: WorkerRuntime) -> None:
        n = self.iterations
        while True:
            spin(n)
            if not rt.tick():
                return


@dataclass(frozen=True)
class YieldHeavy(Work):
    name: ClassVar[str] = "yield_heavy"
    iterations: int = 200

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            spin(self.iterations)
            os.sched_yield()
            if not rt.tick():
                return


@dataclass(frozen=True)
class Mixed(Work):
    """Spin, with a yield every 4th unit and a 200 us sleep every 16th."""

    name: ClassVar[str] = "mixed"
    iterations: int = 2000

    def run(self, rt: WorkerRuntime) -> None:
        i = 0
        while True:
            spin(self.iterations)
            i += 1
            if i % 16 == 0:
                time.sleep(200e-6)
            elif i % 4 == 0:
                os.sched_yield()
            if not rt.tick():
                return


@dataclass(frozen=True)
class IoSync(Work):
    """64 KB write, fdatasync, 100 us sleep per unit (a scratch file, unlinked at once)."""

    name: ClassVar[str] = "io_sync"
    block: int = 64 * 1024
    sleep_us: int = 100

    def run(self, rt: WorkerRuntime) -> None:
        fd, path = tempfile.mkstemp(prefix="ktstr-io-", dir=rt.scratch_dir)
        os.unlink(path)
        buf = os.urandom(self.block)
        try:
            while True:
                os.pwrite(fd, buf, 0)
                os.fdatasync(fd)
                time.sleep(self.sleep_us / 1e6)
                if not rt.tick():
                    return
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Bursty(Work):
    """``on_ms`` of spinning (many units), then ``off_ms`` asleep."""

    name: ClassVar[str] = "bursty"
    on_ms: float = 50.0
    off_ms: float = 100.0
    iterations: int = 1000

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            end = time.monotonic() + self.on_ms / 1000
            while time.monotonic() < end:
                spin(self.iterations)
                if not rt.tick():
                    return
            time.sleep(self.off_ms / 1000)
            if not rt.poll():
                return


@dataclass(frozen=True)
class PipeIo(Work):
    """Pairs bounce an 8-byte timestamp over two pipes; wake latency = receive - send."""

    name: ClassVar[str] = "pipe_io"
    group_size: ClassVar[int] = 2
    iterations: int = 100

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        return [(os.pipe(), os.pipe()) for _ in range(workers // 2)]

    def run(self, rt: WorkerRuntime) -> None:
        ab, ba = rt.shared[rt.member // 2]
        role = rt.member % 2
        rx, tx = (ba[0], ab[1]) if role == 0 else (ab[0], ba[1])
        if role == 0:
            os.write(tx, struct.pack("<Q", time.monotonic_ns()))
        while True:
            ready, _, _ = select.select([rx], [], [], _POLL_S)
            if not ready:
                if not rt.poll():
                    return
                continue
            data = os.read(rx, 8)
            if len(data) < 8:
                return
            rt.record_latency(time.monotonic_ns() - struct.unpack("<Q", data)[0])
            spin(self.iterations)
            if not rt.tick():
                return
            os.write(tx, struct.pack("<Q", time.monotonic_ns()))


_SYS_FUTEX = 202  # x86_64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


@dataclass(frozen=True)
class FutexPingPong(Work):
    """Pairs hand a turn word back and forth with FUTEX_WAIT/FUTEX_WAKE on shared memory.

    Wake latency = time from the partner's FUTEX_WAKE to this worker running again.
    """

    name: ClassVar[str] = "futex_pingpong"
    group_size: ClassVar[int] = 2
    iterations: int = 100

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        return mmap.mmap(-1, max(4096, 64 * workers), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def run(self, rt: WorkerRuntime) -> None:
        mm: mmap.mmap = rt.shared
        pair, role = rt.member // 2, rt.member % 2
        off = pair * 64
        turn = memoryview(mm)[off : off + 4].cast("I")
        stamp = memoryview(mm)[off + 8 : off + 16].cast("Q")
        addr = ctypes.addressof(ctypes.c_uint32.from_buffer(mm, off))
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        timeout = _Timespec(0, int(_POLL_S * 1e9))
        while True:
            while turn[0] != role:
                syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, 1 - role,
                        ctypes.byref(timeout), None, 0)
                if not rt.poll():
                    return
            sent = stamp[0]
            if sent:
                rt.record_latency(time.monotonic_ns() - sent)
            spin(self.iterations)
            if not rt.tick():
                turn[0] = 1 - role  # let the partner notice the stop too
                syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, 1, None, None, 0)
                return
            stamp[0] = time.monotonic_ns()
            turn[0] = 1 - role
            syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, 1, None, None, 0)


@dataclass(frozen=True)
class CachePressure(Work):
    """Random 64-byte writes over a ``size_kb`` buffer (evicts the caches it shares)."""

    name: ClassVar[str] = "cache_pressure"
    size_kb: int = 4096
    touches: int = 256

    def run(self, rt: WorkerRuntime) -> None:
        size = self.size_kb * 1024
        buf = bytearray(size)
        view = memoryview(buf)
        chunk = b"\xa5" * 64
        rand = rt.rng.randrange
        limit = size - 64
        while True:
            for _ in range(self.touches):
                o = rand(limit)
                view[o : o + 64] = chunk
            if not rt.tick():
                return


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
        from ktstr.scenario.cgroups import own_cpuset_cpus

        allowed = own_cpuset_cpus() or rt.allowed_cpus()
        while True:
            try:
                os.sched_setaffinity(0, {rt.rng.choice(allowed)})
            except OSError:
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


@dataclass(frozen=True)
class MutexContention(Work):
    """All workers of a batch contend for one POSIX record lock around a short critical section."""

    name: ClassVar[str] = "mutex_contention"
    hold_iterations: int = 300
    outside_iterations: int = 300

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        fd, path = tempfile.mkstemp(prefix="ktstr-lock-", dir=scratch_dir)
        os.unlink(path)
        return fd

    def run(self, rt: WorkerRuntime) -> None:
        fd = rt.shared
        while True:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            spin(self.hold_iterations)
            fcntl.lockf(fd, fcntl.LOCK_UN)
            spin(self.outside_iterations)
            if not rt.tick():
                return


@dataclass(frozen=True)
class Sleep(Work):
    """Sleep in ``slice_ms`` slices, one unit per slice (an idle phase for Sequence)."""

    name: ClassVar[str] = "sleep"
    slice_ms: float = 10.0

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            time.sleep(self.slice_ms / 1000)
            if not rt.tick():
                return


@dataclass(frozen=True)
class Sequence(Work):
    """Run ``phases`` (work, seconds) in order, cycling until stopped."""

    name: ClassVar[str] = "sequence"
    phases: tuple[tuple[Work, float], ...] = ()

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        if not self.phases:
            raise KtstrError("work sequence: needs at least one (work, seconds) phase")
        return [w.make_shared(workers, scratch_dir) for w, _ in self.phases]

    def run(self, rt: WorkerRuntime) -> None:
        shared = rt.shared
        while rt.running:
            for i, (work, seconds) in enumerate(self.phases):
                rt.shared = shared[i]
                rt.begin_phase(seconds)
                work.run(rt)
                rt.end_phase()
                if not rt.running:
                    return

    def describe(self) -> str:
        return "sequence(" + ",".join(f"{w.describe()}:{s:g}s" for w, s in self.phases) + ")"


@dataclass(frozen=True)
class Custom(Work):
    """Call ``fn(rt)`` repeatedly; each call is one unit (or ``int`` units if it returns one)."""

    name: ClassVar[str] = "custom"
    fn: Callable[[WorkerRuntime], int | None] = field(default=lambda rt: None)
    label: str = "custom"

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            units = self.fn(rt)
            if not rt.tick(units if isinstance(units, int) and units > 0 else 1):
                return

    def describe(self) -> str:
        return self.label


WORK_TYPES: dict[str, type[Work]] = {
    cls.name: cls
    for cls in (
        CpuSpin, YieldHeavy, Mixed, IoSync, Bursty, PipeIo, FutexPingPong, CachePressure,
        ForkExit, NiceSweep, AffinityChurn, PolicyChurn, MutexContention, Sleep, Sequence, Custom,
    )
}
"""Work types by name (``Sequence`` and ``Custom`` need arguments)."""
