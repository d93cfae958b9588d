"""Checks over scenario telemetry and scheduler health, with overridable thresholds.

Defaults (all fields of :class:`Checks`, overridable per scheduler and per test):

- **starvation**: a worker is starved if it made *zero* progress, or if its
  longest gap between progress checkpoints reached ``starvation_gap_ms``
  (500 ms) while it was on a CPU less than ``starvation_cpu_pct`` (10 %) of
  its wall time. The second clause exists because a kernel keeps some
  service for starved normal tasks (RT throttling, the fair deadline
  server: about 5 % of a CPU, in bursts about a second apart), so a worker
  under a SCHED_FIFO hog is not at exactly zero. A busy but fair CPU gives
  many short gaps and a fair share, so it does not trip either clause.
- **isolation**: a worker was seen (sched_getcpu in the worker, or the
  kernel's last-CPU field) on a CPU outside its cgroup's cpuset.
- **fairness**: within a cgroup, max - min of per-worker off-CPU % <= 15 points.
- **max_gap**: no worker's longest gap between checkpoints exceeds 2000 ms.
- optional (None = off): p99 wake latency (us), throughput CV within a
  cgroup, migrations per work unit, minimum work units per second.
- **health**: in a console/kernel log, sched_ext ejecting the scheduler,
  or any kernel problem :mod:`ktstr.console` knows (panic, BUG, Oops, WARNING,
  RCU stall, hung task).

Where each check is evaluated: the telemetry checks by :func:`evaluate` where the
scenario ran (``execute_steps`` in the guest, with the thresholds it was given), the
health checks on the host from the console; :func:`run_checks` puts one run's together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ktstr import console
from ktstr.cpulist import format_cpu_list
from ktstr.errors import KtstrError
from ktstr.telemetry import CgroupStats, Overhead, ScenarioResult, WorkerStats, telemetry_of

FAIRNESS_SPREAD_PCT = 15.0
"""The default off-CPU spread allowed between the workers of one cgroup, in points."""


@dataclass(frozen=True)
class Checks:
    """Thresholds; ``None`` disables a check."""

    starvation: bool = True
    starvation_gap_ms: float = 500.0
    starvation_cpu_pct: float = 10.0
    isolation: bool = True
    fairness_spread_pct: float | None = FAIRNESS_SPREAD_PCT
    max_gap_ms: float | None = 2000.0
    wake_p99_us: float | None = None
    throughput_cv: float | None = None
    migration_ratio: float | None = None
    """Migrations per work unit, per worker."""
    min_work_rate: float | None = None
    """Work units per second, per worker."""
    cross_node_migration_ratio: float | None = None
    """Per worker: the share of its sampled migrations that crossed NUMA nodes."""
    weight_share_pct: float | None = None
    """Sibling cgroups on the same CPUs, one of them with a ``cpu.weight``: each one's
    share of their CPU time within this many percent of its weight's share. Meaningful
    only when every sibling is saturated (more runnable workers than CPUs)."""
    bandwidth_pct: float | None = None
    """A cgroup with ``cpu.max`` uses at most its limit plus this many percent."""
    health: bool = True
    monitor_imbalance_ratio: float | None = 4.0
    """Host-side monitor (``ktstr.observe``), sched_ext runs: max/max(min, 1) of the
    CPUs' ``nr_running``, sustained over ``monitor_window`` samples."""
    monitor_dsq_depth: int | None = 50
    """sched_ext local DSQ depth on any CPU, sustained over ``monitor_window`` samples."""
    monitor_clock_stall_samples: int | None = 5
    """Consecutive samples of a CPU with runnable tasks whose rq clock did not advance
    (samples where the host did not run that vCPU's thread are exempt)."""
    monitor_window: int = 5

    def override(self, overrides: Checks | Mapping[str, Any] | None) -> Checks:
        """A copy with ``overrides`` applied (a mapping of field names, or only the
        fields of another Checks that differ from the defaults)."""
        if overrides is None:
            return self
        if isinstance(overrides, Checks):
            default = Checks()
            overrides = {
                f.name: getattr(overrides, f.name)
                for f in fields(Checks)
                if getattr(overrides, f.name) != getattr(default, f.name)
            }
        known = {f.name for f in fields(Checks)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise KtstrError(
                f"checks: unknown threshold {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        return replace(self, **dict(overrides))

    @classmethod
    def resolve(
        cls,
        scheduler: Checks | Mapping[str, Any] | None = None,
        test: Checks | Mapping[str, Any] | None = None,
    ) -> Checks:
        """Defaults, then the scheduler's overrides, then the test's."""
        return cls().override(scheduler).override(test)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckResult:
    """One check's result: the one type from the guest's evaluation to the sidecar."""

    name: str
    passed: bool
    value: float | None = None
    threshold: float | None = None
    message: str = ""
    cgroup: str | None = None
    worker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckResult:
        """From a guest's (or an older sidecar's: ``detail``, ``check``) check dict."""
        worker, cgroup = data.get("worker"), data.get("cgroup")
        return cls(
            name=str(data.get("name") or data.get("check") or "check"),
            passed=data.get("passed") is True,
            value=data.get("value"),
            threshold=data.get("threshold"),
            message=str(data.get("message") or data.get("detail") or ""),
            cgroup=cgroup if isinstance(cgroup, str) else None,
            worker=worker if isinstance(worker, str) else None,
        )

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.message}"

    def reason(self) -> str:
        """How a verdict names this check: ``check NAME WORKER: value V (threshold T) TEXT``."""
        who = f" {self.worker}:" if self.worker else ""
        nums = ""
        if self.value is not None or self.threshold is not None:
            nums = f" value {self.value} (threshold {self.threshold})"
        return f"check {self.name}{who}{nums} {self.message}".rstrip()


@dataclass
class AssertResult:
    """What a scenario function returns: pass/fail plus the reasons."""

    passed: bool = True
    results: list[CheckResult] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @classmethod
    def ok(cls, *details: str) -> AssertResult:
        return cls(True, [], list(details))

    @classmethod
    def fail(cls, *details: str) -> AssertResult:
        return cls(False, [], list(details))

    @classmethod
    def from_checks(cls, results: Iterable[CheckResult]) -> AssertResult:
        results = list(results)
        return cls(
            passed=all(r.passed for r in results),
            results=results,
            details=[r.line() for r in results if not r.passed],
        )

    @classmethod
    def of(cls, result: ScenarioResult) -> AssertResult:
        """The verdict already evaluated into a ScenarioResult by the runner."""
        checks = [CheckResult.from_dict(c) for c in result.checks]
        return cls.from_checks(checks)

    def merge(self, other: AssertResult) -> AssertResult:
        return AssertResult(
            self.passed and other.passed,
            self.results + other.results,
            self.details + other.details,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "results": [r.to_dict() for r in self.results],
            "details": list(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssertResult:
        return cls(
            bool(data.get("passed")),
            [CheckResult.from_dict(r) for r in data.get("results", [])],
            list(data.get("details", [])),
        )


# ---- telemetry checks -------------------------------------------------------------


def _where(w: WorkerStats) -> str:
    cpus = format_cpu_list(w.cpus_used) or "unknown"
    return f"worker {w.label} in cgroup {w.cgroup} (CPUs {cpus})"


def is_starved(w: WorkerStats, checks: Checks, allowance_ms: float = 0.0) -> bool:
    """Made no progress, or went ``starvation_gap_ms`` (plus ``allowance_ms``: its
    cgroup's freeze) without any while hardly on a CPU."""
    if w.work_units == 0:
        return True
    return (
        w.max_gap_ms - allowance_ms >= checks.starvation_gap_ms
        and w.cpu_share * 100 < checks.starvation_cpu_pct
    )


def check_starvation(
    workers: list[WorkerStats], checks: Checks, frozen_ms: Mapping[str, float] | None = None,
) -> CheckResult:
    frozen_ms = frozen_ms or {}
    starved = [w for w in workers if is_starved(w, checks, frozen_ms.get(w.cgroup, 0.0))]
    if not starved:
        return CheckResult(
            "starvation", True, 0, 0,
            f"all {len(workers)} workers progressed (no zero-progress worker; none with a "
            f"gap >= {checks.starvation_gap_ms:g} ms at < {checks.starvation_cpu_pct:g}% on-CPU)",
        )
    w = max(starved, key=lambda w: (w.work_units == 0, w.max_gap_ms))
    if w.work_units == 0:
        why = f"made 0 work units in {w.wall_ns / 1e9:.2f} s"
    else:
        why = (
            f"went {w.max_gap_ms:.0f} ms without progress (>= {checks.starvation_gap_ms:g} ms) "
            f"and was on-CPU {w.cpu_share * 100:.1f}% (< {checks.starvation_cpu_pct:g}%)"
        )
    others = f"; {len(starved)} starved workers in total" if len(starved) > 1 else ""
    return CheckResult(
        "starvation", False, len(starved), 0, f"{_where(w)} {why}{others}",
        cgroup=w.cgroup, worker=w.label,
    )


def check_isolation(workers: list[WorkerStats]) -> CheckResult:
    bad = [w for w in workers if w.isolation_violations]
    if not bad:
        return CheckResult("isolation", True, 0, 0, "no worker ran outside its cpuset")
    w = bad[0]
    return CheckResult(
        "isolation", False, len(bad), 0,
        f"worker {w.label} in cgroup {w.cgroup} ran on CPU "
        f"{format_cpu_list(w.isolation_violations)} outside its cpuset "
        f"{format_cpu_list(w.allowed_cpus) or '(empty)'}"
        + (f"; {len(bad)} workers in total" if len(bad) > 1 else ""),
        cgroup=w.cgroup, worker=w.label,
    )


def _by_cgroup(workers: list[WorkerStats]) -> dict[str, list[WorkerStats]]:
    out: dict[str, list[WorkerStats]] = {}
    for w in workers:
        out.setdefault(w.cgroup, []).append(w)
    return out


def check_fairness(workers: list[WorkerStats], limit: float) -> CheckResult:
    worst: tuple[float, str, WorkerStats, WorkerStats] | None = None
    for name, ws in _by_cgroup(workers).items():
        if len(ws) < 2:
            continue
        lo = min(ws, key=lambda w: w.off_cpu_pct)
        hi = max(ws, key=lambda w: w.off_cpu_pct)
        spread = hi.off_cpu_pct - lo.off_cpu_pct
        if worst is None or spread > worst[0]:
            worst = (spread, name, lo, hi)
    if worst is None:
        return CheckResult("fairness", True, 0.0, limit, "no cgroup has two or more workers")
    spread, name, lo, hi = worst
    msg = (
        f"cgroup {name}: off-CPU spread {spread:.1f} points "
        f"({'>' if spread > limit else '<='} {limit:g}); worker {hi.label} "
        f"{hi.off_cpu_pct:.1f}% off-CPU on CPUs {format_cpu_list(hi.cpus_used) or '-'}, "
        f"worker {lo.label} {lo.off_cpu_pct:.1f}% on CPUs {format_cpu_list(lo.cpus_used) or '-'}"
    )
    return CheckResult("fairness", spread <= limit, round(spread, 3), limit, msg, cgroup=name,
                       worker=hi.label)


def _worst(
    name: str, workers: list[WorkerStats], key: Any, limit: float, unit: str, what: str,
    higher_is_bad: bool = True,
) -> CheckResult:
    values = [(key(w), w) for w in workers if key(w) is not None]
    if not values:
        return CheckResult(name, True, None, limit, f"no worker reports {what}")
    value, w = max(values, key=lambda t: t[0]) if higher_is_bad else min(values, key=lambda t: t[0])
    ok = value <= limit if higher_is_bad else value >= limit
    rel = ("<=" if ok else ">") if higher_is_bad else (">=" if ok else "<")
    return CheckResult(
        name, ok, round(value, 3), limit,
        f"{_where(w)}: {what} {value:.1f}{unit} ({rel} {limit:g}{unit})",
        cgroup=w.cgroup, worker=w.label,
    )


def reported_checks(value: object) -> list[CheckResult] | None:
    """The check results a scenario's return value carries, or None when it carries none.

    A ScenarioResult's ``checks`` (evaluated where the scenario ran); an AssertResult's
    ``results`` (a failed one without any: one ``scenario`` check with its details); a
    bare ``{"passed": bool}``.
    """
    if not isinstance(value, Mapping):
        return None
    raw = value.get("checks")
    if raw is None and (value.get("kind") == "assert_result" or "results" in value):
        raw = value.get("results") or []
        if not raw and value.get("passed") is not True:
            details = value.get("details")
            text = "; ".join(map(str, details)) if isinstance(details, list) else ""
            return [CheckResult("scenario", False, message=text or "scenario failed")]
    if isinstance(raw, list):
        return [CheckResult.from_dict(item) if isinstance(item, Mapping)
                else CheckResult("check", False, message=str(item)) for item in raw]
    if isinstance(value.get("passed"), bool):
        text = value.get("message") or value.get("reason") or ""
        return [CheckResult("scenario", value["passed"], message=str(text))]
    return None


def run_checks(value: object, checks: Checks, console_text: str,
               retried_ejections: int = 0) -> list[CheckResult]:
    """Every check of one guest run, each evaluated once.

    What the scenario's return value carries is kept as it is (``execute_steps`` evaluated
    it in the guest, honouring a ``checks=`` given there); telemetry nobody judged is
    evaluated here with ``checks``; health comes from the console when there is one.
    """
    telemetry = telemetry_of(value)
    if telemetry and not isinstance(telemetry.get("passed"), bool):  # nobody judged it
        out = evaluate(telemetry, checks)
    else:
        out = reported_checks(telemetry or value) or []
    if checks.health and console_text:
        out.extend(scheduler_health(console_text, retried_ejections))
    return out


def evaluate(
    result: ScenarioResult | Mapping[str, Any],
    checks: Checks | Mapping[str, Any] | None = None,
    log_text: str | None = None,
) -> list[CheckResult]:
    """Every enabled check over ``result`` (and ``log_text`` for scheduler health).

    ``result`` may be a ScenarioResult or its dict; any other mapping contributes the
    checks it carries (:func:`reported_checks`, e.g. an AssertResult dict) and the health
    checks.
    """
    if not isinstance(checks, Checks):
        checks = Checks().override(checks)
    if not isinstance(result, ScenarioResult):
        data = dict(result or {})
        if "workers" not in data:
            found = reported_checks(data) or []
            if log_text is not None and checks.health:
                found.extend(scheduler_health(log_text))
            return found
        data.setdefault("name", "scenario")
        data.setdefault("topology", "")
        data.setdefault("duration_s", 0.0)
        result = ScenarioResult.from_dict(data)
    workers = result.workers
    out: list[CheckResult] = []
    if not workers:
        out.append(CheckResult("workers", False, 0, 1, "the scenario ran no workers"))
    errors = [w for w in workers if w.error]
    if errors:
        w = errors[0]
        out.append(CheckResult(
            "worker_errors", False, len(errors), 0,
            f"worker {w.label} in cgroup {w.cgroup} failed: {w.error}",
            cgroup=w.cgroup, worker=w.label,
        ))
    frozen = {c.name: c.frozen_ms for c in result.cgroups if c.frozen_ms}
    if workers and checks.starvation:
        out.append(check_starvation(workers, checks, frozen))
    if workers and checks.isolation:
        out.append(check_isolation(workers))
    if workers and checks.fairness_spread_pct is not None:
        out.append(check_fairness(workers, checks.fairness_spread_pct))
    if workers and checks.max_gap_ms is not None:
        out.append(_worst(
            "max_gap", workers, lambda w: max(0.0, w.max_gap_ms - frozen.get(w.cgroup, 0.0)),
            checks.max_gap_ms, " ms",
            "longest gap between progress checkpoints" + (" (less its cgroup's freeze)"
                                                          if frozen else ""),
        ))
    if workers and checks.wake_p99_us is not None:
        out.append(_worst(
            "wake_p99", workers,
            lambda w: w.wake_latency.p99_us if w.wake_latency and w.wake_latency.count else None,
            checks.wake_p99_us, " us", "p99 wake latency",
        ))
    if workers and checks.throughput_cv is not None:
        worst = max(result.cgroups, key=lambda c: c.throughput_cv, default=None)
        if worst is not None:
            ok = worst.throughput_cv <= checks.throughput_cv
            out.append(CheckResult(
                "throughput_cv", ok, round(worst.throughput_cv, 4), checks.throughput_cv,
                f"cgroup {worst.name} (CPUs {format_cpu_list(worst.cpus)}): work-rate CV "
                f"{worst.throughput_cv:.3f} across {worst.workers} workers "
                f"({'<=' if ok else '>'} {checks.throughput_cv:g})",
                cgroup=worst.name,
            ))
    if workers and checks.migration_ratio is not None:
        out.append(_worst(
            "migration_ratio", workers,
            lambda w: w.migrations / w.work_units if w.work_units else None,
            checks.migration_ratio, "", "migrations per work unit",
        ))
    if workers and checks.cross_node_migration_ratio is not None:
        out.append(_worst(
            "cross_node_migration_ratio", workers,
            lambda w: w.cross_node_migrations / w.sampled_migrations
            if w.sampled_migrations else None,
            checks.cross_node_migration_ratio, "", "share of migrations across NUMA nodes",
        ))
    if workers and checks.min_work_rate is not None:
        out.append(_worst(
            "min_work_rate", workers, lambda w: w.work_rate, checks.min_work_rate, "/s",
            "work rate", higher_is_bad=False,
        ))
    if result.payloads:
        out.append(check_payloads(result))
    if result.cgroups and checks.weight_share_pct is not None:
        out.append(check_weight_share(result.cgroups, checks.weight_share_pct))
    if result.cgroups and checks.bandwidth_pct is not None:
        out.append(check_bandwidth(result.cgroups, checks.bandwidth_pct))
    if log_text is not None and checks.health:
        out.extend(scheduler_health(log_text))
    if result.overhead is not None:
        out = [with_overhead(c, result.overhead) for c in out]
    return out


# Checks whose value is time lost on a CPU: the host's steal and the harness's own
# CPU time are part of what they measured.
_TIME_CHECKS = frozenset({"fairness", "starvation", "max_gap", "wake_p99", "throughput_cv",
                          "min_work_rate", "weight_share"})


def with_overhead(check: CheckResult, overhead: Overhead) -> CheckResult:
    """A failed timing check's message, plus what the host and the harness took."""
    if check.passed or check.name not in _TIME_CHECKS:
        return check
    steal = overhead.steal_pct
    note = (f"; meanwhile the host stole {min(steal.values()):.0f}-{max(steal.values()):.0f}% "
            f"of each guest CPU" if steal and overhead.max_steal_pct >= 1 else "")
    note += f"; the harness used {overhead.harness_cpu_pct:.0f}% of one CPU"
    return replace(check, message=check.message + note)


def check_payloads(result: ScenarioResult) -> CheckResult:
    """Every payload ran to its end (or was stopped on purpose) and its output parsed."""
    failed = [p for p in result.payloads if p.failed]
    if not failed:
        ran = ", ".join(f"{p.label} ({', '.join(f'{k} {v:g}' for k, v in p.metrics.items())})"
                        if p.metrics else p.label for p in result.payloads)
        return CheckResult("payloads", True, 0, 0, f"payloads ran: {ran}")
    p = failed[0]
    last = p.output_tail.strip().splitlines()[-1:] or ["(no output)"]
    return CheckResult(
        "payloads", False, len(failed), 0,
        f"payload {p.label} ({' '.join(p.argv)}) {p.error}; last output: {last[0][:200]}"
        + (f"; {len(failed)} payloads failed" if len(failed) > 1 else ""),
    )


def competing_siblings(cgroups: Iterable[CgroupStats]) -> list[list[CgroupStats]]:
    """Groups of two or more sibling cgroups on the same CPUs, one with a weight set."""
    groups: dict[tuple[str, tuple[int, ...]], list[CgroupStats]] = {}
    for c in cgroups:
        groups.setdefault((c.name.rpartition("/")[0], tuple(c.cpus)), []).append(c)
    return [sorted(g, key=lambda c: c.name) for g in groups.values()
            if len(g) > 1 and any(c.weight_set for c in g)]


def check_weight_share(cgroups: list[CgroupStats], limit_pct: float) -> CheckResult:
    """Each competing sibling's share of their CPU time against its weight's share, over
    the workers' measurement windows: the first cgroup's workers run alone while the
    harness forks the others, which says nothing of the weights."""
    worst: tuple[float, list[CgroupStats], CgroupStats] | None = None
    for group in competing_siblings(cgroups):
        total_cpu = sum(c.window_cpu_ns for c in group)
        total_weight = sum(c.weight for c in group)
        if total_cpu <= 0:
            continue
        for c in group:
            expected = c.weight / total_weight
            error = abs(c.window_cpu_ns / total_cpu / expected - 1) * 100
            if worst is None or error > worst[0]:
                worst = (error, group, c)
    if worst is None:
        return CheckResult("weight_share", True, None, limit_pct,
                           "no sibling cgroups with a cpu.weight competed for the same CPUs")
    error, group, c = worst
    total_cpu = sum(g.window_cpu_ns for g in group)
    total_weight = sum(g.weight for g in group)
    ok = error <= limit_pct
    return CheckResult(
        "weight_share", ok, round(error, 2), limit_pct,
        f"cgroups {', '.join(g.name for g in group)} on CPUs {format_cpu_list(group[0].cpus)}: "
        f"weights {':'.join(str(g.weight) for g in group)}, CPU shares "
        f"{':'.join(f'{g.window_cpu_ns / total_cpu * 100:.1f}%' for g in group)} (expected "
        f"{':'.join(f'{g.weight / total_weight * 100:.1f}%' for g in group)}); cgroup "
        f"{c.name} is {error:.1f}% off its share ({'<=' if ok else '>'} {limit_pct:g}%)",
        cgroup=c.name,
    )


def check_bandwidth(cgroups: list[CgroupStats], limit_pct: float) -> CheckResult:
    """A cgroup with ``cpu.max`` stays within its limit, plus ``limit_pct`` and one
    period's quota over its wall time (:func:`period_allowance_pct`)."""
    limited = [c for c in cgroups if c.cpu_max_cpus is not None and c.wall_ns > 0]
    if not limited:
        return CheckResult("bandwidth", True, None, limit_pct, "no cgroup has a cpu.max limit")

    def allowed(c: CgroupStats) -> float:
        return limit_pct + period_allowance_pct(c.cpu_max_period_us, c.wall_ns)

    def over_pct(c: CgroupStats) -> float:
        return (c.cpus_busy / (c.cpu_max_cpus or 1) - 1) * 100

    c = max(limited, key=lambda c: over_pct(c) - allowed(c))
    limit, over, allowance = c.cpu_max_cpus or 0.0, over_pct(c), allowed(c)
    ok = over <= allowance
    throttled = c.cpu_stat.get("nr_throttled")
    return CheckResult(
        "bandwidth", ok, round(over, 2), round(allowance, 2),
        f"cgroup {c.name}: used {c.cpus_busy:.3f} CPUs under cpu.max {limit:g} CPUs "
        f"({over:+.1f}%, {'<=' if ok else '>'} +{allowance:.1f}%"
        + (f": {limit_pct:g}% and one {(c.cpu_max_period_us or 0) / 1000:g} ms period of "
           f"{c.wall_ns / 1e6:.0f} ms" if allowance > limit_pct else "") + ")"
        + (f"; throttled {throttled} times" if throttled is not None else ""),
        cgroup=c.name,
    )


def period_allowance_pct(period_us: int | None, wall_ns: int) -> float:
    """How far over its limit a cgroup can run with no fault of the scheduler: a window of
    ``wall_ns`` starts with the current period's quota whole, so it can hold one period's
    quota more than its length is worth (10 % of a 1 s window at the 100 ms default)."""
    if not period_us or wall_ns <= 0:
        return 0.0
    return 100.0 * period_us * 1000 / wall_ns


# ---- scheduler health from a console / kernel log ------------------------------------


def scheduler_health(log_text: str, retried_ejections: int = 0) -> list[CheckResult]:
    """One result per health category (:mod:`ktstr.console`), failing with the first
    offending log line. The first ``retried_ejections`` ejections were attach attempts the
    scheduler's attach policy retried (recorded as such): not failures of the run."""
    lines = log_text.splitlines()
    ejected = console.first_ejection(lines, skip=retried_ejections)
    out = [CheckResult(
        "sched_ext_ejected", ejected is None, 1 if ejected else 0, 0,
        f"the kernel ejected the BPF scheduler: {ejected}" if ejected
        else "no sched_ext ejection in the log",
    )]
    found = console.problems(lines)
    for kind in console.PROBLEMS:
        hits = found[kind.name]
        out.append(CheckResult(
            kind.name, not hits, len(hits), 0,
            f"{len(hits)} line(s), first: {hits[0]}" if hits else f"no {kind.what}",
        ))
    return out
