"""Cgroup controls: validation, their v1/v2 spelling, the checks that use them, and real
runs on this machine's cgroups (weights, cpu.max, freezing) in a ktstr-<pid> subtree."""

from __future__ import annotations

import os

import pytest

from ktstr.checks import Checks, check_bandwidth, check_weight_share, period_allowance_pct
from ktstr.errors import KtstrError
from ktstr.scenario.cgroups import V1Backend, cgroup_mounts, v1_mounts
from ktstr.scenario.controls import CgroupControls, CpuMax, nice_to_weight, v1_writes, v2_writes
from ktstr.scenario.host import host_session
from ktstr.scenario.model import (
    AddCgroup,
    CaptureCgroupProcs,
    CgroupDef,
    CpusetSpec,
    FreezeCgroup,
    SetControls,
    Step,
    UnfreezeCgroup,
)
from ktstr.scenario.runner import ScenarioContext, execute_steps
from ktstr.telemetry import CgroupStats, WorkerStats


def _stats(name: str, cpu_ns: int, weight: int | None = None, cpus: tuple[int, ...] = (0,),
           cpu_max: float | None = None, wall_ns: int = 10**9,
           controls: str | None = None) -> CgroupStats:
    worker = WorkerStats(cgroup=name, index=0, pid=1, work="spin", work_units=10, cpu_ns=cpu_ns,
                         wall_ns=wall_ns)
    return CgroupStats.aggregate(
        name, cpus, [worker], weight=weight, cpu_max_cpus=cpu_max,
        controls=f"weight={weight}" if controls is None and weight is not None else controls or "",
    )


# ---- validation and encoding ------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(weight=0), "cpu.weight must be 1..10000"),
    (dict(weight=10001), "cpu.weight must be 1..10000"),
    (dict(weight=100, weight_nice=0), "not both"),
    (dict(weight_nice=20), "cpu.weight.nice must be -20..19"),
    (dict(uclamp_min=101.0), "0..100"),
    (dict(uclamp_min=50.0, uclamp_max=20.0), "above cpu.uclamp.max"),
    (dict(memory_max=4096), "memory.max must be >= 1 MiB"),
])
def test_bad_controls_are_refused_when_declared(bad: dict[str, object], match: str) -> None:
    with pytest.raises(KtstrError, match=match):
        CgroupControls(**bad)  # type: ignore[arg-type]


def test_bad_bandwidth_is_refused_when_declared() -> None:
    with pytest.raises(KtstrError, match=r"period must be 1000\.\.1000000"):
        CpuMax(50_000, period_us=0)
    with pytest.raises(KtstrError, match="quota must be >= 1000"):
        CpuMax(10)
    with pytest.raises(KtstrError, match="CPUs must be > 0"):
        CpuMax.cpus(0)
    assert CpuMax.cpus(0.5) == CpuMax(50_000, 100_000)
    assert CpuMax.cpus(0.5).limit_cpus == 0.5


def test_workers_pct_scales_with_the_cpus() -> None:
    d = CgroupDef("a", workers_pct=150)
    assert d.worker_count(2) == 3 and d.worker_count(1) == 2
    assert CgroupDef("a", workers_pct=10).worker_count(4) == 1
    with pytest.raises(KtstrError, match="workers_pct"):
        CgroupDef("a", workers_pct=0)


def test_v2_and_v1_spellings() -> None:
    c = CgroupControls(weight=200, cpu_max=CpuMax(50_000), idle=False, uclamp_min=12.5,
                       memory_max=64 << 20)
    assert [(w.file, w.value) for w in v2_writes(c)] == [
        ("cpu.weight", "200"), ("cpu.max", "50000 100000"), ("cpu.idle", "0"),
        ("cpu.uclamp.min", "12.50"), ("memory.max", str(64 << 20)),
    ]
    assert [(w.file, w.value) for w in v1_writes(c)] == [
        ("cpu.shares", "2048"), ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "50000"), ("cpu.idle", "0"), ("cpu.uclamp.min", "12.50"),
        ("memory.limit_in_bytes", str(64 << 20)),
    ]
    assert [(w.file, w.value) for w in v2_writes(CgroupControls(cpu_max=CpuMax(None)))] == [
        ("cpu.max", "max 100000")]
    assert [(w.value) for w in v1_writes(CgroupControls(weight_nice=-5))] == ["3121"]
    assert nice_to_weight(0) == 100 and nice_to_weight(-5) == 305


