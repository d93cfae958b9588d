"""Telemetry records (JSON-serialisable: they travel from guest to host) and their math."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# ---- math (pure) --------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> float:
    """max - min (0 for fewer than two values)."""
    return max(values) - min(values) if len(values) > 1 else 0.0


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population standard deviation / mean; 0 when the mean is 0 or there is one value."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    if mean == 0:
        return 0.0
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean


def max_gap(checkpoints: Sequence[float], start: float, end: float) -> float:
    """Longest interval without a checkpoint in [start, end] (start and end count as edges)."""
    edges = [start, *sorted(c for c in checkpoints if start <= c <= end), end]
    return max(b - a for a, b in itertools.pairwise(edges))


def off_cpu_pct(wall_ns: int, cpu_ns: int) -> float:
    """Share of wall time the worker was not on a CPU, in percent (clamped to 0-100)."""
    if wall_ns <= 0:
        return 0.0
    return min(100.0, max(0.0, (wall_ns - cpu_ns) * 100.0 / wall_ns))


# ---- records -------------------------------------------------------------------


def known_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data``'s entries that are fields of the dataclass ``cls`` (newer ones dropped)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class LatencySummary:
    """Wake latencies in microseconds: ``count`` wakeups in all, percentiles over the
    samples kept (a worker keeps its most recent ``LAT_CAP``)."""

    count: int = 0
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0

    @classmethod
    def from_ns(cls, samples_ns: Sequence[int], max_ns: int = 0,
                count: int | None = None) -> LatencySummary:
        if not samples_ns:
            return cls()
        us = [s / 1000.0 for s in samples_ns]
        return cls(
            count=max(len(us), count or 0),
            p50_us=percentile(us, 50),
            p99_us=percentile(us, 99),
            max_us=max(max(us), max_ns / 1000.0),
        )


@dataclass
class WorkerStats:
    """What one worker process did, from its own counters and the kernel's."""

    cgroup: str
    index: int
    pid: int
    work: str
    policy: str = "normal"
    nice: int = 0
    work_units: int = 0
    wall_ns: int = 0
    cpu_ns: int = 0
    """On-CPU time (/proc/<pid>/schedstat field 1)."""
    run_delay_ns: int = 0
    """Time runnable but waiting on a run queue (schedstat field 2)."""
    timeslices: int = 0
    voluntary_switches: int = 0
    involuntary_switches: int = 0
    cpus_used: list[int] = field(default_factory=list)
    migrations: int = 0
    """Kernel count (se.nr_migrations in /proc/<pid>/sched) when available, else sampled."""
    sampled_migrations: int = 0
    """CPU changes seen by sampling sched_getcpu() about every millisecond of work."""
    cross_node_migrations: int = 0
    """Sampled moves between CPUs of different NUMA nodes."""
    max_gap_ms: float = 0.0
    off_cpu_pct: float = 0.0
    """Share of the measurement window off-CPU: from when the step that spawned the
    worker finished its ops (all its siblings forked) to the snapshot."""
    window_cpu_ns: int | None = None
    """On-CPU time inside that window (None: no window opened, e.g. records made before
    it existed): what siblings that all competed are compared on."""
    wake_latency: LatencySummary | None = None
    allowed_cpus: list[int] = field(default_factory=list)
    """Where the worker was allowed to run at the end (cpuset, narrowed by its affinity)."""
    isolation_violations: list[int] = field(default_factory=list)
    """CPUs the worker was seen on while they were outside its allowed set."""
    error: str | None = None

    @property
    def work_rate(self) -> float:
        """Work units per second of wall time."""
        return self.work_units * 1e9 / self.wall_ns if self.wall_ns else 0.0

    @property
    def cpu_share(self) -> float:
        """On-CPU fraction of wall time (0-1)."""
        return self.cpu_ns / self.wall_ns if self.wall_ns else 0.0

    @property
    def label(self) -> str:
        return f"{self.cgroup}[{self.index}] pid {self.pid}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["work_rate"] = round(self.work_rate, 3)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerStats:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("wake_latency") is not None:
            kwargs["wake_latency"] = LatencySummary(**kwargs["wake_latency"])
        return cls(**kwargs)


