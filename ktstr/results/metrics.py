"""The metric registry: what ``ktstr stats compare`` gates, and where each value comes from.

Every :class:`Metric` names one number in a sidecar (a ``summary`` field that
:func:`~ktstr.results.sidecar.summarize_workers` derives from the per-worker
telemetry, or a ``timings`` field), its unit, which direction is better, and
its default materiality gates: a change only counts when it is larger than
``abs_gate`` (in the metric's unit) *and* than ``rel_gate`` (a fraction of the
baseline mean), so a significant but tiny shift (1 ms -> 2 ms of gap) does
not fail CI. A repeated test (``--ktstr-repeat N``) has one value per repeat;
:meth:`Metric.samples` returns them all.

:func:`why_missing` and :func:`check_status` say why a metric or a check is
absent from a sidecar (``ktstr stats explain``).
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ktstr.errors import KtstrError
from ktstr.results.sidecar import Record, is_number


class Direction(enum.IntEnum):
    LOWER = -1
    HIGHER = 1

    @property
    def text(self) -> str:
        return "higher is better" if self is Direction.HIGHER else "lower is better"


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    direction: Direction
    abs_gate: float
    """Smallest change of the mean, in ``unit``, that can count."""
    rel_gate: float
    """Smallest change of the mean, as a fraction of the baseline mean, that can count."""
    section: str
    """The sidecar object holding the value: ``summary`` or ``timings``."""
    field: str
    description: str
    needs: str = ""
    """What must happen in the guest for the field to exist (for ``stats explain``)."""

    @property
    def source(self) -> str:
        return f"{self.section}.{self.field}"

    def extract(self, record: Mapping[str, Any]) -> float | None:
        """The value in one run (a sidecar or one of its ``repeats``), if finite."""
        section = record.get(self.section)
        value = section.get(self.field) if isinstance(section, Mapping) else None
        return float(value) if is_number(value) and math.isfinite(value) else None

    def samples(self, record: Mapping[str, Any]) -> list[float]:
        """One value per repeat that has it (the record itself when it was run once)."""
        return [v for run in repeats_of(record) if (v := self.extract(run)) is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "unit": self.unit, "direction": self.direction.text,
            "abs_gate": self.abs_gate, "rel_gate": self.rel_gate, "source": self.source,
            "description": self.description,
        }


_WORKERS = "a scenario that returns per-worker telemetry (execute_defs/execute_steps)"
_WAKE = ("workers that sleep and are woken (wake latency is only recorded for work types "
         "that block; CPU spinners have none)")

REGISTRY: tuple[Metric, ...] = (
    Metric("work_rate.min", "units/s", Direction.HIGHER, 0.0, 0.10, "summary", "work_rate.min",
           "work rate of the weakest worker (starvation shows here first)", _WORKERS),
    Metric("work_rate.sum", "units/s", Direction.HIGHER, 0.0, 0.10, "summary", "work_rate.sum",
           "total work rate of all workers", _WORKERS),
    Metric("work_units.min", "units", Direction.HIGHER, 0.0, 0.10, "summary", "work_units.min",
           "work units of the weakest worker", _WORKERS),
    Metric("work_units.sum", "units", Direction.HIGHER, 0.0, 0.10, "summary", "work_units.sum",
           "total work units", _WORKERS),
    Metric("off_cpu_pct.max", "%", Direction.LOWER, 5.0, 0.10, "summary", "off_cpu_pct.max",
           "largest share of wall time a worker spent off CPU", _WORKERS),
    Metric("max_gap_ms.max", "ms", Direction.LOWER, 20.0, 0.10, "summary", "max_gap_ms.max",
           "longest gap between a worker's progress checkpoints", _WORKERS),
    Metric("run_delay_ns.max", "ns", Direction.LOWER, 10e6, 0.10, "summary", "run_delay_ns.max",
           "largest time a worker waited runnable on a run queue", _WORKERS),
    Metric("wake_latency_p99_us.max", "us", Direction.LOWER, 50.0, 0.10, "summary",
           "wake_latency_p99_us.max", "worst per-worker p99 wake latency", _WAKE),
    Metric("wake_latency_max_us.max", "us", Direction.LOWER, 200.0, 0.25, "summary",
           "wake_latency_max_us.max", "worst single wake latency", _WAKE),
    Metric("migrations.sum", "count", Direction.LOWER, 100.0, 0.50, "summary", "migrations.sum",
           "CPU migrations of all workers (kernel count when available)", _WORKERS),
    Metric("boot_ms", "ms", Direction.LOWER, 250.0, 0.20, "timings", "boot_ms",
           "guest boot time, VM start to the guest runtime's first message",
           "a VM that booted far enough to report"),
    Metric("wall_s", "s", Direction.LOWER, 2.0, 0.20, "timings", "wall_s",
           "host wall time of one run: boot, scenario, checks", "a finished run"),
)

METRICS: dict[str, Metric] = {m.name: m for m in REGISTRY}


PAYLOAD_PREFIX = "payload."


def get_metric(name: str, extra: Sequence[Metric] = ()) -> Metric:
    """A registry metric, or one of ``extra`` (the payload metrics runs carry)."""
    found = METRICS.get(name) or next((m for m in extra if m.name == name), None)
    if found is None:
        known = [*METRICS, *(m.name for m in extra)]
        raise KtstrError(
            f"unknown metric {name!r}; known: {', '.join(known)} (ktstr stats metrics; "
            f"a payload's are {PAYLOAD_PREFIX}LABEL.METRIC)"
        )
    return found


def payload_metrics(records: Iterable[Mapping[str, Any]]) -> list[Metric]:
    """A metric for every payload number the records carry (``payload_metric_specs``:
    the unit and direction the payload declared), in name order."""
    found: dict[str, Metric] = {}
    for record in records:
        specs = record.get("payload_metric_specs")
        if not isinstance(specs, Mapping):
            continue
        for key, spec in specs.items():
            if not isinstance(spec, Mapping) or f"{PAYLOAD_PREFIX}{key}" in found:
                continue
            direction = Direction.HIGHER if spec.get("higher_is_better") else Direction.LOWER
            found[f"{PAYLOAD_PREFIX}{key}"] = Metric(
                f"{PAYLOAD_PREFIX}{key}", str(spec.get("unit", "")), direction, 0.0, 0.05,
                "payload_metrics", str(key), f"payload metric {key}",
                "a scenario that runs that payload (RunPayload)")
    return [found[k] for k in sorted(found)]


def repeats_of(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The runs inside a sidecar: its ``repeats`` when it has them, else itself."""
    runs = record.get("repeats")
    if isinstance(runs, list) and runs:
        return [r for r in runs if isinstance(r, Mapping)]
    return [record]


