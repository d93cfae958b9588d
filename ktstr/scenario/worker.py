"""Forked worker processes and their telemetry.

Each worker owns one shared anonymous mapping (a "slot"). The worker bumps
counters in it from its hot loop (no syscalls but a clock read, no pipes);
the parent reads it at any time, plus the kernel's view of the process from
/proc/<pid>/{schedstat,status,stat,sched}.

CPU placement is recorded per *epoch*: the parent bumps the slot's epoch
after every change of the worker's allowed CPUs, and the worker stamps
``cpu_epoch[cpu] = epoch`` whenever it samples the CPU it runs on. A CPU
stamped with the current epoch that is outside the allowed set is an
isolation violation (see :meth:`WorkerHandle.harvest_cpus`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ktstr.cpulist import parse_cpu_list
from ktstr.reap import die_with_parent
from ktstr.scenario.syscalls import set_deadline
from ktstr.telemetry import LatencySummary, WorkerStats, off_cpu_pct
from ktstr.topology import CpuPlace, Topology

if TYPE_CHECKING:
    from ktstr.scenario.work import Work

# Slot layout: u64 words at the start, then per-CPU epoch stamps, then a latency ring.
_STATE, _STOP, _UNITS, _START, _LAST, _MAXGAP, _MIGR, _EPOCH, _LASTCPU, _DEADLINE, \
    _LATN, _LATMAX, _XNODE = range(13)
_ERR_OFF, _ERR_LEN = 128, 384
_NOTE_OFF, _NOTE_LEN = 512, 512
_CPU_OFF = 1024
MAX_CPUS = 1024
_LAT_OFF = _CPU_OFF + 4 * MAX_CPUS  # 5120
LAT_CAP = 8192
SLOT_SIZE = _LAT_OFF + 4 * LAT_CAP

STARTING, RUNNING, DONE, FAILED = 0, 1, 2, 3

_SAMPLE_NS = 1_000_000  # CPU sample and stop-flag poll period inside the worker

_libc = ctypes.CDLL(None, use_errno=True)
_sched_getcpu = _libc.sched_getcpu
_sched_getcpu.restype = ctypes.c_int


class WorkerRuntime:
    """What a work type sees inside the worker process."""

    def __init__(
        self,
        mm: mmap.mmap,
        member: int,
        shared: Any,
        scratch_dir: str,
        seed: int,
        *,
        places: Mapping[int, CpuPlace] | None = None,
        cgroup_leaves: tuple[str, ...] = (),
    ) -> None:
        self.mm = mm
        self.q = memoryview(mm)[:_ERR_OFF].cast("Q")
        self.cpu_epoch = memoryview(mm)[_CPU_OFF:_LAT_OFF].cast("I")
        self.lat = memoryview(mm)[_LAT_OFF:SLOT_SIZE].cast("I")
        self.member = member
        """Index of this worker within its spawn batch (pairs use member // 2)."""
        self.shared = shared
        """Whatever the work type's ``make_shared`` built before the fork."""
        self.scratch_dir = scratch_dir
        self.rng = random.Random(seed)
        self.places: Mapping[int, CpuPlace] = places or {}
        """Real CPU id -> where it sits in the scenario's topology (empty: unknown)."""
        self.cgroup_leaves = cgroup_leaves
        """Task directories of the leaf cgroups the runner made for the work
        (:meth:`Work.cgroup_leaves`), in the work's order."""
        self._notes: list[str] = []
        self.running = True
        self._units = 0
        self._max_gap = 0
        self._last_cpu = -1
        self._migr = 0
        self._xnode = 0
        self._node_of = cpu_nodes()
        self._lat_n = 0
        self._lat_max = 0
        now = time.monotonic_ns()
        self._last = now
        self._next_sample = now
        self.q[_START] = now
        self.q[_LAST] = now
        self._deadline = self.q[_DEADLINE]
        self._phase_end = 0
        self.sample()

    def begin_phase(self, seconds: float) -> None:
        """Make tick()/poll() return False after ``seconds`` (Sequence phases)."""
        self._phase_end = time.monotonic_ns() + int(seconds * 1e9)

    def end_phase(self) -> None:
        self._phase_end = 0

    def tick(self, units: int = 1) -> bool:
        """Record progress; returns False once the worker should stop."""
        now = time.monotonic_ns()
        gap = now - self._last
        self._last = now
        self._units += units
        q = self.q
        q[_UNITS] = self._units
        q[_LAST] = now
        if gap > self._max_gap:
            self._max_gap = gap
            q[_MAXGAP] = gap
        if now >= self._next_sample:
            self._next_sample = now + _SAMPLE_NS
            self.sample()
            if q[_STOP] or (self._deadline and now > self._deadline):
                self.running = False
        if self._phase_end and now >= self._phase_end:
            return False
        return self.running

    def poll(self) -> bool:
        """Check the stop flag without recording progress (for blocking waits)."""
        now = time.monotonic_ns()
        if self.q[_STOP] or (self._deadline and now > self._deadline):
            self.running = False
        if self._phase_end and now >= self._phase_end:
            return False
        return self.running

    def sample(self) -> None:
        cpu = _sched_getcpu()
        epoch = self.q[_EPOCH]
        if 0 <= cpu < MAX_CPUS:
            self.cpu_epoch[cpu] = epoch
            if self._last_cpu >= 0 and cpu != self._last_cpu:
                self._migr += 1
                self.q[_MIGR] = self._migr
                nodes = self._node_of
                if cpu < len(nodes) and self._last_cpu < len(nodes) and \
                        nodes[cpu] != nodes[self._last_cpu]:
                    self._xnode += 1
                    self.q[_XNODE] = self._xnode
            self._last_cpu = cpu
            self.q[_LASTCPU] = cpu + 1

    def record_latency(self, ns: int) -> None:
        ns = max(0, ns)
        self.lat[self._lat_n % LAT_CAP] = min(ns, 0xFFFFFFFF)
        self._lat_n += 1
        self.q[_LATN] = self._lat_n
        if ns > self._lat_max:
            self._lat_max = ns
            self.q[_LATMAX] = ns

    def allowed_cpus(self) -> list[int]:
        return sorted(os.sched_getaffinity(0))

    def note(self, text: str) -> None:
        """Tell the scenario something it should know but that is no failure (a
        fallback taken); the runner adds it to the result's notes once."""
        if text not in self._notes:
            self._notes.append(text)
            _put_text(self.mm, _NOTE_OFF, _NOTE_LEN, "; ".join(self._notes))


def _put_text(mm: mmap.mmap, off: int, cap: int, text: str) -> None:
    data = text.encode()[: cap - 1]
    mm[off : off + cap] = data.ljust(cap, b"\0")


def _get_text(mm: mmap.mmap, off: int, cap: int) -> str | None:
    raw = bytes(mm[off : off + cap]).rstrip(b"\0")
    return raw.decode(errors="replace") if raw else None


@dataclass
class WorkerSpec:
    """Everything a worker applies to itself after the fork."""

    cgroup: str
    index: int
    work: Work
    attach: Callable[[int], None]
    """Moves a pid into the worker's cgroup (the cgroup backend's attach)."""
    affinity: tuple[int, ...] | None = None
    policy: int = os.SCHED_OTHER
    priority: int = 0
    policy_name: str = "normal"
    deadline: tuple[int, int, int] | None = None
    """SCHED_DEADLINE (runtime, deadline, period) in ns; set, it replaces ``policy``."""
    nice: int = 0
    member: int = 0
    shared: Any = None
    scratch_dir: str = "/tmp"
    max_lifetime_s: float = 600.0
    seed: int = 0
    topology: Topology | None = None
    cpu_ids: tuple[int, ...] = ()
    """Real CPU id of each topology CPU (empty: identity)."""
    cgroup_leaves: tuple[str, ...] = ()


@dataclass
class _ProcSample:
    cpu_ns: int = 0
    epoch: int = -1


class ProcFiles:
    """A task's ``/proc/<pid>/{stat,schedstat}`` held open and re-read with pread.

    Opening a /proc file walks the path and builds a file object every time; under
    emulation that made the harness's 50 ms placement sampling cost a quarter of a
    CPU, taken from the workers it measures. An open fd also keeps naming the same
    task after its pid is reused (reads then fail with ESRCH).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fds: dict[str, int] = {}

    def read(self, name: str) -> bytes:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, 4096, 0)

    def schedstat(self) -> tuple[int, int, int]:
        """(on-CPU ns, run-queue wait ns, timeslices)."""
        a, b, c = self.read("schedstat").split()[:3]
        return int(a), int(b), int(c)

    def processor(self) -> int:
        """The CPU the task last ran on ("processor", field 39 of stat)."""
        text = self.read("stat")
        return int(text[text.rindex(b")") + 2 :].split()[39 - 3])

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


@dataclass
class WorkerHandle:
    """The parent's view of one worker process."""

    spec: WorkerSpec
    pid: int
    mm: mmap.mmap
    spawn_ns: int
    cgroup: str
    allowed: frozenset[int] = frozenset()
    """Real CPU ids the worker may run on now."""
    epoch: int = 1
    violations: set[int] = field(default_factory=set)
    seen: set[int] = field(default_factory=set)
    _prev_allowed: frozenset[int] = frozenset()
    _proc: _ProcSample = field(default_factory=_ProcSample)
    final: WorkerStats | None = None
    files: ProcFiles = field(init=False)
    window: tuple[int, int] | None = None
    """(monotonic ns, on-CPU ns) when the worker's measurement window opened: once
    the step that spawned it finished its ops (:meth:`open_window`)."""

    def __post_init__(self) -> None:
        self.files = ProcFiles(self.pid)

    def open_window(self) -> None:
        """Measure off-CPU time from now on, not from the fork: the harness forking
        the step's other workers is not the scheduler's doing."""
        if self.window is not None or not self.alive:
            return
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.window = (time.monotonic_ns(), self.files.schedstat()[0])

    @property
    def q(self) -> memoryview:
        return memoryview(self.mm)[:_ERR_OFF].cast("Q")

    @property
    def state(self) -> int:
        return int(self.q[_STATE])

    @property
    def error(self) -> str | None:
        return _get_text(self.mm, _ERR_OFF, _ERR_LEN)

    @property
    def note(self) -> str | None:
        """What the worker noted (:meth:`WorkerRuntime.note`), "; "-joined."""
        return _get_text(self.mm, _NOTE_OFF, _NOTE_LEN)

    @property
    def alive(self) -> bool:
        return self.final is None

    def set_allowed(self, cpus: frozenset[int]) -> None:
        """Start a new placement epoch. Around a change, call it twice: before the
        kernel applies it with old | new, and after it with the new set."""
        self.harvest_cpus()
        self._prev_allowed = self.allowed
        self.allowed = cpus
        self.epoch += 1
        self.q[_EPOCH] = self.epoch

    def harvest_cpus(self) -> None:
        """Fold the worker's CPU stamps into ``seen`` and ``violations``.

        A stamp from the current epoch must be in the allowed set; a stamp from the
        previous epoch may also be in the previous set (the sample raced the change).
        """
        stamps = memoryview(self.mm)[_CPU_OFF:_LAT_OFF].cast("I")
        ok_now = self.allowed
        ok_prev = self.allowed | self._prev_allowed
        for cpu in range(MAX_CPUS):
            ep = stamps[cpu]
            if not ep:
                continue
            self.seen.add(cpu)
            now_bad = ep == self.epoch and ok_now and cpu not in ok_now
            prev_bad = ep == self.epoch - 1 and ok_prev and cpu not in ok_prev
            if now_bad or prev_bad:
                self.violations.add(cpu)

    def sample_proc(self) -> None:
        """Parent-side placement sample from /proc/<pid>/stat (field 39, last CPU).

        Only counted when the task ran since the previous sample in the same epoch:
        a task that has not run since a cpuset change still shows its old CPU.
        """
        if not self.alive:
            return
        try:
            cpu_ns = self.files.schedstat()[0]
            cpu = self.files.processor()
        except (OSError, ValueError, IndexError):
            return
        prev = self._proc
        self._proc = _ProcSample(cpu_ns, self.epoch)
        if prev.epoch != self.epoch or cpu_ns <= prev.cpu_ns or cpu < 0:
            return
        self.seen.add(cpu)
        if self.allowed and cpu not in self.allowed:
            self.violations.add(cpu)

    def snapshot(self, now_ns: int | None = None) -> WorkerStats:
        """Telemetry now (the process must still exist for the kernel fields)."""
        now = now_ns or time.monotonic_ns()
        q = self.q
        self.harvest_cpus()
        cpu_ns = run_delay = slices = 0
        vol = invol = 0
        kernel_migr: int | None = None
        try:
            cpu_ns, run_delay, slices = self.files.schedstat()
            vol, invol = _read_switches(self.pid)
            kernel_migr = _read_nr_migrations(self.pid)
        except (OSError, ValueError, IndexError):
            pass
        start = int(q[_START]) or self.spawn_ns
        last = int(q[_LAST]) or start
        gap = max(int(q[_MAXGAP]), now - last)
        lat_n = int(q[_LATN])
        lat_view = memoryview(self.mm)[_LAT_OFF:SLOT_SIZE].cast("I")
        lat_samples = [lat_view[i] for i in range(min(lat_n, LAT_CAP))]
        wall = max(1, now - self.spawn_ns)
        win_start, win_cpu = self.window or (self.spawn_ns, 0)
        return WorkerStats(
            cgroup=self.cgroup,
            index=self.spec.index,
            pid=self.pid,
            work=self.spec.work.name,
            policy=self.spec.policy_name,
            nice=self.spec.nice,
            work_units=int(q[_UNITS]),
            wall_ns=wall,
            cpu_ns=cpu_ns,
            run_delay_ns=run_delay,
            timeslices=slices,
            voluntary_switches=vol,
            involuntary_switches=invol,
            cpus_used=sorted(self.seen),
            migrations=kernel_migr if kernel_migr is not None else int(q[_MIGR]),
            sampled_migrations=int(q[_MIGR]),
            cross_node_migrations=int(q[_XNODE]),
            max_gap_ms=gap / 1e6,
            off_cpu_pct=off_cpu_pct(now - win_start, cpu_ns - win_cpu),
            window_cpu_ns=max(0, cpu_ns - win_cpu) if self.window is not None else None,
            wake_latency=(
                LatencySummary.from_ns(lat_samples, int(q[_LATMAX]), count=lat_n)
                if lat_n else None
            ),
            allowed_cpus=sorted(self.allowed),
            isolation_violations=sorted(self.violations),
            error=self.error,
        )


def _read_switches(pid: int) -> tuple[int, int]:
    vol = invol = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol = int(line.split()[1])
    return vol, invol


def _read_nr_migrations(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/sched") as f:
            for line in f:
                if line.startswith("se.nr_migrations"):
                    return int(line.split(":")[1])
    except OSError:
        return None
    return None


def spawn(spec: WorkerSpec) -> WorkerHandle:
    """Fork one worker. It joins its cgroup, applies affinity/nice/policy, then works."""
    mm = mmap.mmap(-1, SLOT_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    q = memoryview(mm)[:_ERR_OFF].cast("Q")
    q[_EPOCH] = 1
    q[_DEADLINE] = time.monotonic_ns() + int(spec.max_lifetime_s * 1e9)
    spawn_ns = time.monotonic_ns()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            _child(spec, mm, parent)
            code = 0
        except BaseException as err:
            _put_text(mm, _ERR_OFF, _ERR_LEN, f"{type(err).__name__}: {err}")
            q[_STATE] = FAILED
            code = 3
        finally:
            os._exit(code)
    q.release()
    return WorkerHandle(spec=spec, pid=pid, mm=mm, spawn_ns=spawn_ns, cgroup=spec.cgroup)


def _child(spec: WorkerSpec, mm: mmap.mmap, parent: int) -> None:  # pragma: no cover
    # Die with the parent (even one already gone), and leave Ctrl-C to the parent (it
    # stops everyone).
    die_with_parent(parent, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The parent forks with these signals blocked; the mask is inherited.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    spec.attach(os.getpid())
    if spec.affinity is not None:
        os.sched_setaffinity(0, spec.affinity)
    if spec.nice:
        os.setpriority(os.PRIO_PROCESS, 0, spec.nice)
    if spec.deadline is not None:  # SCHED_DEADLINE, through sched_setattr
        refused = apply_deadline(*spec.deadline)
        if refused:  # reported in the telemetry; the worker runs on as it was
            _put_text(mm, _ERR_OFF, _ERR_LEN, refused)
    elif spec.policy != os.SCHED_OTHER:
        os.sched_setscheduler(0, spec.policy, os.sched_param(spec.priority))
    places: dict[int, CpuPlace] = {}
    if spec.topology is not None:
        ids = spec.cpu_ids or tuple(range(spec.topology.nr_cpus))
        places = {ids[p.cpu]: p for p in spec.topology.places}
    rt = WorkerRuntime(mm, spec.member, spec.shared, spec.scratch_dir, spec.seed,
                       places=places, cgroup_leaves=spec.cgroup_leaves)
    mm_q = memoryview(mm)[:_ERR_OFF].cast("Q")
    mm_q[_STATE] = RUNNING
    spec.work.run(rt)
    mm_q[_STATE] = DONE


def cpu_nodes(root: str = "/sys/devices/system/node") -> list[int]:
    """The NUMA node of each CPU id (from sysfs; one node 0 for all when it says nothing)."""
    out: list[int] = []
    try:
        names = os.listdir(root)
    except OSError:
        return out
    for name in names:
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        try:
            with open(os.path.join(root, name, "cpulist")) as f:
                cpus = parse_cpu_list(f.read().strip())
        except (OSError, ValueError):
            continue
        for cpu in cpus:
            if cpu >= len(out):
                out.extend([0] * (cpu + 1 - len(out)))
            out[cpu] = int(name[4:])
    return out


_DEADLINE_HINTS = {
    errno.EPERM: "needs CAP_SYS_NICE, and an affinity covering its whole root domain (a "
                 "cpuset or affinity narrower than the machine's is refused)",
    errno.EBUSY: "admission control: not enough deadline bandwidth left "
                 "(kernel.sched_rt_runtime_us, other deadline tasks)",
    errno.EINVAL: "parameters out of the kernel's range (runtime >= 1024 ns, period within "
                  "kernel.sched_deadline_period_min_us..max_us)",
}


def apply_deadline(runtime_ns: int, deadline_ns: int, period_ns: int) -> str | None:
    """Make the caller SCHED_DEADLINE; None, or why the kernel refused (for telemetry)."""
    try:
        set_deadline(runtime_ns, deadline_ns, period_ns)
    except OSError as err:
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        hint = _DEADLINE_HINTS.get(err.errno or 0, err.strerror or "")
        return (f"SCHED_DEADLINE runtime {runtime_ns} ns, deadline {deadline_ns} ns, period "
                f"{period_ns} ns refused by the kernel: {name} ({hint}); the worker ran under "
                "its previous policy")
    return None


def wait_started(handles: list[WorkerHandle], timeout: float = 15.0) -> None:
    """Block until every worker runs its workload; raise on the first worker error."""
    deadline = time.monotonic() + timeout
    pending = list(handles)
    while pending:
        still = []
        for h in pending:
            st = h.state
            early = _exit_status(h) if st == STARTING else None
            if st == FAILED or early is not None:
                raise WorkerError(
                    f"worker {h.cgroup}[{h.spec.index}] pid {h.pid} failed to start: "
                    f"{h.error or f'exited early ({early})'}"
                )
            if st == STARTING:
                still.append(h)
        pending = still
        if pending and time.monotonic() > deadline:
            h = pending[0]
            raise WorkerError(
                f"worker {h.cgroup}[{h.spec.index}] pid {h.pid} did not start within "
                f"{timeout:g} s"
            )
        if pending:
            time.sleep(0.002)


def _exit_status(h: WorkerHandle) -> str | None:
    """None while the worker lives, else how it ended (it is reaped here)."""
    try:
        pid, status = os.waitpid(h.pid, os.WNOHANG)
    except ChildProcessError:  # not our child any more: someone else reaped it
        return "reaped elsewhere"
    if not pid:
        return None
    h.final = h.final or WorkerStats(h.cgroup, h.spec.index, h.pid, h.spec.work.name)
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def stop(handles: list[WorkerHandle], grace: float = 2.0) -> list[WorkerStats]:
    """Snapshot, ask to stop, wait ``grace`` seconds, then SIGKILL; reap every pid."""
    now = time.monotonic_ns()
    for h in handles:
        if h.final is None:
            h.final = h.snapshot(now)
        h.q[_STOP] = 1
    deadline = time.monotonic() + grace
    pending = [h for h in handles if h.pid]
    while pending and time.monotonic() < deadline:
        pending = [h for h in pending if not _reap(h.pid)]
        if pending:
            time.sleep(0.005)
    for h in pending:
        kill_and_reap(h.pid)
    for h in handles:
        h.files.close()
    return [h.final for h in handles if h.final is not None]


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return bool(done)


def kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class WorkerError(Exception):
    """A worker could not start (bad policy, cgroup attach refused, ...)."""
