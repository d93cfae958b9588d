"""The harness's own footprint: steal from /proc/stat, harness CPU, held-open /proc reads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ktstr.scenario.overhead import OverheadMeter, parse_proc_stat, steal_pct
from ktstr.scenario.worker import ProcFiles
from ktstr.telemetry import Overhead, ScenarioResult

STAT_0 = """cpu  10 0 10 100 0 0 0 20 0 0
cpu0 5 0 5 50 0 0 0 10 0 0
cpu1 5 0 5 50 0 0 0 10 0 0
intr 123 4 5
ctxt 99
"""
STAT_1 = """cpu  10 0 10 100 0 0 0 20 0 0
cpu0 15 0 5 60 0 0 0 30 0 0
cpu1 105 0 5 50 0 0 0 10 0 0
"""


def test_steal_is_the_stolen_share_of_each_cpus_elapsed_ticks():
    before, after = parse_proc_stat(STAT_0), parse_proc_stat(STAT_1)
    assert before == {0: (10, 70), 1: (10, 70)}
    # cpu0: 40 ticks elapsed, 20 of them stolen; cpu1: 100 elapsed, none stolen.
    assert steal_pct(before, after) == {0: 50.0, 1: 0.0}


def test_proc_stat_lines_that_are_not_cpus_or_are_malformed_are_ignored():
    assert parse_proc_stat("cpu0 1 2\ncpuX 1 2 3 4 5 6 7 8\ncpu1 a b c d e f g h\n") == {}


def test_meter_reads_this_process_cpu_and_this_hosts_cpus():
    meter = OverheadMeter()
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    got = meter.read()
    assert got.harness_cpu_ms >= 45
    assert 0 < got.harness_cpu_pct <= 100 * (os.cpu_count() or 1)
    assert set(got.steal_pct) == set(parse_proc_stat(Path("/proc/stat").read_text()))
    assert got.harness_pid == os.getpid()


def test_overhead_round_trips_through_the_scenario_result_dict():
    over = Overhead(harness_cpu_ms=12.5, harness_cpu_pct=3.1, steal_pct={0: 48.6, 3: 2.0},
                    harness_pid=1)
    result = ScenarioResult(name="s", topology="1n1l1c1t", duration_s=1.0, overhead=over)
    back = ScenarioResult.from_dict(result.to_dict())
    assert back.overhead == over
    assert back.overhead is not None and back.overhead.max_steal_pct == 48.6
    assert "overhead" not in ScenarioResult(name="s", topology="t", duration_s=1.0).to_dict()


def test_proc_files_reread_the_same_task_and_fail_once_it_is_gone():
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
        os._exit(0)
    files = ProcFiles(pid)
    try:
        first = files.schedstat()[0]
        time.sleep(0.1)
        assert files.schedstat()[0] > first  # same fd, fresh content
        assert 0 <= files.processor() < (os.cpu_count() or 1) * 64
        os.waitpid(pid, 0)
        with pytest.raises(OSError):
            files.schedstat()
    finally:
        files.close()


def test_a_failed_timing_check_says_what_the_host_and_harness_took():
    from ktstr.checks import Checks, evaluate

    def worker(index, cpu_ns):
        from ktstr.telemetry import WorkerStats
        return WorkerStats("cg0", index, 100 + index, "cpu_spin", work_units=10,
                           wall_ns=1_000_000_000, cpu_ns=cpu_ns,
                           off_cpu_pct=100 - cpu_ns / 1e7)
    result = ScenarioResult(
        name="s", topology="1n1l2c1t", duration_s=1.0,
        workers=[worker(0, 900_000_000), worker(1, 500_000_000)],
        overhead=Overhead(harness_cpu_ms=50, harness_cpu_pct=5.0,
                          steal_pct={0: 47.4, 1: 49.8}))
    checks = {c.name: c for c in evaluate(result, Checks())}
    assert not checks["fairness"].passed
    assert checks["fairness"].message.endswith(
        "; meanwhile the host stole 47-50% of each guest CPU; the harness used 5% of one CPU")
    assert checks["isolation"].message == "no worker ran outside its cpuset"