@dataclass(frozen=True)
class SampleStats:
    n: int
    mean: float
    stddev: float
    """Sample standard deviation (n - 1); 0 for one sample."""
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> SampleStats:
        if not values:
            raise ValueError("statistics of no samples")
        return cls(
            n=len(values), mean=statistics.fmean(values),
            stddev=statistics.stdev(values) if len(values) > 1 else 0.0,
            min=min(values), max=max(values),
        )

    def to_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "mean": self.mean, "stddev": self.stddev,
                "min": self.min, "max": self.max}


def repeat_summary(runs: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Mean, stddev, min, max and n over ``runs`` for every registry metric they have."""
    runs = list(runs)
    out: dict[str, dict[str, float | int]] = {}
    for metric in (*REGISTRY, *payload_metrics(runs)):
        values = [v for run in runs if (v := metric.extract(run)) is not None]
        if values:
            out[metric.name] = SampleStats.of(values).to_dict()
    return out


def _first_line(text: object, limit: int = 160) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:limit] if lines else ""


def _no_telemetry(record: Record) -> str | None:
    """Why the sidecar has no per-worker telemetry at all, or None when it has some."""
    if (record.get("metrics") or {}).get("workers"):
        return None
    verdict = record.get("verdict")
    if verdict == "skip":
        return "the test was skipped"
    if record.get("failure_kind") or verdict == "error":
        kind = record.get("failure_kind") or "error"
        return (f"the guest run failed before the scenario returned telemetry ({kind}: "
                f"{_first_line(record.get('reason'))})")
    return ("no workers telemetry: the scenario returned no ScenarioResult (an AssertResult, "
            "a plain dict or None), so there are no per-worker fields")


def why_missing(metric: Metric, record: Record) -> str | None:
    """Why ``metric`` has no value in ``record`` (None when every repeat has one)."""
    runs = repeats_of(record)
    have = metric.samples(record)
    if len(have) == len(runs):
        return None
    partial = f" ({len(have)} of {len(runs)} repeats have it)" if have else ""
    if metric.section == "summary":
        if reason := _no_telemetry(record):
            return reason + partial
        if metric.field not in (record.get("summary") or {}) and not have:
            field = metric.field.rsplit(".", 1)[0]
            return f"no worker reported {field!r}; it needs {metric.needs}"
        return f"some repeats did not report {metric.field!r}{partial}"
    if metric.field == "boot_ms" and record.get("failure_kind"):
        return (f"the VM did not report boot completion ({record.get('failure_kind')}: "
                f"{_first_line(record.get('reason'))}){partial}")
    return f"timings.{metric.field} was not recorded; it needs {metric.needs}{partial}"


def significance_note(record: Record) -> str | None:
    """Why ``stats compare`` cannot test this result for significance, or None."""
    n = len(repeats_of(record))
    if n < 2:
        return ("one run only: significance needs repeats (--ktstr-repeat N or "
                "@ktstr_test(repeat=N), N >= 2); compare falls back to the gates alone")
    return None


# Telemetry checks by the name ktstr.checks.evaluate gives them -> the Checks field that
# turns them on (a unit test keeps these names in step with ktstr.checks.Checks).
TELEMETRY_CHECKS: dict[str, str] = {
    "starvation": "starvation",
    "isolation": "isolation",
    "fairness": "fairness_spread_pct",
    "max_gap": "max_gap_ms",
    "wake_p99": "wake_p99_us",
    "throughput_cv": "throughput_cv",
    "migration_ratio": "migration_ratio",
    "min_work_rate": "min_work_rate",
}


def check_status(record: Record) -> list[tuple[str, str]]:
    """(check name, what happened to it) for every check ktstr knows, plus the test's own."""
    from ktstr.checks import Checks, scheduler_health

    seen: dict[str, list[Mapping[str, Any]]] = {}
    for check in record.get("checks") or []:
        seen.setdefault(str(check.get("name", "?")), []).append(check)
    defaults = Checks()
    health = [r.name for r in scheduler_health("")]
    out: list[tuple[str, str]] = []
    no_telemetry = _no_telemetry(record)
    for name in [*TELEMETRY_CHECKS, *health]:
        if name in seen:
            continue
        if name in TELEMETRY_CHECKS:
            field = TELEMETRY_CHECKS[name]
            if no_telemetry:
                why = f"not evaluated: {no_telemetry}"
            elif getattr(defaults, field) in (None, False):
                why = f"not evaluated: off by default; enable it with checks=Checks({field}=...)"
            else:
                why = (f"not evaluated: turned off by the test's or the scheduler's checks "
                       f"(Checks.{field})")
        else:  # the sidecar does not keep the resolved checks, so both causes are named
            why = ("not evaluated: there was no console log to scan, or the checks turned "
                   "health off (Checks.health=False)")
        out.append((name, why))
    for name, rows in seen.items():
        failed = [r for r in rows if not r.get("passed", True)]
        if failed:
            first = failed[0]
            out.append((name, f"failed: value {first.get('value')} threshold "
                              f"{first.get('threshold')} {first.get('detail') or ''}".rstrip()))
        else:
            out.append((name, "passed"))
    return out
