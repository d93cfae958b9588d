"""The Work base class and what work types share: spinning, validation, shared memory
lines with futex words, pipe helpers that honour the stop flag, CPU grouping."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ktstr.errors import KtstrError
from ktstr.scenario.cgroups import own_cpuset_cpus
from ktstr.scenario.syscalls import Futex

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime
    from ktstr.topology import CpuPlace

POLL_S = 0.05
"""Longest a blocking wait sleeps before it looks at the stop flag again."""
LINE = 64
"""Bytes per shared line: one cache line, so two workers' lines never share one."""
PAGE = 4096


def spin(iterations: int) -> int:
    """Pure CPU work in the interpreter (about 30-60 ns per iteration)."""
    x = 0
    for i in range(iterations):
        x += i * i
    return x


def spin_for(ns: int) -> None:
    """Spin for ``ns`` of wall time (short bursts: RT and preemption work)."""
    end = time.monotonic_ns() + ns
    while time.monotonic_ns() < end:
        spin(50)


@dataclass(frozen=True)
class Work:
    """Base class.

    ``group_size`` 2 means workers run as pairs (0-1, 2-3, ...); a type whose group
    depends on its parameters overrides :meth:`group`. ``make_shared`` runs in the
    parent before the fork; ``run(rt)`` in each worker.
    """

    name: ClassVar[str] = "work"
    group_size: ClassVar[int] = 1

    def group(self) -> int:
        """Workers per group (member ``m`` is ``m % group()`` of group ``m // group()``)."""
        return self.group_size

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        self.check_workers(workers)
        return None

    def check_workers(self, workers: int) -> None:
        """Raise a KtstrError unless ``workers`` splits into whole groups (no side effects,
        unlike make_shared: what a dry run should call)."""
        g = self.group()
        if workers % g:
            if g == 2:
                raise KtstrError(
                    f"work {self.name} runs workers in pairs; use an even worker count "
                    f"(got {workers})"
                )
            raise KtstrError(
                f"work {self.name} runs workers in groups of {g}; use a multiple of {g} "
                f"workers (got {workers})"
            )

    def cgroup_leaves(self) -> tuple[str, ...]:
        """Child cgroups the runner makes for this work (its workers move among them)."""
        return ()

    def run(self, rt: WorkerRuntime) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class SharedLines(Work):
    """Work whose batch shares one mapping of cache lines (:class:`Line`): one per
    group unless :meth:`lines` says otherwise."""

    def lines(self, workers: int) -> int:
        return workers // self.group()

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        return shared_mapping(self.lines(workers))


def check_range(work: Work, field: str, lo: float, hi: float | None = None) -> None:
    """Raise a KtstrError naming the work and ``field`` unless lo <= value (<= hi)."""
    value = getattr(work, field)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo:g}" if hi is None else f"between {lo:g} and {hi:g}"
        raise KtstrError(f"work {work.name}: {field} must be {bound}, got {value!r}")


def group_member(rt: WorkerRuntime, work: Work) -> tuple[int, int]:
    """(group index, index within the group) of this worker."""
    g = work.group()
    return rt.member // g, rt.member % g


# ---- shared memory -----------------------------------------------------------------


def shared_mapping(lines: int) -> mmap.mmap:
    """An anonymous MAP_SHARED mapping of ``lines`` cache lines (at least a page)."""
    return mmap.mmap(-1, max(PAGE, lines * LINE), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)


class Line:
    """One cache line of a shared mapping: two futex words and seven u64 words.

    Each word has one writer (no atomics across processes are needed): ``word`` is
    written by whoever posts to this line, ``ack`` by whoever answers, ``q`` holds
    timestamps and arguments.
    """

    def __init__(self, mm: mmap.mmap, index: int) -> None:
        off = index * LINE
        self.word = Futex(mm, off)
        self.ack = Futex(mm, off + 4)
        self.q = memoryview(mm)[off + 8 : off + LINE].cast("Q")


