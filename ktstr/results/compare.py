"""A/B comparison of two runs: per-metric deltas behind absolute and relative gates.

A metric regresses when it moved in its *worse* direction (more gap or
latency, less work) by more than the relative threshold **and** by more than
its absolute gate; the absolute gate keeps tiny numbers (1 ms -> 2 ms gap)
from failing on noise. Neutral metrics are reported, never gated. Verdict
changes (a pass that now fails) always regress.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ktstr.results.sidecar import Record, is_number, metric_direction, result_key

DEFAULT_REL_THRESHOLD = 0.10
"""Relative change (fraction of the baseline) a metric may move in its worse direction."""

# Absolute gates by metric-name fragment (first match wins); default 0.
ABS_GATES: tuple[tuple[str, float], ...] = (
    ("gap_ms", 20.0),
    ("gap_us", 20_000.0),
    ("latency_us", 50.0),
    ("latency_ns", 50_000.0),
    ("lat_us", 50.0),
    ("spread", 2.0),
    ("starv", 0.5),
)


@dataclass(frozen=True)
class MetricDelta:
    key: str
    metric: str
    a: float
    b: float
    direction: int
    regressed: bool
    improved: bool

    @property
    def delta(self) -> float:
        return self.b - self.a

    @property
    def rel(self) -> float:
        if self.a == 0:
            return 0.0 if self.b == 0 else math.copysign(math.inf, self.delta)
        return self.delta / abs(self.a)


@dataclass
class Comparison:
    deltas: list[MetricDelta] = field(default_factory=list)
    verdict_changes: list[tuple[str, str, str]] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricDelta]:
        return [d for d in self.deltas if d.regressed]

    @property
    def verdict_regressions(self) -> list[tuple[str, str, str]]:
        return [c for c in self.verdict_changes if c[1] == "pass" and c[2] != "pass"]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions or self.verdict_regressions)


def abs_gate(metric: str, overrides: Mapping[str, float] | None = None) -> float:
    for table in (overrides or {}).items(), ABS_GATES:
        for fragment, gate in table:
            if fragment in metric:
                return gate
    return 0.0


def compare_metric(
    key: str,
    metric: str,
    a: float,
    b: float,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
    abs_overrides: Mapping[str, float] | None = None,
) -> MetricDelta:
    direction = metric_direction(metric)
    worse = (b - a) * -direction if direction else 0.0  # >0 means moved the wrong way
    gate = abs_gate(metric, abs_overrides)
    rel = abs(b - a) / abs(a) if a else (math.inf if b != a else 0.0)
    moved = abs(b - a) > gate and rel > rel_threshold
    return MetricDelta(
        key=key,
        metric=metric,
        a=a,
        b=b,
        direction=direction,
        regressed=moved and worse > 0,
        improved=moved and worse < 0,
    )


def compare_runs(
    run_a: Sequence[Record],
    run_b: Sequence[Record],
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
    abs_overrides: Mapping[str, float] | None = None,
) -> Comparison:
    """Match results by (test, scheduler@profile, topology) and diff their summaries."""
    by_a = {result_key(r): r for r in run_a}
    by_b = {result_key(r): r for r in run_b}
    out = Comparison(
        only_a=sorted(set(by_a) - set(by_b)), only_b=sorted(set(by_b) - set(by_a))
    )
    for key in sorted(set(by_a) & set(by_b)):
        ra, rb = by_a[key], by_b[key]
        va, vb = str(ra.get("verdict", "?")), str(rb.get("verdict", "?"))
        if va != vb:
            out.verdict_changes.append((key, va, vb))
        sa: dict[str, Any] = ra.get("summary") or {}
        sb: dict[str, Any] = rb.get("summary") or {}
        for metric in sorted(set(sa) & set(sb)):
            xa, xb = sa[metric], sb[metric]
            if not is_number(xa) or not is_number(xb):
                continue
            out.deltas.append(
                compare_metric(key, metric, float(xa), float(xb), rel_threshold, abs_overrides)
            )
    return out


def format_comparison(cmp: Comparison, show_all: bool = False) -> list[str]:
    """Human-readable lines: one per metric (changed ones unless ``show_all``)."""
    lines: list[str] = []
    current = None
    for d in cmp.deltas:
        if not show_all and not (d.regressed or d.improved):
            continue
        if d.key != current:
            current = d.key
            lines.append(current)
        mark = "REGRESSION" if d.regressed else ("improved" if d.improved else "")
        arrow = {1: "higher is better", -1: "lower is better", 0: "neutral"}[d.direction]
        rel = "n/a" if math.isinf(d.rel) else f"{d.rel * 100:+.1f}%"
        lines.append(
            f"  {d.metric:<28} {d.a:>12.3f} -> {d.b:>12.3f}  delta {d.delta:+.3f} ({rel})"
            f"  [{arrow}] {mark}".rstrip()
        )
    for key, va, vb in cmp.verdict_changes:
        tag = "REGRESSION" if (va == "pass" and vb != "pass") else "changed"
        lines.append(f"{key}: verdict {va} -> {vb} {tag}")
    for key in cmp.only_a:
        lines.append(f"{key}: only in A")
    for key in cmp.only_b:
        lines.append(f"{key}: only in B")
    n_reg = len(cmp.regressions) + len(cmp.verdict_regressions)
    lines.append(
        f"{len(cmp.deltas)} metric(s) compared, {n_reg} regression(s), "
        f"{sum(d.improved for d in cmp.deltas)} improvement(s)"
    )
    return lines
