"""The scenario vocabulary: cgroup definitions, cpuset specs, affinities, ops, steps.

All of it is plain frozen data; :mod:`ktstr.scenario.cpuset` resolves specs
against a topology and :mod:`ktstr.scenario.runner` carries the ops out.
Cgroup names are paths relative to the scenario's cgroup root; a nested
cgroup is named ``parent/child``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ktstr.cpulist import format_cpu_list, parse_cpu_list
from ktstr.errors import KtstrError
from ktstr.scenario.controls import CgroupControls
from ktstr.scenario.payload import Payload
from ktstr.scenario.work import CpuSpin, Work

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise KtstrError(
            f"cgroup name {name!r}: use letters, digits, '_', '-', '.', and '/' for nesting"
        )
    return name


class CpusetKind(enum.Enum):
    ALL = "all"
    LLC = "llc"
    NUMA = "numa"
    RANGE = "range"
    DISJOINT = "disjoint"
    OVERLAP = "overlap"
    EXACT = "exact"


@dataclass(frozen=True)
class CpusetSpec:
    """Which CPUs a cgroup may use, relative to its parent's CPUs.

    ``range`` takes fractions of the parent's CPU list (``start`` inclusive,
    ``end`` exclusive); ``disjoint(i, n)`` is the i-th of n equal slices;
    ``overlap(i, n, frac)`` is that slice widened by ``frac`` of a slice on
    each side, so neighbours share CPUs. ``llc``/``numa``/``exact`` name
    topology CPUs and must lie inside the parent's CPUs.
    """

    kind: CpusetKind = CpusetKind.ALL
    index: int = 0
    count: int = 1
    start: float = 0.0
    end: float = 1.0
    overlap_frac: float = 0.5
    cpus: tuple[int, ...] = ()

    @classmethod
    def all(cls) -> CpusetSpec:
        return cls(CpusetKind.ALL)

    @classmethod
    def llc(cls, index: int) -> CpusetSpec:
        return cls(CpusetKind.LLC, index=index)

    @classmethod
    def numa(cls, node: int) -> CpusetSpec:
        return cls(CpusetKind.NUMA, index=node)

    @classmethod
    def range(cls, start: float, end: float) -> CpusetSpec:
        return cls(CpusetKind.RANGE, start=start, end=end)

    @classmethod
    def disjoint(cls, index: int, count: int) -> CpusetSpec:
        return cls(CpusetKind.DISJOINT, index=index, count=count)

    @classmethod
    def overlap(cls, index: int, count: int, frac: float = 0.5) -> CpusetSpec:
        return cls(CpusetKind.OVERLAP, index=index, count=count, overlap_frac=frac)

    @classmethod
    def exact(cls, cpus: Sequence[int] | str) -> CpusetSpec:
        cpus = tuple(parse_cpu_list(cpus) if isinstance(cpus, str) else sorted(set(cpus)))
        return cls(CpusetKind.EXACT, cpus=cpus)

    @classmethod
    def parse(cls, text: str) -> CpusetSpec:
        """``all``, ``llc:1``, ``numa:0``, ``range:0-0.5``, ``disjoint:1/4``,
        ``overlap:1/4[@0.5]``, ``exact:0,2-3``."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "all" and not arg:
                return cls.all()
            if kind == "llc":
                return cls.llc(int(arg))
            if kind == "numa":
                return cls.numa(int(arg))
            if kind == "range":
                lo, hi = arg.split("-", 1)
                return cls.range(float(lo), float(hi))
            if kind in ("disjoint", "overlap"):
                body, _, frac = arg.partition("@")
                i, n = body.split("/", 1)
                if kind == "disjoint":
                    return cls.disjoint(int(i), int(n))
                return cls.overlap(int(i), int(n), float(frac) if frac else 0.5)
            if kind == "exact":
                return cls.exact(arg)
        except ValueError:
            pass
        raise KtstrError(
            f"cpuset spec {text!r}: expected all, llc:I, numa:I, range:A-B (fractions), "
            "disjoint:I/N, overlap:I/N[@F] or exact:CPULIST"
        )

    def describe(self) -> str:
        k = self.kind
        if k is CpusetKind.ALL:
            return "all"
        if k in (CpusetKind.LLC, CpusetKind.NUMA):
            return f"{k.value}:{self.index}"
        if k is CpusetKind.RANGE:
            return f"range:{self.start:g}-{self.end:g}"
        if k is CpusetKind.DISJOINT:
            return f"disjoint:{self.index}/{self.count}"
        if k is CpusetKind.OVERLAP:
            return f"overlap:{self.index}/{self.count}@{self.overlap_frac:g}"
        return f"exact:{format_cpu_list(self.cpus)}"


