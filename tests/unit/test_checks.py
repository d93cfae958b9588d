"""Checks: thresholds, overrides, verdicts and the messages they print."""

from __future__ import annotations

import pytest

from ktstr.checks import AssertResult, Checks, evaluate, is_starved, scheduler_health
from ktstr.errors import KtstrError
from ktstr.telemetry import LatencySummary, ScenarioResult, WorkerStats

S = 1_000_000_000


def w(cgroup: str = "cg", idx: int = 0, *, units: int = 1000, cpu_share: float = 0.5,
      gap_ms: float = 10.0, cpus: tuple[int, ...] = (0,), allowed: tuple[int, ...] = (0, 1),
      bad: tuple[int, ...] = (), p99: float | None = None, migrations: int = 0) -> WorkerStats:
    wall = 2 * S
    return WorkerStats(
        cgroup=cgroup, index=idx, pid=4000 + idx, work="cpu_spin", work_units=units,
        wall_ns=wall, cpu_ns=int(wall * cpu_share), off_cpu_pct=100 * (1 - cpu_share),
        max_gap_ms=gap_ms, cpus_used=list(cpus), allowed_cpus=list(allowed),
        isolation_violations=list(bad), migrations=migrations,
        wake_latency=LatencySummary(10, p99 / 2, p99, p99) if p99 is not None else None,
    )


def result(*workers: WorkerStats) -> ScenarioResult:
    return ScenarioResult("t", "1n1l2c1t", 2.0, list(workers))


def by_name(results: list, name: str):  # type: ignore[no-untyped-def]
    return next(r for r in results if r.name == name)


def test_healthy_run_passes_every_default_check() -> None:
    out = evaluate(result(w(idx=0), w(idx=1, cpus=(1,))))
    assert [r.name for r in out] == ["starvation", "isolation", "fairness", "max_gap"]
    assert all(r.passed for r in out)


def test_zero_progress_is_starvation_with_worker_cgroup_cpu_number() -> None:
    out = evaluate(result(w(idx=0), w("victims", 1, units=0, cpu_share=0.0, cpus=(1,))))
    r = by_name(out, "starvation")
    assert not r.passed and r.value == 1
    assert r.message == ("worker victims[1] pid 4001 in cgroup victims (CPUs 1) made 0 work "
                         "units in 2.00 s")
    assert r.cgroup == "victims"


def test_throttled_worker_is_starved_but_busy_fair_worker_is_not() -> None:
    c = Checks()
    # Under a FIFO hog: 950 ms gaps, 2.5 % of the CPU.
    assert is_starved(w(gap_ms=950, cpu_share=0.025), c)
    # Long gap but a fair share (e.g. a big burst of work between checkpoints): not starved.
    assert not is_starved(w(gap_ms=950, cpu_share=0.4), c)
    # Little CPU but frequent progress (blocking work types): not starved.
    assert not is_starved(w(gap_ms=120, cpu_share=0.02), c)
    msg = by_name(evaluate(result(w("v", 0, gap_ms=956, cpu_share=0.028, cpus=(1,)))),
                  "starvation").message
    assert "worker v[0] pid 4000 in cgroup v (CPUs 1) went 956 ms without progress" in msg
    assert "on-CPU 2.8% (< 10%)" in msg


def test_isolation_message_names_cpu_and_cpuset() -> None:
    out = evaluate(result(w("a", 0, cpus=(0, 1), allowed=(0,), bad=(1,))))
    r = by_name(out, "isolation")
    assert not r.passed
    assert r.message == "worker a[0] pid 4000 in cgroup a ran on CPU 1 outside its cpuset 0"


def test_fairness_spread_threshold_and_message() -> None:
    ok = by_name(evaluate(result(w(idx=0, cpu_share=0.5), w(idx=1, cpu_share=0.36))), "fairness")
    assert ok.passed and ok.value == pytest.approx(14.0)
    bad = by_name(evaluate(result(w(idx=0, cpu_share=0.5), w(idx=1, cpu_share=0.3, cpus=(1,)))),
                  "fairness")
    assert not bad.passed and bad.value == pytest.approx(20.0)
    assert bad.message.startswith("cgroup cg: off-CPU spread 20.0 points (> 15); worker "
                                  "cg[1] pid 4001 70.0% off-CPU on CPUs 1")
    # Separate cgroups are not compared with each other.
    assert by_name(evaluate(result(w("a", cpu_share=0.9), w("b", cpu_share=0.1))),
                   "fairness").passed


def test_max_gap_and_overrides() -> None:
    out = evaluate(result(w(gap_ms=2500, cpu_share=0.5)))
    r = by_name(out, "max_gap")
    assert not r.passed and r.value == 2500 and r.threshold == 2000
    assert "longest gap between progress checkpoints 2500.0 ms (> 2000 ms)" in r.message
    assert by_name(evaluate(result(w(gap_ms=2500)), {"max_gap_ms": 3000}), "max_gap").passed
    assert "max_gap" not in [x.name for x in evaluate(result(w()), {"max_gap_ms": None})]