def test_merging_keeps_what_is_not_changed() -> None:
    a = CgroupControls(weight=200, cpu_max=CpuMax(50_000))
    b = a.merged(CgroupControls(weight_nice=3))
    assert b.weight is None and b.weight_nice == 3 and b.cpu_max == CpuMax(50_000)
    assert CgroupControls().empty and not b.empty


# ---- the checks ----------------------------------------------------------------


def test_weight_share_check_passes_on_two_to_one_and_fails_on_one_to_one() -> None:
    good = [_stats("a", 660, 200), _stats("b", 340, 100)]
    assert check_weight_share(good, 15).passed
    bad = check_weight_share([_stats("a", 500, 200), _stats("b", 500, 100)], 15)
    assert not bad.passed
    assert "weights 200:100" in bad.message and "b is 50.0% off" in bad.message


def test_weight_share_ignores_cgroups_that_do_not_compete() -> None:
    # Different CPUs, or no weight declared: nothing to compare.
    apart = [_stats("a", 900, 200, cpus=(0,)), _stats("b", 100, 100, cpus=(1,))]
    assert check_weight_share(apart, 15).value is None
    plain = [_stats("a", 900), _stats("b", 100)]
    assert check_weight_share(plain, 15).value is None
    # What decides is the declaration, not the controls' wording.
    worded = [_stats("a", 900, controls="weight.nice? no"), _stats("b", 100)]
    assert check_weight_share(worded, 15).value is None
    explicit_default = [_stats("a", 900, 100), _stats("b", 100)]
    assert not check_weight_share(explicit_default, 15).passed


def test_a_cgroup_record_is_whole_when_built() -> None:
    c = _stats("a", 5, 300, cpu_max=0.5)
    assert (c.weight, c.weight_set, c.cpu_max_cpus, c.controls) == (300, True, 0.5, "weight=300")
    unset = _stats("b", 5)
    assert (unset.weight, unset.weight_set) == (100, False)


def test_bandwidth_check() -> None:
    assert check_bandwidth([_stats("a", 520_000_000, cpu_max=0.5)], 10).passed
    over = check_bandwidth([_stats("a", 800_000_000, cpu_max=0.5)], 10)
    assert not over.passed and "used 0.800 CPUs under cpu.max 0.5 CPUs" in over.message


def test_weight_share_counts_only_the_measurement_window() -> None:
    # w0's worker ran alone for 0.3 s while the harness forked w1's: outside its window.
    def cg(name: str, cpu_ns: int, window_cpu_ns: int, weight: int) -> CgroupStats:
        worker = WorkerStats(cgroup=name, index=0, pid=1, work="spin", work_units=1,
                             cpu_ns=cpu_ns, wall_ns=10**9, window_cpu_ns=window_cpu_ns)
        return CgroupStats.aggregate(name, (0,), [worker], weight=weight)

    group = [cg("w0", 600_000_000, 300_000_000, 100), cg("w1", 300_000_000, 300_000_000, 100)]
    assert group[0].window_cpu_ns == 300_000_000
    result = check_weight_share(group, 15)
    assert result.passed and result.value == 0.0 and "50.0%:50.0%" in result.message
    whole = [cg("w0", 600_000_000, 600_000_000, 100), cg("w1", 300_000_000, 300_000_000, 100)]
    assert not check_weight_share(whole, 15).passed


def test_bandwidth_allows_one_period_of_the_window() -> None:
    # A 1 s window under a 100 ms period can hold 11 periods' quota: 0.55 of a 0.5 limit.
    def capped(cpu_ns: int, wall_ns: int) -> CgroupStats:
        worker = WorkerStats(cgroup="a", index=0, pid=1, work="spin", work_units=1,
                             cpu_ns=cpu_ns, wall_ns=wall_ns)
        return CgroupStats.aggregate("a", (0,), [worker], cpu_max_cpus=0.5,
                                     cpu_max_period_us=100_000)

    short = check_bandwidth([capped(580_000_000, 10**9)], 10)
    assert short.passed and short.threshold == 20.0
    assert "one 100 ms period of 1000 ms" in short.message
    assert not check_bandwidth([capped(610_000_000, 10**9)], 10).passed
    long = check_bandwidth([capped(5_800_000_000, 10 * 10**9)], 10)
    assert not long.passed and long.threshold == 11.0  # the same 0.58 over 10 s is too much
    assert period_allowance_pct(None, 10**9) == 0.0


def test_checks_are_off_by_default() -> None:
    assert Checks().weight_share_pct is None and Checks().bandwidth_pct is None


# ---- real runs on this machine ----------------------------------------------------