@dataclass
class CgroupStats:
    """Aggregates over the workers that ended in one cgroup."""

    name: str
    cpus: list[int]
    workers: int
    work_units: int
    cpu_ns: int
    off_cpu_pct_min: float
    off_cpu_pct_max: float
    off_cpu_spread: float
    throughput_cv: float
    max_gap_ms: float
    migrations: int
    wake_p99_us: float | None
    wall_ns: int = 0
    """The longest-lived worker's wall time: how long the cgroup had work."""
    controls: str = ""
    """Its controller settings at the end, as ``CgroupControls.describe`` says them."""
    weight: int = 100
    """Its effective ``cpu.weight`` (100 when unset)."""
    weight_set: bool = False
    """A ``cpu.weight`` or ``cpu.weight.nice`` was declared for it (even the default)."""
    cpu_max_cpus: float | None = None
    """Its ``cpu.max`` limit in CPUs (None: no limit)."""
    cpu_max_period_us: int | None = None
    """That limit's period (None: no limit)."""
    frozen_ms: float = 0.0
    """Its longest freeze (cgroup.freeze) during the run."""
    cpu_stat: dict[str, int] = field(default_factory=dict)
    """The kernel's ``cpu.stat`` counters for it (usage, nr_throttled, throttled_usec)."""
    window_cpu_ns: int = 0
    """Its workers' on-CPU time inside their measurement windows (``cpu_ns`` for a worker
    without one): the fork of later siblings does not count for the first ones."""

    @property
    def cpus_busy(self) -> float:
        """CPUs' worth of time its workers ran: cpu time over the cgroup's wall time."""
        return self.cpu_ns / self.wall_ns if self.wall_ns > 0 else 0.0

    @classmethod
    def aggregate(
        cls, name: str, cpus: Sequence[int], workers: Sequence[WorkerStats], *,
        controls: str = "", weight: int | None = None, cpu_max_cpus: float | None = None,
        cpu_max_period_us: int | None = None, frozen_ms: float = 0.0,
        cpu_stat: Mapping[str, int] | None = None,
    ) -> CgroupStats:
        """The cgroup's record, whole: its workers' aggregates and its controller settings.

        ``weight`` None means no weight was declared (the record says 100, unset).
        """
        off = [w.off_cpu_pct for w in workers]
        p99 = [w.wake_latency.p99_us for w in workers if w.wake_latency and w.wake_latency.count]
        return cls(
            name=name,
            cpus=sorted(cpus),
            workers=len(workers),
            work_units=sum(w.work_units for w in workers),
            cpu_ns=sum(w.cpu_ns for w in workers),
            window_cpu_ns=sum(w.cpu_ns if w.window_cpu_ns is None else w.window_cpu_ns
                              for w in workers),
            off_cpu_pct_min=min(off) if off else 0.0,
            off_cpu_pct_max=max(off) if off else 0.0,
            off_cpu_spread=spread(off),
            throughput_cv=coefficient_of_variation([w.work_rate for w in workers]),
            max_gap_ms=max((w.max_gap_ms for w in workers), default=0.0),
            migrations=sum(w.migrations for w in workers),
            wake_p99_us=max(p99) if p99 else None,
            wall_ns=max((w.wall_ns for w in workers), default=0),
            controls=controls,
            weight=100 if weight is None else weight,
            weight_set=weight is not None,
            cpu_max_cpus=cpu_max_cpus,
            cpu_max_period_us=cpu_max_period_us if cpu_max_cpus is not None else None,
            frozen_ms=frozen_ms,
            cpu_stat=dict(cpu_stat or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PayloadResult:
    """One payload run: how it ended and what its parser read."""

    label: str
    name: str
    argv: list[str]
    exit_code: int | None
    """None: it was killed (KillPayload, its timeout, or the scenario's end)."""
    duration_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    output_tail: str = ""
    error: str | None = None
    killed_by: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PayloadResult:
        return cls(**known_fields(cls, data))


@dataclass
class PhaseStats:
    """One stretch of a scenario under one scheduler (scheduler lifecycle ops start a new one)."""

    index: int
    scheduler: str
    """The sched_ext ops name attached during the phase, or ``kernel`` (EEVDF)."""
    start_s: float
    end_s: float
    work_units: int
    cpu_ns: int
    cgroup_units: dict[str, int] = field(default_factory=dict)
    sched_state: dict[str, Any] = field(default_factory=dict)
    """sched_ext's sysfs state when the phase began."""
    started_by: str = ""
    """The op that began it (empty for the first phase)."""

    @property
    def work_rate(self) -> float:
        span = self.end_s - self.start_s
        return self.work_units / span if span > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "work_rate": round(self.work_rate, 3)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhaseStats:
        return cls(**known_fields(cls, data))


@dataclass
class Overhead:
    """What the harness and the host took from the workers during the scenario."""

    harness_cpu_ms: float = 0.0
    """CPU time of the guest harness process (sampling, spawning, stopping workers)."""
    harness_cpu_pct: float = 0.0
    """The same as a share of one CPU over the scenario's wall time."""
    steal_pct: dict[int, float] = field(default_factory=dict)
    """Per guest CPU: share of its time the host ran something else (/proc/stat steal)."""
    harness_pid: int = 0

    @property
    def max_steal_pct(self) -> float:
        return max(self.steal_pct.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steal_pct"] = {str(k): v for k, v in self.steal_pct.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Overhead:
        kwargs = known_fields(cls, data)
        steal = dict(data.get("steal_pct") or {})
        kwargs["steal_pct"] = {int(k): float(v) for k, v in steal.items()}
        return cls(**kwargs)


@dataclass
class ScenarioResult:
    """Everything one scenario run measured."""

    name: str
    topology: str
    duration_s: float
    workers: list[WorkerStats] = field(default_factory=list)
    cgroups: list[CgroupStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    """CheckResult dicts from :func:`ktstr.checks.evaluate`."""
    passed: bool | None = None
    phases: list[PhaseStats] = field(default_factory=list)
    """Set when the scenario attached or detached schedulers: one entry per phase."""
    payloads: list[PayloadResult] = field(default_factory=list)
    """Every payload run (hackbench, cyclictest, ...), with the metrics it produced."""
    overhead: Overhead | None = None

    def worker(self, cgroup: str, index: int) -> WorkerStats:
        for w in self.workers:
            if w.cgroup == cgroup and w.index == index:
                return w
        raise KeyError(f"{cgroup}[{index}]")

    def cgroup(self, name: str) -> CgroupStats:
        for c in self.cgroups:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": list(self.checks),
            "name": self.name,
            "topology": self.topology,
            "duration_s": round(self.duration_s, 3),
            "cgroups": [c.to_dict() for c in self.cgroups],
            "workers": [w.to_dict() for w in self.workers],
            "notes": list(self.notes),
            **({"phases": [p.to_dict() for p in self.phases]} if self.phases else {}),
            **({"payloads": [p.to_dict() for p in self.payloads]} if self.payloads else {}),
            **({"overhead": self.overhead.to_dict()} if self.overhead else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScenarioResult:
        return cls(
            name=data["name"],
            topology=data["topology"],
            duration_s=data["duration_s"],
            workers=[WorkerStats.from_dict(w) for w in data.get("workers", [])],
            cgroups=[CgroupStats(**known_fields(CgroupStats, c)) for c in data.get("cgroups", [])],
            notes=list(data.get("notes", [])),
            checks=list(data.get("checks", [])),
            passed=data.get("passed"),
            phases=[PhaseStats.from_dict(p) for p in data.get("phases", [])],
            payloads=[PayloadResult.from_dict(p) for p in data.get("payloads", [])],
            overhead=Overhead.from_dict(data["overhead"]) if data.get("overhead") else None,
        )


def telemetry_of(value: object) -> dict[str, Any]:
    """The ScenarioResult dict inside what a scenario returned: the value itself, or one
    under ``telemetry``/``scenario``/``result`` (a wrapper); empty when there is none."""
    if not isinstance(value, Mapping):
        return {}
    for key in ("telemetry", "scenario", "result"):
        inner = value.get(key)
        if isinstance(inner, Mapping) and ("workers" in inner or "cgroups" in inner):
            return dict(inner)
    return dict(value) if ("workers" in value or "cgroups" in value) else {}
