"""Cgroup controls a scenario sets: CPU weight, bandwidth, idle, uclamp, memory limit.

Plain frozen data plus pure encoders that say which file gets which text, for
cgroup v2 and for v1 (where each controller is its own hierarchy and the
names differ: ``cpu.shares``, ``cpu.cfs_quota_us``, ``memory.limit_in_bytes``).
Validated at construction, so a bad value fails before any VM boots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ktstr.errors import KtstrError

WEIGHT_MIN, WEIGHT_MAX, WEIGHT_DEFAULT = 1, 10000, 100
"""cgroup v2 ``cpu.weight`` range (CGROUP_WEIGHT_MIN/MAX/DFL)."""
PERIOD_MIN_US, PERIOD_MAX_US = 1000, 1_000_000
"""The kernel refuses a bandwidth period outside 1 ms .. 1 s."""
QUOTA_MIN_US = 1000

# The kernel's nice-to-load-weight table (sched_prio_to_weight), nice -20 .. 19.
_PRIO_TO_WEIGHT = (
    88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916,
    9548, 7620, 6100, 4904, 3906, 3121, 2501, 1991, 1586, 1277,
    1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
    110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
)

CONFIG_OF_FILE = {
    "cpu.weight": "CONFIG_FAIR_GROUP_SCHED",
    "cpu.weight.nice": "CONFIG_FAIR_GROUP_SCHED",
    "cpu.shares": "CONFIG_FAIR_GROUP_SCHED",
    "cpu.idle": "CONFIG_FAIR_GROUP_SCHED",
    "cpu.max": "CONFIG_CFS_BANDWIDTH",
    "cpu.cfs_quota_us": "CONFIG_CFS_BANDWIDTH",
    "cpu.cfs_period_us": "CONFIG_CFS_BANDWIDTH",
    "cpu.uclamp.min": "CONFIG_UCLAMP_TASK_GROUP",
    "cpu.uclamp.max": "CONFIG_UCLAMP_TASK_GROUP",
    "memory.max": "CONFIG_MEMCG",
    "memory.limit_in_bytes": "CONFIG_MEMCG",
}
"""The kernel option that provides each control file (for the error when one is missing)."""


def nice_to_weight(nice: int) -> int:
    """The ``cpu.weight`` equivalent of a nice value (what ``cpu.weight.nice`` sets)."""
    return max(WEIGHT_MIN, round(_PRIO_TO_WEIGHT[nice + 20] * WEIGHT_DEFAULT / 1024))


@dataclass(frozen=True)
class CpuMax:
    """``cpu.max``: at most ``quota_us`` of CPU time per ``period_us`` (None: no limit)."""

    quota_us: int | None
    period_us: int = 100_000

    def __post_init__(self) -> None:
        if not PERIOD_MIN_US <= self.period_us <= PERIOD_MAX_US:
            raise KtstrError(
                f"cpu.max: period must be {PERIOD_MIN_US}..{PERIOD_MAX_US} us, "
                f"got {self.period_us}"
            )
        if self.quota_us is not None and self.quota_us < QUOTA_MIN_US:
            raise KtstrError(
                f"cpu.max: quota must be >= {QUOTA_MIN_US} us (or None for no limit), "
                f"got {self.quota_us}"
            )

    @classmethod
    def cpus(cls, cpus: float, period_us: int = 100_000) -> CpuMax:
        """A limit of ``cpus`` CPUs' worth of time (0.5 = half of one CPU)."""
        if not math.isfinite(cpus) or cpus <= 0:
            raise KtstrError(f"cpu.max: CPUs must be > 0, got {cpus}")
        return cls(max(QUOTA_MIN_US, round(cpus * period_us)), period_us)

    @property
    def limit_cpus(self) -> float | None:
        return None if self.quota_us is None else self.quota_us / self.period_us

    def describe(self) -> str:
        if self.quota_us is None:
            return f"max/{self.period_us}us"
        return f"{self.limit_cpus:g}cpu({self.quota_us}/{self.period_us}us)"