def wait_change(rt: WorkerRuntime, futex: Futex, seen: int) -> bool:
    """Sleep until ``futex`` no longer holds ``seen``; False once the worker must stop."""
    while futex.value == seen:
        futex.wait(seen, POLL_S)
        if not rt.poll():
            return False
    return True


def wait_value(rt: WorkerRuntime, futex: Futex, want: int) -> bool:
    """Sleep until ``futex`` holds ``want``; False once the worker must stop."""
    while (v := futex.value) != want:
        futex.wait(v, POLL_S)
        if not rt.poll():
            return False
    return True


def sleep_polling(rt: WorkerRuntime, seconds: float) -> bool:
    """Sleep ``seconds`` in slices of at most POLL_S; False once the worker must stop."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, POLL_S))
        if not rt.poll():
            return False
    return True


def scratch_file(scratch_dir: str, prefix: str) -> int:
    """An fd of a new file in ``scratch_dir``, unlinked at once (nothing to clean up)."""
    fd, path = tempfile.mkstemp(prefix=prefix, dir=scratch_dir)
    os.unlink(path)
    return fd


# ---- pipes -----------------------------------------------------------------------


def nonblocking_pipe(size: int | None = None) -> tuple[int, int]:
    """A pipe with O_NONBLOCK on both ends (shared by forked workers, so every
    reader and writer waits in select, never in the kernel's pipe wait), optionally
    resized to ``size`` bytes (best effort: pipe-max-size may refuse)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    if size:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    return r, w


def wait_fd(rt: WorkerRuntime, fd: int, write: bool = False) -> bool:
    """Wait until ``fd`` is readable (writable); False once the worker must stop.

    poll(2), not select(2): a worker forked from a process with many files open may
    hold fds beyond select's 1024.
    """
    p = select.poll()
    p.register(fd, (select.POLLOUT if write else select.POLLIN) | select.POLLERR)
    while not p.poll(POLL_S * 1000):
        if not rt.poll():
            return False
    return True


def read_exact(rt: WorkerRuntime, fd: int, n: int) -> bytes | None:
    """``n`` bytes from a non-blocking ``fd``; None on EOF or once the worker must stop."""
    parts: list[bytes] = []
    left = n
    while left:
        try:
            chunk = os.read(fd, left)
        except BlockingIOError:  # empty (or another reader of a shared pipe took it)
            if not wait_fd(rt, fd):
                return None
            continue
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def write_all(rt: WorkerRuntime, fd: int, data: bytes | bytearray | memoryview) -> bool:
    """Write all of ``data`` to a non-blocking ``fd``; False once the worker must stop
    or the reader is gone."""
    view = memoryview(data)
    while view:
        # Write first: poll calls a pipe writable only once a whole slot is free, while
        # a small write still merges into a partly filled page.
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            if not wait_fd(rt, fd, write=True):
                return False
        except BrokenPipeError:
            return False
    return True


# ---- CPUs -------------------------------------------------------------------------


def cpuset_cpus(rt: WorkerRuntime) -> list[int]:
    """The CPUs the worker's cgroup allows (its own affinity if that cannot be read):
    what affinity-changing work chooses from, since its own mask narrows as it pins."""
    return own_cpuset_cpus() or rt.allowed_cpus()


def group_cpus(
    rt: WorkerRuntime, cpus: list[int], key: Callable[[CpuPlace], int]
) -> list[list[int]]:
    """``cpus`` grouped by a key of their topology place (``lambda p: p.llc``), in
    order; CPUs the runtime has no place for form one group."""
    groups: dict[int, list[int]] = {}
    for c in sorted(cpus):
        place = rt.places.get(c)
        groups.setdefault(key(place) if place is not None else -1, []).append(c)
    return [groups[k] for k in sorted(groups)]


def set_affinity(cpus: list[int] | set[int]) -> bool:
    """sched_setaffinity(0, cpus); False when the kernel refuses (the cpuset changed)."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        return False
    return True
