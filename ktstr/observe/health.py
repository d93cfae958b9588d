"""Checks over the monitor's samples: sustained windows, so one odd sample never fails
a run, and a vCPU the host did not run is never taken for a stalled guest CPU."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ktstr.checks import CheckResult, Checks
from ktstr.observe.monitor import Observation, Sample

HOST_RAN_NS = 1_000_000
"""A vCPU thread that got less host CPU than this between two samples was not run."""


def _longest(flags: Sequence[bool]) -> tuple[int, int]:
    """Longest run of True, and the index where it ends."""
    best = run = 0
    end = -1
    for i, flag in enumerate(flags):
        run = run + 1 if flag else 0
        if run > best:
            best, end = run, i
    return best, end


def imbalance(sample: Sample) -> float:
    nr = [c.nr_running for c in sample.cpus]
    return max(nr) / max(min(nr), 1) if nr else 0.0


def _imbalance_check(samples: list[Sample], limit: float, window: int) -> CheckResult:
    ext = [s for s in samples if s.scx_enabled]
    ratios = [imbalance(s) for s in ext]
    run, end = _longest([r > limit for r in ratios])
    worst = max(ratios, default=0.0)
    if run >= window:
        at = ext[end]
        nr = {c.cpu: c.nr_running for c in at.cpus}
        return CheckResult("monitor_imbalance", False, worst, limit,
                           f"nr_running max/min over {limit:g} for {run} samples in a row "
                           f"(ending at {at.t:.1f} s: {nr})")
    return CheckResult("monitor_imbalance", True, worst, limit,
                       f"{len(ext)} sched_ext samples")


def _dsq_check(samples: list[Sample], limit: int, window: int) -> CheckResult:
    ext = [s for s in samples if s.scx_enabled]
    depths = [max((c.local_dsq_nr for c in s.cpus), default=0) for s in ext]
    run, end = _longest([d > limit for d in depths])
    if run >= window:
        return CheckResult("monitor_dsq_depth", False, max(depths), limit,
                           f"a local DSQ held more than {limit} tasks for {run} samples "
                           f"(ending at {ext[end].t:.1f} s)")
    return CheckResult("monitor_dsq_depth", True, max(depths, default=0), limit)


def _clock_check(samples: list[Sample], limit: int) -> CheckResult:
    worst_run, worst_cpu, worst_t = 0, -1, 0.0
    ncpu = min((len(s.cpus) for s in samples), default=0)
    for i in range(ncpu):
        run = 0
        for prev, cur in itertools.pairwise(samples):
            a, b = prev.cpus[i], cur.cpus[i]
            ran = _host_ran(prev, cur, i)
            if b.nr_running > 0 and b.clock_ns == a.clock_ns and ran:
                run += 1
            elif ran:
                run = 0  # a sample the host did not run the vCPU for leaves the count
            if run > worst_run:
                worst_run, worst_cpu, worst_t = run, b.cpu, cur.t
    if worst_run >= limit:
        return CheckResult("monitor_clock_stall", False, worst_run, limit,
                           f"CPU {worst_cpu} had runnable tasks and its rq clock did not "
                           f"advance for {worst_run} samples (until {worst_t:.1f} s) while "
                           "the host ran its vCPU")
    return CheckResult("monitor_clock_stall", True, worst_run, limit)


def _host_ran(prev: Sample, cur: Sample, vcpu: int) -> bool:
    if vcpu >= len(prev.host_run_ns) or vcpu >= len(cur.host_run_ns):
        return True  # unknown: count it
    a, b = prev.host_run_ns[vcpu], cur.host_run_ns[vcpu]
    return a < 0 or b < 0 or b - a >= HOST_RAN_NS


def monitor_checks(obs: Observation | None, checks: Checks) -> list[CheckResult]:
    """The monitor's checks of one run (none without samples)."""
    if obs is None or len(obs.samples) < 2:
        return []
    samples = list(obs.samples)
    window = max(1, checks.monitor_window)
    out = []
    if checks.monitor_imbalance_ratio is not None:
        out.append(_imbalance_check(samples, checks.monitor_imbalance_ratio, window))
    if checks.monitor_dsq_depth is not None:
        out.append(_dsq_check(samples, checks.monitor_dsq_depth, window))
    if checks.monitor_clock_stall_samples is not None:
        out.append(_clock_check(samples, checks.monitor_clock_stall_samples))
    return out