@dataclass(frozen=True)
class CgroupControls:
    """What a cgroup's controller files say; None leaves a file at the kernel's default.

    ``weight`` is ``cpu.weight`` (1..10000, default 100); ``weight_nice`` the
    nice-style ``cpu.weight.nice`` (-20..19; one of the two). ``uclamp_*`` are
    percentages. ``memory_max`` is in bytes.
    """

    weight: int | None = None
    weight_nice: int | None = None
    cpu_max: CpuMax | None = None
    idle: bool | None = None
    uclamp_min: float | None = None
    uclamp_max: float | None = None
    memory_max: int | None = None

    def __post_init__(self) -> None:
        if self.weight is not None and not WEIGHT_MIN <= self.weight <= WEIGHT_MAX:
            raise KtstrError(
                f"cpu.weight must be {WEIGHT_MIN}..{WEIGHT_MAX}, got {self.weight}"
            )
        if self.weight_nice is not None:
            if self.weight is not None:
                raise KtstrError("give cpu.weight or cpu.weight.nice, not both")
            if not -20 <= self.weight_nice <= 19:
                raise KtstrError(f"cpu.weight.nice must be -20..19, got {self.weight_nice}")
        for name in ("uclamp_min", "uclamp_max"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 100):
                raise KtstrError(f"cpu.{name.replace('_', '.')} must be 0..100 %, got {value}")
        if (self.uclamp_min is not None and self.uclamp_max is not None
                and self.uclamp_min > self.uclamp_max):
            raise KtstrError(
                f"cpu.uclamp.min {self.uclamp_min} is above cpu.uclamp.max {self.uclamp_max}"
            )
        if self.memory_max is not None and self.memory_max < 1 << 20:
            raise KtstrError(f"memory.max must be >= 1 MiB, got {self.memory_max} bytes")

    def merged(self, newer: CgroupControls) -> CgroupControls:
        """These controls with every field ``newer`` sets replaced."""
        changes = {f.name: getattr(newer, f.name) for f in fields(newer)
                   if getattr(newer, f.name) is not None}
        # The two weights are one setting: the newer one replaces the other.
        if newer.weight is not None:
            changes["weight_nice"] = None
        elif newer.weight_nice is not None:
            changes["weight"] = None
        return replace(self, **changes)

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    @property
    def weight_declared(self) -> bool:
        """``cpu.weight`` or ``cpu.weight.nice`` is set (even to the default)."""
        return self.weight is not None or self.weight_nice is not None

    @property
    def effective_weight(self) -> int:
        """The ``cpu.weight`` these controls give the cgroup (the default when unset)."""
        if self.weight is not None:
            return self.weight
        if self.weight_nice is not None:
            return nice_to_weight(self.weight_nice)
        return WEIGHT_DEFAULT

    def describe(self) -> str:
        parts = []
        if self.weight is not None:
            parts.append(f"weight={self.weight}")
        if self.weight_nice is not None:
            parts.append(f"weight.nice={self.weight_nice}")
        if self.cpu_max is not None:
            parts.append(f"cpu.max={self.cpu_max.describe()}")
        if self.idle is not None:
            parts.append(f"idle={int(self.idle)}")
        if self.uclamp_min is not None:
            parts.append(f"uclamp.min={self.uclamp_min:g}")
        if self.uclamp_max is not None:
            parts.append(f"uclamp.max={self.uclamp_max:g}")
        if self.memory_max is not None:
            parts.append(f"memory.max={self.memory_max}")
        return " ".join(parts)


@dataclass(frozen=True)
class ControlWrite:
    """Write ``value`` to ``file`` of the ``controller`` hierarchy (v1) or the cgroup (v2)."""

    controller: str
    file: str
    value: str


def _uclamp(value: float) -> str:
    return f"{value:.2f}"


def _idle_and_uclamp(c: CgroupControls) -> list[ControlWrite]:
    """The files v1 and v2 spell alike."""
    out = []
    if c.idle is not None:
        out.append(ControlWrite("cpu", "cpu.idle", str(int(c.idle))))
    if c.uclamp_min is not None:
        out.append(ControlWrite("cpu", "cpu.uclamp.min", _uclamp(c.uclamp_min)))
    if c.uclamp_max is not None:
        out.append(ControlWrite("cpu", "cpu.uclamp.max", _uclamp(c.uclamp_max)))
    return out


def v2_writes(c: CgroupControls) -> list[ControlWrite]:
    out: list[ControlWrite] = []
    if c.weight is not None:
        out.append(ControlWrite("cpu", "cpu.weight", str(c.weight)))
    if c.weight_nice is not None:
        out.append(ControlWrite("cpu", "cpu.weight.nice", str(c.weight_nice)))
    if c.cpu_max is not None:
        quota = "max" if c.cpu_max.quota_us is None else str(c.cpu_max.quota_us)
        out.append(ControlWrite("cpu", "cpu.max", f"{quota} {c.cpu_max.period_us}"))
    out += _idle_and_uclamp(c)
    if c.memory_max is not None:
        out.append(ControlWrite("memory", "memory.max", str(c.memory_max)))
    return out


def v1_writes(c: CgroupControls) -> list[ControlWrite]:
    """The v1 spelling: shares are weight x 1024 / 100 (the kernel's own conversion)."""
    out: list[ControlWrite] = []
    if c.weight is not None or c.weight_nice is not None:
        shares = (_PRIO_TO_WEIGHT[c.weight_nice + 20] if c.weight_nice is not None
                  else max(2, round(c.effective_weight * 1024 / WEIGHT_DEFAULT)))
        out.append(ControlWrite("cpu", "cpu.shares", str(shares)))
    if c.cpu_max is not None:
        out.append(ControlWrite("cpu", "cpu.cfs_period_us", str(c.cpu_max.period_us)))
        quota = -1 if c.cpu_max.quota_us is None else c.cpu_max.quota_us
        out.append(ControlWrite("cpu", "cpu.cfs_quota_us", str(quota)))
    out += _idle_and_uclamp(c)
    if c.memory_max is not None:
        out.append(ControlWrite("memory", "memory.limit_in_bytes", str(c.memory_max)))
    return out
