"""The metric registry, repeated-run sidecars, ``stats metrics`` and ``stats explain``."""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import fields
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from stats_sidecars import Dist, attempt, outcome, plan, record, workers, write_run

from ktstr.checks import Checks, evaluate
from ktstr.errors import KtstrError
from ktstr.results.cli import register
from ktstr.results.metrics import METRICS, REGISTRY, TELEMETRY_CHECKS, Direction, get_metric
from ktstr.results.sidecar import load_run, sidecar_record, summarize_workers
from ktstr.testing import ktstr_test
from ktstr.testing.decorator import check_repeat
from ktstr.testing.run import repeated_record, write_results

pytest_plugins = ["pytester"]
_INSTALLED = any(ep.name == "ktstr" for ep in entry_points(group="pytest11"))
PLUGIN = [] if _INSTALLED else ["-p", "ktstr.testing.plugin"]


def stats(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["stats", *argv])
    return int(args.func(args))


def test_registry_reads_what_the_writer_writes() -> None:
    # Every metric names a field a real sidecar has: drift in the telemetry or the
    # summary's names shows here, not as metrics silently missing from every compare.
    rec = record(plan(), random.Random(1), Dist(), 1)
    assert set(METRICS) == {m.name for m in REGISTRY}
    for m in REGISTRY:
        assert m.extract(rec) is not None, m.name
        assert m.abs_gate >= 0 and 0 <= m.rel_gate < 1 and m.unit and m.description
        assert m.direction in (Direction.HIGHER, Direction.LOWER)
    assert set(summarize_workers(rec["metrics"]["workers"])) >= {
        m.field for m in REGISTRY if m.section == "summary"}
    assert METRICS["work_rate.min"].direction is Direction.HIGHER
    assert METRICS["max_gap_ms.max"].direction is Direction.LOWER
    with pytest.raises(KtstrError, match="unknown metric 'gap'"):
        get_metric("gap")


def test_telemetry_check_names_match_ktstr_checks() -> None:
    known = {f.name for f in fields(Checks)}
    assert set(TELEMETRY_CHECKS.values()) <= known
    everything = Checks(wake_p99_us=1e6, throughput_cv=10.0, migration_ratio=1e6,
                        min_work_rate=0.0)
    rows = workers(random.Random(2), Dist())
    produced = {r.name for r in evaluate({"workers": rows, "cgroups": []}, everything)}
    assert set(TELEMETRY_CHECKS) - {"throughput_cv"} <= produced  # cv needs cgroups


def test_sidecar_records_the_host() -> None:
    p = plan()
    rec = sidecar_record(p, attempt(p, outcome([])).verdict, outcome([]), 1.0, 2.0)
    host = rec["host"]
    assert set(host) == {"cpu_model", "nr_cpus", "loadavg", "kernel_release",
                         "ktstr_version", "sandbox"}
    assert host["nr_cpus"] >= 1 and len(host["loadavg"]) == 3 and host["sandbox"] is False


def test_repeats_keep_every_run_and_fail_if_any_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KTSTR_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("KTSTR_RUN_ID", "r")
    p = plan()
    rng = random.Random(3)
    good = [attempt(p, outcome(workers(rng, Dist())), 100.0 * i, 5.0 + i) for i in range(3)]
    crashed = attempt(p, outcome(None, ok=False, failure_kind="timeout",
                                 failure_message="guest did not finish", boot_ms=None), 400.0)
    attempts = [good[0], crashed, good[1], good[2]]
    rec = repeated_record(p, attempts)
    # Lost before its scenario started, the crashed repeat is inconclusive, and so is the
    # whole (its only failure); never a pass.
    assert rec["verdict"] == "inconclusive"
    assert rec["reason"].startswith("repeat(s) 2 of 4 failed: repeat 2: inconclusive: the "
                                    "guest was lost before the scenario started (timeout")
    assert rec["repeat_shown"] == 2 and rec["failure_kind"] == "timeout"
    assert [r["verdict"] for r in rec["repeats"]] == ["pass", "inconclusive", "pass", "pass"]
    stats_ = rec["repeat_summary"]["work_rate.sum"]
    values = [r["summary"]["work_rate.sum"] for r in rec["repeats"] if r["summary"]]
    assert stats_["n"] == 3 and stats_["mean"] == pytest.approx(statistics.fmean(values))
    assert stats_["stddev"] == pytest.approx(statistics.stdev(values))
    assert (stats_["min"], stats_["max"]) == (min(values), max(values))
    assert rec["repeat_summary"]["wall_s"]["n"] == 4
    assert rec["timings"]["total_wall_s"] == pytest.approx(5 + 6 + 7 + 5)
    verdict, shown, path = write_results(p, attempts)  # what the plugin calls
    assert (verdict.status, shown) == ("inconclusive", 1)
    (loaded,) = load_run(path.parent)
    assert METRICS["work_rate.sum"].samples(loaded) == values
    # All passing: the last run stands for them.
    ok = repeated_record(p, good)
    assert ok["verdict"] == "pass" and ok["repeat_shown"] == 3 and ok["reason"] == ""
    # One run: the single-run shape, no repeat fields.
    single = repeated_record(p, good[:1])
    assert not {"repeats", "repeat_summary", "repeat_shown"} & set(single)


