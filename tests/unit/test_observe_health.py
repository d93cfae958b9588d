"""The monitor's sustained-window checks, over samples made here."""

from __future__ import annotations

from collections.abc import Sequence

from ktstr.checks import CheckResult, Checks
from ktstr.observe.health import monitor_checks
from ktstr.observe.monitor import Observation, Sample
from ktstr.observe.state import CpuSample


def cpu(i: int, nr: int, clock: int, dsq: int = 0) -> CpuSample:
    return CpuSample(cpu=i, nr_running=nr, scx_nr_running=nr, clock_ns=clock, local_dsq_nr=dsq,
                     curr_pid=1, curr_comm="w", curr_class="ext")


def obs(rows: Sequence[tuple[tuple[int, int, int], ...]], *,
        host: Sequence[tuple[int, ...]] | None = None,
        scx: bool = True) -> Observation:
    o = Observation()
    for t, row in enumerate(rows):
        o.samples.append(Sample(t=t * 0.1, cpus=tuple(cpu(i, *c) for i, c in enumerate(row)),
                                host_run_ns=host[t] if host else (), scx_enabled=scx))
    return o


def by_name(o: Observation, checks: Checks | None = None) -> dict[str, CheckResult]:
    return {c.name: c for c in monitor_checks(o, checks or Checks())}


def test_a_sustained_imbalance_fails_and_a_short_one_does_not() -> None:
    balanced = [((2, t, 0), (2, t, 0)) for t in range(10)]
    skew = [((9, t, 0), (1, t, 0)) for t in range(10)]
    assert by_name(obs(balanced))["monitor_imbalance"].passed
    bad = by_name(obs(skew))["monitor_imbalance"]
    assert not bad.passed and "for 10 samples" in bad.message
    blip = balanced[:4] + skew[:4] + balanced[:4]  # 4 < the 5-sample window
    assert by_name(obs(blip))["monitor_imbalance"].passed
    # Only sched_ext runs: EEVDF's own balancing is not this check's business.
    assert by_name(obs(skew, scx=False))["monitor_imbalance"].passed


def test_a_deep_local_dsq_fails_when_sustained() -> None:
    deep = [((60, t, 60), (60, t, 60)) for t in range(6)]
    assert not by_name(obs(deep))["monitor_dsq_depth"].passed
    assert by_name(obs(deep), Checks(monitor_dsq_depth=100))["monitor_dsq_depth"].passed


def test_a_stuck_clock_fails_unless_the_host_did_not_run_that_vcpu() -> None:
    stuck = [((1, 1000, 0), (1, t * 10, 0)) for t in range(8)]  # CPU 0's clock never moves
    bad = by_name(obs(stuck))["monitor_clock_stall"]
    assert not bad.passed and "CPU 0" in bad.message
    # The host gave vCPU 0 no time at all over those samples: exempt.
    idle_host = [(5_000, t * 10_000_000) for t in range(8)]
    assert by_name(obs(stuck, host=idle_host))["monitor_clock_stall"].passed
    # Nothing runnable: an idle CPU's clock may stand still.
    idle = [((0, 1000, 0), (1, t * 10, 0)) for t in range(8)]
    assert by_name(obs(idle))["monitor_clock_stall"].passed


def test_no_samples_no_checks_and_thresholds_can_be_turned_off() -> None:
    assert monitor_checks(None, Checks()) == []
    assert monitor_checks(Observation(), Checks()) == []
    skew = [((9, t, 0), (1, t, 0)) for t in range(10)]
    off = Checks(monitor_imbalance_ratio=None, monitor_dsq_depth=None,
                 monitor_clock_stall_samples=None)
    assert monitor_checks(obs(skew), off) == []
