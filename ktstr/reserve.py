"""Host CPU reservations: every VM run holds host CPUs for its vCPUs, machine-wide.

A scheduler test measures latencies and CPU shares; two VMs whose vCPU threads
compete for the same host CPUs measure each other instead. So each run first
reserves host CPUs, and every ktstr process on the machine (two terminals, two
CI jobs, pytest-xdist workers) sees the same reservations: one lock file per
host CPU, ``<cache root>/locks/cpu<N>.lock``, held with ``flock`` for the life
of the reservation. The kernel drops a dead process's locks, so nothing goes
stale; the holder's record written into each file (pid, start time, test,
mode) is what ``ktstr locks`` shows, and only for files whose lock is held.

Two modes:

- budget (default): a run needs ``min(vCPUs, host CPUs)`` CPUs' worth; which
  lock files it takes says nothing about where its threads run. A vCPU thread
  under a scheduler test is busy most of the time, so one vCPU per host CPU is
  the most that runs undistorted; capping at the host's size lets a VM larger
  than the host run alone. On a 2-CPU host every default topology (2 to 8
  vCPUs) needs both CPUs: one VM at a time.
- LLC-aligned (performance mode): whole last-level caches, enough CPUs for one
  vCPU each; ``Reservation.cpus`` are the host CPUs to pin the vCPU threads to.

Acquisition is all or nothing: a run that cannot have its whole set holds none
of it while it waits (it backs off and retries), so two waiters cannot deadlock;
starvation is bounded by ``wait_s``, after which :class:`ReservationTimeout`
says what was wanted and who holds it.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import random
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypedDict

from ktstr import reap
from ktstr.cpulist import format_cpu_list, parse_cpu_list
from ktstr.errors import KtstrError
from ktstr.paths import cache_root

SYS_CPU = Path("/sys/devices/system/cpu")
DEFAULT_WAIT_S = 600.0
"""Long enough to queue behind a few default runs (each has a hard timeout of about a
minute plus its scenario), short enough that a run blocked by a hung holder is told so."""
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0
"""Retry delays while waiting (doubling, jittered so that waiters do not retry in step)."""
RECORD_MAX = 1 << 16


LOCK_DIR_ENV = "KTSTR_LOCK_DIR"
"""Where the lock files live. The sandbox points it into its guest's own tmpfs: there the
cache is a 9p share whose server grants every lock; the sandbox holds its CPUs on the host."""


def default_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or cache_root() / "locks")


def lock_path(directory: Path, cpu: int) -> Path:
    return directory / f"cpu{cpu}.lock"


class Mode(enum.Enum):
    BUDGET = "budget"
    LLC = "llc"


class ReservationError(KtstrError):
    """No reservation: the caller decides whether the run is skipped or fails."""


class ReservationTimeout(ReservationError):
    """The CPUs stayed busy for the whole wait."""

    def __init__(self, message: str, holders: Iterable[Holder] = ()) -> None:
        super().__init__(message)  # only the message in args: it pickles (xdist)
        self.holders = tuple(holders)


class ReservationTooLarge(ReservationError):
    """An LLC-aligned run wants more CPUs than the host has: waiting cannot help."""


# --- the host -------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _llc_key(root: Path, cpu: int) -> str:
    """What `cpu` shares its last-level cache with: the CPU list of its highest data or
    unified cache; without cache info its package; without that, the whole host."""
    base = root / f"cpu{cpu}"
    best: tuple[int, tuple[int, ...]] | None = None
    for index in base.glob("cache/index[0-9]*"):
        level, shared = _read(index / "level"), _read(index / "shared_cpu_list")
        if _read(index / "type") == "Instruction" or not level or not level.isdecimal() \
                or not shared:
            continue
        with contextlib.suppress(KtstrError):
            cpus = tuple(parse_cpu_list(shared))
            if best is None or int(level) > best[0]:
                best = (int(level), cpus)
    if best is not None:
        return f"llc {format_cpu_list(best[1])}"
    package = _read(base / "topology" / "physical_package_id")
    return f"package {package}" if package is not None else "host"


@dataclass(frozen=True)
class HostTopology:
    """The host CPUs ktstr may use, grouped by last-level cache (each group sorted, the
    groups ordered by their first CPU)."""

    llcs: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        every = [c for llc in self.llcs for c in llc]
        if not every or not all(self.llcs) or len(set(every)) != len(every):
            raise KtstrError(f"host topology: LLCs must be disjoint, non-empty CPU sets, "
                             f"got {self.llcs}")

    @classmethod
    def read(cls, root: Path = SYS_CPU, allowed: Iterable[int] | None = None) -> HostTopology:
        """From sysfs at `root`: the online CPUs (those in `allowed`, if given)."""
        online = _read(root / "online")
        if online:
            cpus = set(parse_cpu_list(online))
        else:
            cpus = {int(p.name[3:]) for p in root.glob("cpu[0-9]*") if p.name[3:].isdecimal()}
        if allowed is not None:
            cpus &= set(allowed)
        if not cpus:
            raise KtstrError(f"no usable CPUs found under {root}")
        groups: dict[str, list[int]] = {}
        for cpu in sorted(cpus):
            groups.setdefault(_llc_key(root, cpu), []).append(cpu)
        return cls(tuple(sorted(tuple(g) for g in groups.values())))

    @classmethod
    def current(cls) -> HostTopology:
        """This host, limited to the CPUs this process may run on (a container's cpuset)."""
        return cls.read(SYS_CPU, os.sched_getaffinity(0))

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(sorted(c for llc in self.llcs for c in llc))

    @property
    def nr_cpus(self) -> int:
        return sum(len(llc) for llc in self.llcs)

    def llc_of(self, cpu: int) -> int:
        for i, llc in enumerate(self.llcs):
            if cpu in llc:
                return i
        raise KtstrError(f"host CPU {cpu} is not one of {format_cpu_list(self.cpus)}")

    def describe(self) -> str:
        n = len(self.llcs)
        return f"{self.nr_cpus} CPUs in {n} LLC{'' if n == 1 else 's'}"


def _pick(vcpus: int, mode: Mode, host: HostTopology, free: set[int]) -> tuple[int, ...] | None:
    """The CPUs a run of `vcpus` would take from `free`, None if it does not fit now."""
    if mode is Mode.BUDGET:
        # LLCs already in use first: whole free LLCs stay whole for aligned runs.
        order = sorted(host.llcs, key=lambda llc: all(c in free for c in llc))
        candidates = [c for llc in order for c in llc if c in free]
        need = min(vcpus, host.nr_cpus)
        return tuple(sorted(candidates[:need])) if len(candidates) >= need else None
    whole = [llc for llc in host.llcs if all(c in free for c in llc)]
    fits = [llc for llc in whole if len(llc) >= vcpus]
    if fits:
        chosen = [min(fits, key=len)]  # the smallest LLC that fits; the first on a tie
    else:
        chosen, total = [], 0
        for llc in sorted(whole, key=len, reverse=True):  # fewest LLCs: largest first
            chosen.append(llc)
            total += len(llc)
            if total >= vcpus:
                break
        else:
            return None
    return tuple(sorted(c for llc in chosen for c in llc))


def _check_vcpus(vcpus: int) -> None:
    if vcpus < 1:
        raise KtstrError(f"a reservation needs at least one vCPU, got {vcpus}")


def max_concurrent(vcpus: int, host: HostTopology, *, llc_aligned: bool = False) -> int:
    """How many runs of `vcpus` fit on `host` at once (0: an aligned run that never fits)."""
    _check_vcpus(vcpus)
    mode = Mode.LLC if llc_aligned else Mode.BUDGET
    free, count = set(host.cpus), 0
    while (pick := _pick(vcpus, mode, host, free)) is not None:
        count += 1
        free -= set(pick)
    return count


# --- lock files -----------------------------------------------------------------------------


class HolderRecord(TypedDict):
    """What a holder writes into each of its lock files (one JSON line)."""

    pid: int
    start: int  # clock ticks after boot (/proc/<pid>/stat): the pid, not a recycled one
    space: str  # boot and pid namespace the pid belongs to (reap.pid_space)
    since: float  # epoch seconds
    test: str
    mode: str
    vcpus: int


class HolderJson(TypedDict):
    """A held reservation in ``ktstr locks --json``."""

    cpus: list[int]
    pid: int
    mode: str | None
    vcpus: int
    test: str
    since: float | None
    held_s: float | None


@dataclass(frozen=True)
class Holder:
    """A held reservation as ``ktstr locks`` shows it: the CPUs whose lock is held now."""

    cpus: tuple[int, ...]
    pid: int
    test: str
    mode: Mode | None  # None: the record could not be read
    since: float | None
    vcpus: int

    def held_s(self, now: float | None = None) -> float | None:
        if self.since is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.since)

    def to_json(self, now: float | None = None) -> HolderJson:
        held = self.held_s(now)
        return HolderJson(cpus=list(self.cpus), pid=self.pid,
                          mode=self.mode.value if self.mode else None, vcpus=self.vcpus,
                          test=self.test, since=self.since,
                          held_s=None if held is None else round(held, 3))

    def describe(self) -> str:
        held = self.held_s()
        mode = self.mode.value if self.mode else "?"
        return (f"cpus {format_cpu_list(self.cpus)} by pid {self.pid} ({self.test}, {mode}, "
                f"for {'?' if held is None else f'{held:.0f}'} s)")