def test_show_counts_every_repeat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = plan()
    rng = random.Random(4)
    rec = repeated_record(p, [attempt(p, outcome(workers(rng, Dist())), 0.0, 2.0)
                              for _ in range(3)])
    write_run(tmp_path, "r", [rec])
    assert stats(["--root", str(tmp_path), "show", "r"]) == 0
    out = capsys.readouterr().out
    assert "x3" in out and "total wall time 6.0s" in out


@pytest.mark.parametrize("bad", [0, 101, -1, True, 2.5, "x", "0", None])
def test_repeat_must_be_1_to_100(bad: object) -> None:
    with pytest.raises(KtstrError, match="from 1 to 100"):
        check_repeat(bad, "here")
    assert check_repeat("7", "here") == 7 and check_repeat(100, "here") == 100


def scenario(ctx: object) -> None:
    return None


def test_decorator_validates_repeat() -> None:
    assert ktstr_test(repeat=3)(scenario).__ktstr_test__.repeat == 3
    with pytest.raises(KtstrError, match=r"scenario: repeat=0 must be"):
        ktstr_test(repeat=0)(scenario)


def test_repeat_option_is_validated(pytester: pytest.Pytester,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTSTR_RESULTS_DIR", str(pytester.path / "results"))
    pytester.makepyfile(test_suite="from ktstr.testing import ktstr_test\n\n"
                                   "@ktstr_test(repeat=2)\ndef test_a(ctx):\n    return {}\n")
    for bad in ("0", "101", "many"):
        result = pytester.runpytest(*PLUGIN, "--ktstr-repeat", bad, "--collect-only")
        assert result.ret != 0
        result.stderr.fnmatch_lines(["*--ktstr-repeat: repeat=* must be a whole number*"])
    result = pytester.runpytest(*PLUGIN, "--ktstr-repeat", "3", "--collect-only", "-q")
    assert result.ret == 0


def test_stats_metrics_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert stats(["metrics"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["metric", "unit", "direction"]
    assert len(lines) == 1 + len(REGISTRY)
    assert any(x.startswith("max_gap_ms.max") and "lower is better" in x for x in lines)
    assert stats(["metrics", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == [m.name for m in REGISTRY]
    assert data[0]["source"] == "summary.work_rate.min"


def _explain(tmp_path: Path, rec: dict[str, object], capsys: pytest.CaptureFixture[str],
             test: str = "t::a") -> dict[str, str]:
    write_run(tmp_path, "r", [rec])
    assert stats(["--root", str(tmp_path), "explain", "r", test]) == 0
    out = capsys.readouterr().out
    rows: dict[str, str] = {}
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" ")
        rows[name] = rest.strip()
    rows["_out"] = out
    return rows


def test_explain_a_scenario_without_telemetry(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    p = plan("t::a")
    assert_result = outcome(None)
    assert_result.result = {"kind": "assert_result", "passed": True, "results": []}
    rows = _explain(tmp_path, repeated_record(p, [attempt(p, assert_result)]), capsys)
    assert rows["work_rate.min"].startswith("missing: no workers telemetry: the scenario "
                                            "returned no ScenarioResult")
    assert rows["boot_ms"].startswith("present:")
    assert "significance needs repeats" in rows["_out"]
    assert rows["starvation"].startswith("not evaluated: no workers telemetry")
    # An AssertResult with an empty console: nothing to scan for kernel trouble.
    assert rows["sched_ext_ejected"].startswith("not evaluated: there was no console log")


def test_explain_a_run_that_failed_before_the_workload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = plan("t::a")
    crashed = outcome(None, ok=False, failure_kind="crash", failure_message="guest panicked",
                      boot_ms=None)
    rows = _explain(tmp_path, repeated_record(p, [attempt(p, crashed)]), capsys)
    assert rows["max_gap_ms.max"] == ("missing: the guest run failed before the scenario "
                                      "returned telemetry (crash: crash: guest panicked)")
    assert rows["boot_ms"].startswith("missing: the VM did not report boot completion (crash")


def test_explain_spinners_have_no_wake_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _explain(tmp_path, record(plan("t::a"), random.Random(5), Dist(wake_us=None), 3),
                    capsys, test="::a")  # a part of the id names it
    assert rows["wake_latency_p99_us.max"].startswith(
        "missing: no worker reported 'wake_latency_p99_us'; it needs workers that sleep")
    assert rows["work_rate.min"].startswith("present:")
    assert "significance needs repeats" not in rows["_out"]
    assert rows["wake_p99"] == ("not evaluated: off by default; enable it with "
                                "checks=Checks(wake_p99_us=...)")
    assert rows["max_gap"] == "passed"


def test_explain_names_a_result(tmp_path: Path) -> None:
    rng = random.Random(6)
    write_run(tmp_path, "r", [record(plan("t::a"), rng, Dist(), 1),
                              record(plan("t::ab"), rng, Dist(), 1)])
    with pytest.raises(KtstrError, match="'t::' names 2 results"):
        stats(["--root", str(tmp_path), "explain", "r", "t::"])
    with pytest.raises(KtstrError, match="no result for 'nope'"):
        stats(["--root", str(tmp_path), "explain", "r", "nope"])
    assert stats(["--root", str(tmp_path), "explain", "r", "t::a"]) == 0  # exact id wins
