"""A/B comparison of two runs: Welch's t-test over the repeats, behind materiality gates.

Results pair by test id (by the full result key when a run holds one test
under several schedulers or topologies). For each pair and each registry
metric (:mod:`ktstr.results.metrics`) the samples are the test's repeats. A
metric is

- **regressed** when the change is significant (Welch's t-test,
  ``p < alpha``) *and* larger than both its absolute and its relative gate,
  in the worse direction; **improved** likewise in the better direction;
- **unchanged** otherwise (also: zero variance on both sides, equal means);
- **not comparable** when one side has no value (absent on both sides: not listed).

With one sample on either side there is no variance to test: the gates
alone decide, and the line says so. Zero variance on both sides with
different means is an exact difference (p = 0). A verdict that went from
pass to anything else is a regression of its own.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ktstr.errors import KtstrError
from ktstr.results.metrics import REGISTRY, Metric, SampleStats, payload_metrics
from ktstr.results.sidecar import Record, result_key

DEFAULT_ALPHA = 0.05


class Status(enum.StrEnum):
    REGRESSED = "regressed"
    IMPROVED = "improved"
    UNCHANGED = "unchanged"
    NOT_COMPARABLE = "not comparable"


@dataclass(frozen=True)
class Gates:
    """Overrides of the registry's gates: ``--threshold`` (relative, every metric) and
    ``--abs FRAGMENT=VALUE`` (absolute, metrics whose name contains FRAGMENT)."""

    rel: float | None = None
    abs: Mapping[str, float] = field(default_factory=dict)

    def for_metric(self, metric: Metric) -> tuple[float, float]:
        """(absolute gate, relative gate) for ``metric``."""
        abs_gate = next((v for frag, v in self.abs.items() if frag in metric.name),
                        metric.abs_gate)
        return abs_gate, metric.rel_gate if self.rel is None else self.rel


@dataclass(frozen=True)
class MetricComparison:
    key: str
    metric: Metric
    a: SampleStats | None
    b: SampleStats | None
    status: Status
    p_value: float | None = None
    """None when not tested (N=1 on a side, or not comparable)."""
    note: str = ""

    @property
    def delta(self) -> float:
        return (self.b.mean - self.a.mean) if self.a and self.b else math.nan

    @property
    def rel(self) -> float:
        if not (self.a and self.b):
            return math.nan
        if self.a.mean == 0:
            return 0.0 if self.delta == 0 else math.copysign(math.inf, self.delta)
        return self.delta / abs(self.a.mean)


def compare_samples(
    key: str, metric: Metric, xa: Sequence[float], xb: Sequence[float],
    alpha: float = DEFAULT_ALPHA, gates: Gates | None = None,
) -> MetricComparison:
    """One metric of one test: significance, then the gates, then the direction."""
    if not xa or not xb:
        side = "A" if not xa else "B"
        return MetricComparison(
            key, metric, SampleStats.of(xa) if xa else None, SampleStats.of(xb) if xb else None,
            Status.NOT_COMPARABLE, note=f"missing in {side}" + ("" if xa or xb else " and B"),
        )
    a, b = SampleStats.of(xa), SampleStats.of(xb)
    p_value: float | None
    if a.n < 2 or b.n < 2:
        sides = "A and B" if a.n < 2 and b.n < 2 else ("A" if a.n < 2 else "B")
        p_value, note, significant = None, f"N=1 in {sides}: gates only, no significance test", True
    elif a.stddev == 0 and b.stddev == 0:
        if a.mean == b.mean:
            return MetricComparison(key, metric, a, b, Status.UNCHANGED, 1.0,
                                    "zero variance on both sides, equal means")
        p_value, note, significant = 0.0, "zero variance on both sides: an exact change", True
    else:
        from scipy.stats import ttest_ind

        with warnings.catch_warnings():  # near-constant samples: the p-value says enough
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = float(ttest_ind(xb, xa, equal_var=False).pvalue)
        if math.isnan(p_value):
            return MetricComparison(key, metric, a, b, Status.NOT_COMPARABLE,
                                    note="t-test undefined for these samples")
        significant = p_value < alpha
        note = "" if significant else f"not significant at alpha {alpha:g}"
    abs_gate, rel_gate = (gates or Gates()).for_metric(metric)
    delta = b.mean - a.mean
    rel = abs(delta) / abs(a.mean) if a.mean else (math.inf if delta else 0.0)
    material = abs(delta) > abs_gate and rel > rel_gate
    if significant and not material:
        note = (note + "; " if note else "") + (
            f"within the gates (abs {abs_gate:g} {metric.unit}, rel {rel_gate * 100:g}%)")
    status = Status.UNCHANGED
    if significant and material:
        status = Status.REGRESSED if delta * metric.direction < 0 else Status.IMPROVED
    return MetricComparison(key, metric, a, b, status, p_value, note)


@dataclass
class Comparison:
    results: list[MetricComparison] = field(default_factory=list)
    verdict_changes: list[tuple[str, str, str]] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    topology_changes: list[tuple[str, str, str]] = field(default_factory=list)
    pairs: int = 0

    @property
    def regressions(self) -> list[MetricComparison]:
        return [r for r in self.results if r.status is Status.REGRESSED]

    @property
    def verdict_regressions(self) -> list[tuple[str, str, str]]:
        return [c for c in self.verdict_changes if c[1] == "pass" and c[2] != "pass"]

    def count(self, status: Status) -> int:
        return sum(r.status is status for r in self.results)

    def failures(self, fail_threshold: int = 1, must_not_regress: Sequence[str] = ()) -> list[str]:
        """Why this comparison fails the gate (empty: it passes)."""
        out: list[str] = []
        if len(self.regressions) >= fail_threshold:
            out.append(f"{len(self.regressions)} significant regression(s) >= "
                       f"--fail-threshold {fail_threshold}")
        listed = sorted({r.metric.name for r in self.regressions} & set(must_not_regress))
        if listed:
            out.append(f"--must-not-regress metric(s) regressed: {', '.join(listed)}")
        if self.verdict_regressions:
            out.append(f"{len(self.verdict_regressions)} test(s) passed in A and not in B")
        return out


def pair_results(
    run_a: Sequence[Record], run_b: Sequence[Record]
) -> tuple[list[tuple[str, Record, Record]], list[str], list[str]]:
    """(label, A, B) for every test in both runs, plus the result keys only in A / only in B.

    By test id, so A/B runs of two schedulers pair; a test id that a run holds
    more than once (several schedulers or topologies) pairs by the full key.
    """
    def by_test(run: Sequence[Record]) -> dict[str, list[Record]]:
        out: dict[str, list[Record]] = {}
        for r in run:
            out.setdefault(str(r.get("test")), []).append(r)
        return out

    ga, gb = by_test(run_a), by_test(run_b)
    pairs: list[tuple[str, Record, Record]] = []
    only_a: list[str] = []
    only_b: list[str] = []
    for test in sorted(set(ga) | set(gb)):
        ra, rb = ga.get(test, []), gb.get(test, [])
        if len(ra) == 1 and len(rb) == 1:
            pairs.append((result_key(rb[0]), ra[0], rb[0]))
            continue
        ka = {result_key(r): r for r in ra}
        kb = {result_key(r): r for r in rb}
        pairs.extend((k, ka[k], kb[k]) for k in sorted(set(ka) & set(kb)))
        only_a.extend(sorted(set(ka) - set(kb)))
        only_b.extend(sorted(set(kb) - set(ka)))
    return pairs, only_a, only_b


def compare_runs(
    run_a: Sequence[Record], run_b: Sequence[Record], alpha: float = DEFAULT_ALPHA,
    gates: Gates | None = None, metrics: Sequence[Metric] | None = None,
) -> Comparison:
    """``metrics``: the registry and the payload metrics either run carries, by default."""
    if metrics is None:
        metrics = (*REGISTRY, *payload_metrics([*run_a, *run_b]))
    pairs, only_a, only_b = pair_results(run_a, run_b)
    out = Comparison(only_a=only_a, only_b=only_b, pairs=len(pairs))
    for key, ra, rb in pairs:
        if ra.get("topology") != rb.get("topology"):
            out.topology_changes.append((key, str(ra.get("topology")), str(rb.get("topology"))))
        va, vb = str(ra.get("verdict", "?")), str(rb.get("verdict", "?"))
        if va != vb:
            out.verdict_changes.append((key, va, vb))
        for metric in metrics:
            xa, xb = metric.samples(ra), metric.samples(rb)
            if xa or xb:  # absent from both: nothing measured it (`stats explain` says why)
                out.results.append(compare_samples(key, metric, xa, xb, alpha, gates))
    return out


def check_comparable(cmp: Comparison, force: bool = False) -> None:
    """Refuse runs with nothing in common, and (without ``force``) different test sets or
    topologies: a count of regressions over a different set of tests means nothing."""
    if not cmp.pairs:
        raise KtstrError(
            f"the runs have no test in common ({len(cmp.only_a)} result(s) only in A, "
            f"{len(cmp.only_b)} only in B): nothing to compare"
        )
    if force:
        return
    problems = []
    if cmp.only_a or cmp.only_b:
        sample = ", ".join((cmp.only_a + cmp.only_b)[:3])
        problems.append(f"{len(cmp.only_a)} result(s) only in A and {len(cmp.only_b)} only "
                        f"in B (e.g. {sample})")
    if cmp.topology_changes:
        key, ta, tb = cmp.topology_changes[0]
        problems.append(f"{len(cmp.topology_changes)} test(s) ran on other topologies "
                        f"(e.g. {key}: {ta} vs {tb})")
    if problems:
        raise KtstrError(f"the runs differ: {'; '.join(problems)}; pass --force to compare "
                         "the tests they share")


# What `stats compare` prints about where each run was measured:
# (label, sidecar object, field).
CONTEXT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("host CPU", "host", "cpu_model"),
    ("host CPUs", "host", "nr_cpus"),
    ("host kernel", "host", "kernel_release"),
    ("inside the sandbox (emulated KVM: timings dilate)", "host", "sandbox"),
    ("ktstr version", "host", "ktstr_version"),
    ("kernel under test", "kernel", "version"),
    ("kernel cache key", "kernel", "key"),
)


def _values(run: Sequence[Record], section: str, name: str) -> str:
    seen = sorted({str(obj.get(name)) for r in run
                   if isinstance(obj := r.get(section), Mapping) and obj.get(name) is not None})
    return ", ".join(seen) if seen else "not recorded"


def _load_range(run: Sequence[Record]) -> str:
    loads = [float(load[0]) for r in run
             if isinstance(load := (r.get("host") or {}).get("loadavg"), list) and load
             and isinstance(load[0], int | float)]
    return f"{min(loads):.2f}..{max(loads):.2f}" if loads else "not recorded"


DILATION_CONFOUNDS = 0.10
"""Mean vCPU dilations further apart than this (a share of run time) confound a comparison."""


def mean_dilation(run: Sequence[Record]) -> float | None:
    """The run's tests' mean vCPU dilation (sidecar ``dilation.mean``), None if unrecorded."""
    means = [float(m) for r in run if isinstance(d := r.get("dilation"), Mapping)
             and isinstance(m := d.get("mean"), int | float)]
    return sum(means) / len(means) if means else None


def dilation_lines(run_a: Sequence[Record], run_b: Sequence[Record]) -> list[str]:
    """The two runs' vCPU dilation, and a warning when it differs enough to confound."""
    da, db = mean_dilation(run_a), mean_dilation(run_b)
    if da is None and db is None:
        return []
    shown = [f"{d * 100:.1f}%" if d is not None else "not recorded" for d in (da, db)]
    lines = [f"vCPU dilation (host time runnable, not running): A {shown[0]}, B {shown[1]}"]
    if da is not None and db is not None and abs(da - db) > DILATION_CONFOUNDS:
        lines.append(f"warning: the runs' vCPU dilation differs by {abs(da - db) * 100:.1f} "
                     f"points (> {DILATION_CONFOUNDS * 100:g}): the host took different "
                     "shares of CPU from the guests, so timing changes may be the host's")
    return lines