def _has_cpu_controller() -> bool:
    v2, v1 = cgroup_mounts()
    if v2:
        with open(os.path.join(v2, "cgroup.controllers")) as f:
            return "cpu" in f.read().split()
    return v1 is not None and "cpu" in v1_mounts()


needs_cpu = pytest.mark.skipif(
    os.geteuid() != 0 or not _has_cpu_controller(),
    reason="needs root and the cpu cgroup controller",
)


@needs_cpu
def test_weights_two_to_one_on_one_cpu() -> None:
    with host_session() as s:
        ctx = ScenarioContext(s.topology, 2.0, s.root, cpu_ids=s.cpu_ids)
        one = CpusetSpec.exact([0])
        result = execute_steps(ctx, [Step(ops=(
            AddCgroup(CgroupDef("heavy", cpuset=one, workers=2,
                                controls=CgroupControls(weight=200))),
            AddCgroup(CgroupDef("light", cpuset=one, workers=2,
                                controls=CgroupControls(weight=100))),
        ))], checks=Checks(weight_share_pct=15, starvation=False, max_gap_ms=None,
                           fairness_spread_pct=None))
    heavy, light = result.cgroup("heavy"), result.cgroup("light")
    ratio = heavy.cpu_ns / light.cpu_ns
    assert 2 / 1.15 <= ratio <= 2 * 1.15, ratio
    share = next(c for c in result.checks if c["name"] == "weight_share")
    assert share["passed"], share["message"]
    assert heavy.controls == "weight=200" and heavy.weight == 200


@needs_cpu
def test_cpu_max_half_a_cpu_is_respected() -> None:
    with host_session() as s:
        ctx = ScenarioContext(s.topology, 1.5, s.root, cpu_ids=s.cpu_ids)
        result = execute_steps(ctx, [Step(ops=(AddCgroup(CgroupDef(
            "capped", cpuset=CpusetSpec.exact([0]), workers=2,
            controls=CgroupControls(cpu_max=CpuMax.cpus(0.5)))),))],
            checks=Checks(bandwidth_pct=10, starvation=False, max_gap_ms=None,
                          fairness_spread_pct=None))
    capped = result.cgroup("capped")
    assert 0.3 < capped.cpus_busy <= 0.55, capped.cpus_busy
    assert capped.cpu_stat.get("nr_throttled", 0) > 0, capped.cpu_stat
    check = next(c for c in result.checks if c["name"] == "bandwidth")
    assert check["passed"], check["message"]


@needs_cpu
def test_weight_changed_midrun_and_freeze_allowance() -> None:
    with host_session() as s:
        ctx = ScenarioContext(s.topology, 1.0, s.root, cpu_ids=s.cpu_ids)
        result = execute_steps(ctx, [
            Step(ops=(AddCgroup(CgroupDef("a", workers=1)),), hold_s=0.3),
            Step(ops=(SetControls("a", CgroupControls(weight=300)), FreezeCgroup("a"),
                      CaptureCgroupProcs("a")), hold_s=0.7),
            Step(ops=(UnfreezeCgroup("a"),), hold_s=0.4),
        ], checks=Checks(max_gap_ms=500))
    a = result.cgroup("a")
    assert a.weight == 300 and a.frozen_ms >= 600
    assert result.workers[0].max_gap_ms >= 600  # it really stopped while frozen
    gap = next(c for c in result.checks if c["name"] == "max_gap")
    assert gap["passed"], gap["message"]  # ...and the freeze is not counted against it
    assert any(n.startswith("capture a at ") and "1 tasks" in n for n in result.notes)
    assert result.passed


def test_a_missing_v1_hierarchy_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    backend = V1Backend(str(tmp_path), companions={})
    with pytest.raises(KtstrError, match="no cgroup v1 cpu hierarchy is mounted"):
        backend.set_controls("a", CgroupControls(weight=200))


@pytest.mark.skipif(os.geteuid() != 0 or cgroup_mounts()[0] is not None
                    or "cpu" not in v1_mounts(), reason="needs root and cgroup v1 cpu")
def test_a_killed_runs_cpu_hierarchy_cgroup_is_reaped() -> None:
    import subprocess

    from ktstr.scenario.host import reap_stale_sessions, session_base

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(v1_mounts()["cpu"], f"ktstr-{dead.pid}")
    os.makedirs(os.path.join(stale, "a"))
    try:
        assert stale in reap_stale_sessions(session_base()[0])
        assert not os.path.exists(stale)
    finally:
        for d in (os.path.join(stale, "a"), stale):
            if os.path.isdir(d):
                os.rmdir(d)
