"""Telemetry math with hand-computed expectations, and JSON round trips."""

from __future__ import annotations

import json

import pytest

from ktstr.telemetry import (
    CgroupStats,
    LatencySummary,
    ScenarioResult,
    WorkerStats,
    coefficient_of_variation,
    max_gap,
    off_cpu_pct,
    percentile,
    spread,
)


def test_percentile_linear_interpolation() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5  # ranks 1.5 -> between 2 and 3
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)  # 3 + 0.97 * (4 - 3)
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7], 99) == 7
    assert percentile(list(range(101)), 99) == 99
    with pytest.raises(ValueError):
        percentile([], 50)


def test_spread_and_cv() -> None:
    assert spread([40.0, 55.5, 47.0]) == 15.5
    assert spread([3.0]) == 0.0
    # mean 5, population variance (9+1+1+1+0+0+4+16)/8 = 4, stdev 2 -> CV 0.4
    assert coefficient_of_variation([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(0.4)
    assert coefficient_of_variation([0, 0]) == 0.0
    assert coefficient_of_variation([5]) == 0.0


def test_max_gap_includes_edges() -> None:
    assert max_gap([1, 3, 7], 0, 10) == 4  # edges 0,1,3,7,10 -> gaps 1,2,4,3
    assert max_gap([], 0, 10) == 10  # no progress at all: the whole window
    assert max_gap([9.5], 0, 10) == 9.5  # a late first checkpoint is a leading gap
    assert max_gap([20], 0, 10) == 10  # checkpoints outside the window are ignored


def test_off_cpu_pct() -> None:
    assert off_cpu_pct(1000, 250) == 75.0
    assert off_cpu_pct(1000, 1200) == 0.0  # clock skew clamps
    assert off_cpu_pct(0, 5) == 0.0


def test_latency_summary_from_ns() -> None:
    s = LatencySummary.from_ns([1000, 2000, 3000, 4000], max_ns=9000)
    assert (s.count, s.p50_us, s.max_us) == (4, 2.5, 9.0)
    assert s.p99_us == pytest.approx(3.97)
    assert LatencySummary.from_ns([]).count == 0
    kept = LatencySummary.from_ns([1000, 3000], count=10_000)
    assert kept.count == 10_000 and kept.p50_us == 2.0


def _worker(cgroup: str, idx: int, off: float, rate_units: int) -> WorkerStats:
    wall = 2_000_000_000
    return WorkerStats(cgroup=cgroup, index=idx, pid=100 + idx, work="cpu_spin",
                       work_units=rate_units, wall_ns=wall,
                       cpu_ns=int(wall * (100 - off) / 100), off_cpu_pct=off, max_gap_ms=10 * idx,
                       cpus_used=[idx], allowed_cpus=[0, 1])


def test_cgroup_aggregate() -> None:
    ws = [_worker("a", 0, 40.0, 200), _worker("a", 1, 50.0, 400)]
    c = CgroupStats.aggregate("a", [1, 0], ws)
    assert c.cpus == [0, 1]
    assert c.work_units == 600
    assert c.off_cpu_spread == 10.0
    # rates 100/s and 200/s: mean 150, stdev 50 -> CV 1/3
    assert c.throughput_cv == pytest.approx(1 / 3)
    assert c.max_gap_ms == 10
    assert c.wake_p99_us is None


def test_result_json_round_trip() -> None:
    w = _worker("a", 0, 40.0, 200)
    w.wake_latency = LatencySummary(3, 1.0, 2.0, 3.0)
    r = ScenarioResult("steady", "1n1l2c1t", 2.0, [w], [CgroupStats.aggregate("a", [0], [w])])
    text = json.dumps(r.to_dict())
    back = ScenarioResult.from_dict(json.loads(text))
    assert back.workers[0] == w
    assert back.workers[0].work_rate == 100.0
    assert back.cgroup("a").work_units == 200