class PolicyKind(enum.Enum):
    NORMAL = "normal"
    BATCH = "batch"
    IDLE = "idle"
    FIFO = "fifo"
    RR = "rr"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class SchedPolicy:
    """A scheduling class; ``priority`` (1-99) only for FIFO/RR; ``runtime_ns``,
    ``deadline_ns``, ``period_ns`` only for DEADLINE (0 < runtime <= deadline <= period).

    The worker applies DEADLINE with sched_setattr; a refusal by the kernel (EPERM,
    EBUSY, EINVAL) is that worker's error in the telemetry, not a crash.
    """

    kind: PolicyKind = PolicyKind.NORMAL
    priority: int = 0
    runtime_ns: int = 0
    deadline_ns: int = 0
    period_ns: int = 0

    def __post_init__(self) -> None:
        if self.realtime and not 1 <= self.priority <= 99:
            raise KtstrError(
                f"sched policy {self.kind.value}: priority must be 1-99, got {self.priority}"
            )
        if not self.realtime and self.priority:
            raise KtstrError(f"sched policy {self.kind.value} takes no priority")
        times = (self.runtime_ns, self.deadline_ns, self.period_ns)
        if self.kind is not PolicyKind.DEADLINE:
            if any(times):
                raise KtstrError(
                    f"sched policy {self.kind.value} takes no runtime/deadline/period"
                )
            return
        if min(times) <= 0 or not self.runtime_ns <= self.deadline_ns <= self.period_ns:
            raise KtstrError(
                "sched policy deadline: needs 0 < runtime <= deadline <= period, got "
                f"runtime {self.runtime_ns} ns, deadline {self.deadline_ns} ns, period "
                f"{self.period_ns} ns"
            )
        if self.period_ns >= 1 << 63:
            raise KtstrError(f"sched policy deadline: period {self.period_ns} ns is too long")

    @property
    def realtime(self) -> bool:
        return self.kind in (PolicyKind.FIFO, PolicyKind.RR)

    @classmethod
    def normal(cls) -> SchedPolicy:
        return cls()

    @classmethod
    def batch(cls) -> SchedPolicy:
        return cls(PolicyKind.BATCH)

    @classmethod
    def idle(cls) -> SchedPolicy:
        return cls(PolicyKind.IDLE)

    @classmethod
    def fifo(cls, priority: int = 1) -> SchedPolicy:
        return cls(PolicyKind.FIFO, priority)

    @classmethod
    def rr(cls, priority: int = 1) -> SchedPolicy:
        return cls(PolicyKind.RR, priority)

    @classmethod
    def deadline(
        cls, runtime_us: float, deadline_us: float, period_us: float | None = None
    ) -> SchedPolicy:
        """SCHED_DEADLINE, times in microseconds; the period defaults to the deadline."""
        period = deadline_us if period_us is None else period_us
        return cls(PolicyKind.DEADLINE, runtime_ns=round(runtime_us * 1000),
                   deadline_ns=round(deadline_us * 1000), period_ns=round(period * 1000))

    @property
    def deadline_params(self) -> tuple[int, int, int] | None:
        """(runtime, deadline, period) in ns for DEADLINE, else None."""
        if self.kind is not PolicyKind.DEADLINE:
            return None
        return self.runtime_ns, self.deadline_ns, self.period_ns

    def describe(self) -> str:
        if self.kind is PolicyKind.DEADLINE:
            return (f"deadline:{self.runtime_ns / 1000:g}/{self.deadline_ns / 1000:g}/"
                    f"{self.period_ns / 1000:g}us")
        return f"{self.kind.value}:{self.priority}" if self.realtime else self.kind.value


class AffinityKind(enum.Enum):
    INHERIT = "inherit"
    RANDOM = "random"
    LLC_ALIGNED = "llc"
    SINGLE = "single"
    EXACT = "exact"