def _held_record(path: Path) -> str | None:
    """The record of `path` if its lock is held, else None.

    A file with a record but no lock holder is what a killed process left: it is
    emptied here (under the lock, so no new holder is writing), which is the
    only way this probe ever takes a lock; an empty file counts as free.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        content = os.pread(fd, RECORD_MAX, 0).decode("utf-8", "replace")
        if not content.strip():
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return content.partition("\n")[0]
        os.ftruncate(fd, 0)
        return None
    except OSError:
        return None
    finally:
        os.close(fd)  # drops the probe's lock, if it took one


def _holder(line: str, cpus: list[int]) -> Holder:
    try:
        rec = json.loads(line)
        return Holder(tuple(sorted(cpus)), int(rec["pid"]), str(rec["test"]),
                      Mode(rec["mode"]), float(rec["since"]), int(rec["vcpus"]))
    except (ValueError, KeyError, TypeError):
        return Holder(tuple(sorted(cpus)), 0, "?", None, None, 0)


def held_reservations(lock_dir: Path | None = None) -> list[Holder]:
    """Reservations held now, by their first CPU; what dead processes left is reclaimed."""
    directory = lock_dir if lock_dir is not None else default_lock_dir()
    by_record: dict[str, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            number = entry.name.removeprefix("cpu").removesuffix(".lock")
            if entry.name == f"cpu{number}.lock" and number.isdecimal():
                line = _held_record(Path(entry.path))
                if line is not None:
                    by_record.setdefault(line, []).append(int(number))
    return sorted((_holder(line, cpus) for line, cpus in by_record.items()),
                  key=lambda h: h.cpus)


def _unlock(fds: Iterable[int], *, clear: bool) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            if clear:
                os.ftruncate(fd, 0)
            # Explicitly: a forked copy of the fd would otherwise keep the lock.
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock_error(path: Path, err: OSError) -> KtstrError:
    return KtstrError(f"cannot lock {path}: {err.strerror or err}; CPU reservations need a "
                      "writable local directory with flock (set KTSTR_CACHE_DIR)")


def _try_lock(directory: Path, cpus: tuple[int, ...]) -> list[int] | None:
    """All of `cpus` locked (their fds), or None and none of them held."""
    fds: list[int] = []
    for cpu in cpus:
        path = lock_path(directory, cpu)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            _unlock(fds, clear=False)
            raise _lock_error(path, err) from None
        fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _unlock(fds, clear=False)
            return None
        except OSError as err:
            _unlock(fds, clear=False)
            raise _lock_error(path, err) from None
    return fds


# --- reservations ---------------------------------------------------------------------------


class ReservationRecord(TypedDict):
    """The reservation as the result sidecar keeps it."""

    mode: str
    vcpus: int
    cpus: list[int]
    llcs: list[int]
    host_cpus: int
    host_llcs: int
    waited_s: float


_live: weakref.WeakSet[Reservation] = weakref.WeakSet()


@dataclass(eq=False)
class Reservation:
    """Host CPUs held for one run until :meth:`release` (or the end of a ``with``)."""

    cpus: tuple[int, ...]
    llcs: tuple[int, ...]
    """Indices into ``host.llcs`` of the LLCs the CPUs lie in."""
    mode: Mode
    vcpus: int
    test: str
    waited_s: float
    host: HostTopology
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def release(self) -> None:
        fds, self._fds = self._fds, []
        _unlock(fds, clear=True)
        _live.discard(self)

    def _disown(self) -> None:
        """In a forked child: close this copy of the fds; the parent keeps the locks."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def to_record(self) -> ReservationRecord:
        return ReservationRecord(mode=self.mode.value, vcpus=self.vcpus, cpus=list(self.cpus),
                                 llcs=list(self.llcs), host_cpus=self.host.nr_cpus,
                                 host_llcs=len(self.host.llcs),
                                 waited_s=round(self.waited_s, 3))

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        # A reservation dropped without release() must not block every later run.
        if self._fds:
            with contextlib.suppress(Exception):  # at shutdown: the exit drops the locks
                self.release()