def context_lines(run_a: Sequence[Record], run_b: Sequence[Record]) -> list[str]:
    """Where the two runs were measured, as far as they differ (load average and vCPU
    dilation always)."""
    lines = []
    for label, section, name in CONTEXT_FIELDS:
        va, vb = _values(run_a, section, name), _values(run_b, section, name)
        if va != vb:
            lines.append(f"context differs: {label}: {va} (A) vs {vb} (B)")
    lines.append(f"host load average (1 min, at write time): A {_load_range(run_a)}, "
                 f"B {_load_range(run_b)}")
    return lines + dilation_lines(run_a, run_b)


def _stats(s: SampleStats | None, unit: str) -> str:
    if s is None:
        return "-"
    spread = f" ±{s.stddev:.3g}" if s.n > 1 else ""
    return f"{s.mean:.4g}{spread} {unit} (n={s.n})"


def format_comparison(cmp: Comparison, show_all: bool = False) -> list[str]:
    """Human-readable lines: changed and not-comparable metrics (all with ``show_all``)."""
    lines: list[str] = []
    current = None
    for r in cmp.results:
        if not show_all and r.status is Status.UNCHANGED:
            continue
        if r.key != current:
            current = r.key
            lines.append(current)
        rel = "" if math.isnan(r.rel) else (
            "  n/a" if math.isinf(r.rel) else f"  {r.rel * 100:+.1f}%")
        p = "" if r.p_value is None else f"  p={r.p_value:.3g}"
        mark = "REGRESSION" if r.status is Status.REGRESSED else r.status.value
        note = f"  ({r.note})" if r.note else ""
        lines.append(f"  {r.metric.name:<24} {_stats(r.a, r.metric.unit)} -> "
                     f"{_stats(r.b, r.metric.unit)}{rel}{p}  {mark}{note}")
    for key, va, vb in cmp.verdict_changes:
        tag = "REGRESSION" if (va == "pass" and vb != "pass") else "changed"
        lines.append(f"{key}: verdict {va} -> {vb} {tag}")
    for key, ta, tb in cmp.topology_changes:
        lines.append(f"{key}: topology {ta} (A) vs {tb} (B)")
    lines.extend(f"{key}: only in A" for key in cmp.only_a)
    lines.extend(f"{key}: only in B" for key in cmp.only_b)
    untested = sum(r.note.startswith("N=1") for r in cmp.results)
    if untested:
        lines.append(f"note: {untested} metric(s) had one run on a side: judged by the gates "
                     "alone (repeat the tests with --ktstr-repeat N for a significance test)")
    n_reg = len(cmp.regressions) + len(cmp.verdict_regressions)
    lines.append(
        f"{len(cmp.results)} metric(s) over {cmp.pairs} test(s): {n_reg} regression(s), "
        f"{cmp.count(Status.IMPROVED)} improvement(s), {cmp.count(Status.UNCHANGED)} unchanged, "
        f"{cmp.count(Status.NOT_COMPARABLE)} not comparable"
    )
    return lines


def comparison_json(cmp: Comparison) -> dict[str, Any]:
    """The comparison as data (``stats compare --json``)."""
    return {
        "metrics": [
            {"test": r.key, "metric": r.metric.name, "status": r.status.value,
             "a": r.a.to_dict() if r.a else None, "b": r.b.to_dict() if r.b else None,
             "p_value": r.p_value, "note": r.note}
            for r in cmp.results
        ],
        "verdict_changes": [{"test": k, "a": a, "b": b} for k, a, b in cmp.verdict_changes],
        "topology_changes": [{"test": k, "a": a, "b": b} for k, a, b in cmp.topology_changes],
        "only_a": cmp.only_a,
        "only_b": cmp.only_b,
    }