@dataclass(frozen=True)
class Affinity:
    """Per-worker CPU affinity inside the cgroup's cpuset.

    ``random(k)``: each worker gets k random CPUs of the cpuset;
    ``llc_aligned()``: each worker gets the cpuset's CPUs of one LLC (round
    robin); ``single(cpu)``: one CPU (``None`` = round robin over the cpuset);
    ``exact(cpus)``: a fixed set.
    """

    kind: AffinityKind = AffinityKind.INHERIT
    count: int = 1
    cpu: int | None = None
    cpus: tuple[int, ...] = ()

    @classmethod
    def inherit(cls) -> Affinity:
        return cls()

    @classmethod
    def random(cls, count: int = 1) -> Affinity:
        if count < 1:
            raise KtstrError(f"affinity random: count must be >= 1, got {count}")
        return cls(AffinityKind.RANDOM, count=count)

    @classmethod
    def llc_aligned(cls) -> Affinity:
        return cls(AffinityKind.LLC_ALIGNED)

    @classmethod
    def single(cls, cpu: int | None = None) -> Affinity:
        return cls(AffinityKind.SINGLE, cpu=cpu)

    @classmethod
    def exact(cls, cpus: Sequence[int] | str) -> Affinity:
        cpus = tuple(parse_cpu_list(cpus) if isinstance(cpus, str) else sorted(set(cpus)))
        return cls(AffinityKind.EXACT, cpus=cpus)

    def describe(self) -> str:
        if self.kind is AffinityKind.RANDOM:
            return f"random:{self.count}"
        if self.kind is AffinityKind.SINGLE:
            return f"single:{'rr' if self.cpu is None else self.cpu}"
        if self.kind is AffinityKind.EXACT:
            return f"exact:{format_cpu_list(self.cpus)}"
        return self.kind.value


@dataclass(frozen=True)
class CgroupDef:
    """A cgroup and the workers that run in it.

    ``cpuset=None`` leaves the cpuset unset (the cgroup uses its parent's
    CPUs). ``children`` are created inside this cgroup, named
    ``<name>/<child.name>``. ``controls`` are its controller files (cpu.weight,
    cpu.max, ...). ``workers_pct``, if set, replaces ``workers``: that percentage
    of the cgroup's CPUs, rounded up, at least one.
    """

    name: str
    cpuset: CpusetSpec | None = None
    workers: int = 1
    work: Work = field(default_factory=CpuSpin)
    policy: SchedPolicy = field(default_factory=SchedPolicy)
    nice: int = 0
    affinity: Affinity = field(default_factory=Affinity)
    children: tuple[CgroupDef, ...] = ()
    controls: CgroupControls = field(default_factory=CgroupControls)
    workers_pct: float | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.workers < 0:
            raise KtstrError(f"cgroup {self.name}: workers must be >= 0, got {self.workers}")
        if self.workers_pct is not None and not 0 < self.workers_pct <= 1000:
            raise KtstrError(
                f"cgroup {self.name}: workers_pct must be in (0, 1000], got {self.workers_pct}"
            )
        if not isinstance(self.controls, CgroupControls):
            raise KtstrError(f"cgroup {self.name}: controls must be a CgroupControls")
        if not -20 <= self.nice <= 19:
            raise KtstrError(f"cgroup {self.name}: nice must be -20..19, got {self.nice}")
        if not isinstance(self.children, tuple):
            object.__setattr__(self, "children", tuple(self.children))

    def flatten(self, prefix: str = "") -> list[tuple[str, CgroupDef]]:
        """(full name, def) for this cgroup and its descendants, parents first."""
        full = f"{prefix}/{self.name}" if prefix else self.name
        out = [(full, self)]
        for child in self.children:
            out.extend(child.flatten(full))
        return out

    def worker_count(self, nr_cpus: int) -> int:
        """Workers to start on a cgroup of ``nr_cpus`` CPUs."""
        if self.workers_pct is None:
            return self.workers
        return max(1, math.ceil(nr_cpus * self.workers_pct / 100 - 1e-9))


# ---- ops ---------------------------------------------------------------------


@dataclass(frozen=True)
class AddCgroup:
    """Create a cgroup (and its children) and start its workers."""

    cgroup: CgroupDef
    parent: str = ""


@dataclass(frozen=True)
class RemoveCgroup:
    """Stop a cgroup's workers (and its descendants') and remove it."""

    name: str


@dataclass(frozen=True)
class SetCpuset:
    name: str
    cpuset: CpusetSpec


@dataclass(frozen=True)
class ClearCpuset:
    """Unset the cpuset: the cgroup goes back to its parent's CPUs."""

    name: str