def test_optional_checks() -> None:
    c = Checks(wake_p99_us=100, throughput_cv=0.1, migration_ratio=0.01, min_work_rate=600)
    res = result(w(idx=0, p99=250, units=1000, migrations=50), w(idx=1, units=1000))
    from ktstr.telemetry import CgroupStats

    res.cgroups = [CgroupStats.aggregate("cg", [0, 1], res.workers)]
    out = evaluate(res, c)
    assert not by_name(out, "wake_p99").passed
    assert "p99 wake latency 250.0 us (> 100 us)" in by_name(out, "wake_p99").message
    assert by_name(out, "throughput_cv").passed  # equal rates
    mig = by_name(out, "migration_ratio")
    assert not mig.passed and mig.value == pytest.approx(0.05)
    rate = by_name(out, "min_work_rate")  # 1000 units / 2 s = 500/s < 600
    assert not rate.passed and "work rate 500.0/s (< 600/s)" in rate.message


def test_checks_resolution_order_and_unknown_field() -> None:
    c = Checks.resolve(scheduler={"fairness_spread_pct": 30, "max_gap_ms": 4000},
                       test={"max_gap_ms": 1000})
    assert (c.fairness_spread_pct, c.max_gap_ms) == (30, 1000)
    assert Checks().override(Checks(max_gap_ms=10)).max_gap_ms == 10
    with pytest.raises(KtstrError, match="unknown threshold 'fairnes'"):
        Checks().override({"fairnes": 1})


def test_assert_result_from_checks_and_round_trip() -> None:
    out = evaluate(result(w(units=0, cpu_share=0)))
    verdict = AssertResult.from_checks(out)
    assert not verdict.passed
    assert verdict.details[0].startswith("FAIL starvation: worker cg[0]")
    assert AssertResult.from_dict(verdict.to_dict()) == verdict
    merged = AssertResult.ok("fine").merge(AssertResult.fail("custom reason"))
    assert not merged.passed and merged.details == ["fine", "custom reason"]


CONSOLE_OK = """[    1.2] sched_ext: BPF scheduler "simple" enabled
[    9.8] sched_ext: BPF scheduler "simple" disabled (unregistered from user space)
"""

CONSOLE_BAD = """[    1.2] sched_ext: BPF scheduler "qmap" enabled
[    5.0] sched_ext: BPF scheduler "qmap" disabled (runnable task stall)
[    5.0] sched_ext: qmap: kworker/1:1[73] failed to run for 4.9s
[    6.1] BUG: kernel NULL pointer dereference, address: 0000000000000008
[    6.2] ------------[ cut here ]------------
[    6.2] WARNING: CPU: 1 PID: 73 at kernel/sched/ext.c:1234 scx_ops_bypass+0x1/0x2
[    7.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
[    8.0] INFO: task kworker/0:2:88 blocked for more than 120 seconds.
"""


def test_scheduler_health() -> None:
    assert all(r.passed for r in scheduler_health(CONSOLE_OK))
    out = {r.name: r for r in scheduler_health(CONSOLE_BAD)}
    assert not out["sched_ext_ejected"].passed
    assert "disabled (runnable task stall)" in out["sched_ext_ejected"].message
    assert not out["kernel_bug"].passed and "NULL pointer" in out["kernel_bug"].message
    assert not out["kernel_warning"].passed and out["kernel_warning"].value == 2
    assert not out["rcu_stall"].passed
    assert not out["hung_task"].passed and "blocked for more than 120" in out["hung_task"].message
    assert out["kernel_oops"].passed
    # evaluate() folds the log in when given one
    names = [r.name for r in evaluate(result(w()), log_text=CONSOLE_BAD) if not r.passed]
    assert "sched_ext_ejected" in names


def test_evaluate_accepts_dicts_from_the_guest() -> None:
    data = result(w(units=0, cpu_share=0)).to_dict()
    del data["name"]
    assert not by_name(evaluate(data), "starvation").passed
    failed = AssertResult.fail("custom reason").to_dict()
    out = evaluate({**failed, "kind": "assert_result"})
    assert [(r.name, r.passed, r.message) for r in out] == [("scenario", False, "custom reason")]
    assert evaluate({"anything": 1}) == []
    assert next(r.name for r in evaluate({}, log_text=CONSOLE_OK)) == "sched_ext_ejected"


def test_cross_node_migration_ratio_check(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from ktstr.scenario.worker import cpu_nodes

    for node, cpus in (("node0", "0-1"), ("node1", "2-3")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus + "\n")
    (tmp_path / "possible").write_text("0-1\n")  # not a node directory
    assert cpu_nodes(str(tmp_path)) == [0, 0, 1, 1]
    hopper = replace(w(idx=0), sampled_migrations=10, cross_node_migrations=6)
    calm = replace(w(idx=1), sampled_migrations=10, cross_node_migrations=1)
    checks = Checks(cross_node_migration_ratio=0.5)
    r = by_name(evaluate(result(hopper, calm), checks), "cross_node_migration_ratio")
    assert not r.passed and r.value == 0.6 and r.worker == "cg[0] pid 4000"
    assert by_name(evaluate(result(calm), checks), "cross_node_migration_ratio").passed
    assert Checks().cross_node_migration_ratio is None