def _forget_after_fork() -> None:
    # A child (a worker, a helper that has not exec'd yet) must not keep the parent's CPUs
    # reserved after the parent dies; closing its copies leaves the parent's locks alone.
    for r in list(_live):
        r._disown()
    _live.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _want(vcpus: int, mode: Mode, host: HostTopology) -> str:
    if mode is Mode.BUDGET:
        return f"{min(vcpus, host.nr_cpus)} host CPUs (budget, {vcpus} vCPUs)"
    return f"whole LLCs for {vcpus} vCPUs (llc-aligned)"


def _holders_on(directory: Path, host: HostTopology) -> list[Holder]:
    return [h for h in held_reservations(directory) if set(h.cpus) & set(host.cpus)]


def _describe(holders: list[Holder]) -> str:
    return "; ".join(h.describe() for h in holders) or \
        "nothing now (the CPUs were busy while this run tried)"


def reserve(vcpus: int, *, test: str, llc_aligned: bool = False,
            wait_s: float = DEFAULT_WAIT_S, topology: HostTopology | None = None,
            lock_dir: Path | None = None,
            on_wait: Callable[[str], None] | None = None) -> Reservation:
    """Reserve host CPUs for a run of `vcpus` (test id `test`), waiting up to `wait_s`.

    Returns a held :class:`Reservation` (a context manager that releases it).
    `topology` defaults to :meth:`HostTopology.current`, `lock_dir` to
    ``<cache root>/locks``. `on_wait` gets one line, once, if the CPUs are busy.
    Raises :class:`ReservationTooLarge` at once for an aligned run bigger than
    the host, :class:`ReservationTimeout` when the wait runs out.
    """
    _check_vcpus(vcpus)
    host = topology if topology is not None else HostTopology.current()
    mode = Mode.LLC if llc_aligned else Mode.BUDGET
    if mode is Mode.LLC and vcpus > host.nr_cpus:
        raise ReservationTooLarge(
            f"a topology of {vcpus} vCPUs cannot be pinned LLC-aligned: this host has "
            f"{host.describe()}; use at most {host.nr_cpus} vCPUs or run without LLC alignment")
    directory = lock_dir if lock_dir is not None else default_lock_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _lock_error(directory, err) from None
    start = time.monotonic()
    deadline = start + wait_s
    delay = BACKOFF_MIN_S
    told = False
    while True:
        busy = {c for c in host.cpus if _held_record(lock_path(directory, c)) is not None}
        pick = _pick(vcpus, mode, host, set(host.cpus) - busy)
        fds = _try_lock(directory, pick) if pick is not None else None
        if pick is not None and fds is not None:
            return _hold(directory, fds, pick, mode, vcpus, test, time.monotonic() - start,
                         host)
        now = time.monotonic()
        if now >= deadline:
            holders = _holders_on(directory, host)
            raise ReservationTimeout(
                f"could not reserve {_want(vcpus, mode, host)} for {test} within {wait_s:g} s "
                f"on this host ({host.describe()}); held: {_describe(holders)}", holders)
        if on_wait is not None and not told:
            told = True
            on_wait(f"{test}: waiting up to {wait_s:g} s for {_want(vcpus, mode, host)}; "
                    f"held: {_describe(_holders_on(directory, host))}")
        time.sleep(min(delay * random.uniform(0.5, 1.5), deadline - now))
        delay = min(delay * 2, BACKOFF_MAX_S)


def _hold(directory: Path, fds: list[int], cpus: tuple[int, ...], mode: Mode, vcpus: int,
          test: str, waited_s: float, host: HostTopology) -> Reservation:
    r = Reservation(cpus, tuple(sorted({host.llc_of(c) for c in cpus})), mode, vcpus, test,
                    waited_s, host, fds)
    _live.add(r)
    try:
        me = reap.me()
        record = HolderRecord(pid=me.pid, start=me.start, space=me.space, since=time.time(),
                              test=test, mode=mode.value, vcpus=vcpus)
        data = (json.dumps(record) + "\n").encode()
        for fd in fds:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
    except OSError as err:
        r.release()
        raise _lock_error(directory, err) from None
    return r