@dataclass(frozen=True)
class SwapCpusets:
    a: str
    b: str


@dataclass(frozen=True)
class Spawn:
    """Start more workers in an existing cgroup (``work=None``: the cgroup's work)."""

    name: str
    workers: int = 1
    work: Work | None = None


@dataclass(frozen=True)
class StopCgroup:
    """Stop the cgroup's workers; the cgroup itself stays."""

    name: str


@dataclass(frozen=True)
class MoveAllTasks:
    """Move every worker of ``src`` into ``dst`` (they then belong to ``dst``)."""

    src: str
    dst: str


@dataclass(frozen=True)
class SetAffinity:
    name: str
    affinity: Affinity


@dataclass(frozen=True)
class SetControls:
    """Change a cgroup's controller files; the fields ``controls`` leaves None stay."""

    name: str
    controls: CgroupControls


@dataclass(frozen=True)
class FreezeCgroup:
    """Freeze every task below the cgroup (cgroup.freeze; v1 freezer.state)."""

    name: str


@dataclass(frozen=True)
class UnfreezeCgroup:
    name: str


@dataclass(frozen=True)
class CaptureCgroupProcs:
    """Record which pids the cgroup (and its descendants) holds now, in the result's notes."""

    name: str


@dataclass(frozen=True)
class DetachScheduler:
    """Stop the scheduler under test: the kernel's own scheduler takes over (a new phase)."""


@dataclass(frozen=True)
class AttachScheduler:
    """Start the run's scheduler again (``args``, if given, replace its flags): a new phase."""

    args: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_args(self.args)


@dataclass(frozen=True)
class RestartScheduler:
    """Detach and attach the same scheduler, as it was: a new phase."""


@dataclass(frozen=True)
class ReplaceScheduler:
    """Detach, then attach ``binary`` (a guest path; None: the run's) with ``args`` (None:
    its own flags): a new phase."""

    binary: str | None = None
    args: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_args(self.args)
        if self.binary is None and self.args is None:
            raise KtstrError("ReplaceScheduler: give a binary or args (RestartScheduler "
                             "restarts the scheduler as it was)")


def _check_args(args: tuple[str, ...] | None) -> None:
    if args is not None and not (isinstance(args, tuple)
                                 and all(isinstance(a, str) for a in args)):
        raise KtstrError(f"scheduler args must be a tuple of strings, got {args!r}")


SchedulerOp = DetachScheduler | AttachScheduler | RestartScheduler | ReplaceScheduler


@dataclass(frozen=True)
class RunPayload:
    """Start ``payload`` (in cgroup ``cgroup`` if given: its cpuset and controls apply).

    ``label`` names this run for WaitPayload/KillPayload (default: the payload's name);
    ``wait=True`` blocks until it ends. One still running when the scenario ends is
    killed and reported so.
    """

    payload: Payload
    label: str = ""
    cgroup: str | None = None
    wait: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.payload, Payload):
            raise KtstrError(f"RunPayload takes a Payload, not {type(self.payload).__name__}")
        if self.label:
            check_name(self.label)

    @property
    def name(self) -> str:
        return self.label or self.payload.name


@dataclass(frozen=True)
class WaitPayload:
    """Wait for a running payload to end (up to its own timeout) and read its metrics."""

    label: str


@dataclass(frozen=True)
class KillPayload:
    label: str


PayloadOp = RunPayload | WaitPayload | KillPayload

Op = AddCgroup | RemoveCgroup | SetCpuset | ClearCpuset | SwapCpusets | Spawn | StopCgroup | \
    MoveAllTasks | SetAffinity | SetControls | FreezeCgroup | UnfreezeCgroup | \
    CaptureCgroupProcs | SchedulerOp | PayloadOp


@dataclass(frozen=True)
class Step:
    """Apply ``ops``, then hold.

    ``hold`` is a fraction of the scenario duration; ``hold_s`` (if set) is a
    fixed number of seconds and wins over ``hold``.
    """

    ops: tuple[Op, ...] = ()
    hold: float = 1.0
    hold_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ops, tuple):
            object.__setattr__(self, "ops", tuple(self.ops))
        if self.hold < 0 or (self.hold_s is not None and self.hold_s < 0):
            raise KtstrError("step hold must be >= 0")

    def hold_seconds(self, duration: float) -> float:
        return self.hold_s if self.hold_s is not None else self.hold * duration
