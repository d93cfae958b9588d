"""Result sidecars and ``ktstr stats``: write, list, show, compare, report."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ktstr.errors import KtstrError
from ktstr.results import load_run, resolve_run, summarize_workers, write_sidecar
from ktstr.results.cli import register
from ktstr.results.compare import Status, compare_runs, compare_samples
from ktstr.results.metrics import METRICS, REGISTRY
from ktstr.results.sidecar import sidecar_name


def _stats(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    args = parser.parse_args(["stats", *argv])
    return int(args.func(args))


def _workers(scale_work: float = 1.0, scale_gap: float = 1.0) -> list[dict[str, Any]]:
    return [
        {"cgroup": "cg0", "worker": i, "work_units": int((1000 + 100 * i) * scale_work),
         "max_gap_ms": (100.0 + 10 * i) * scale_gap, "migrations": 3 + i, "cpus_used": [0, i % 2]}
        for i in range(4)
    ]


def _record(test: str, workers: list[dict[str, Any]], verdict: str = "pass") -> dict[str, Any]:
    return {
        "test": test,
        "kernel": {"id": "6.12", "version": "6.12.117", "key": "k"},
        "scheduler": {"name": "scx_simple", "profile": "default", "flags": [], "args": []},
        "topology": "1n2l2c1t",
        "duration_s": 2.0,
        "verdict": verdict,
        "metrics": {"workers": workers},
        "summary": summarize_workers(workers),
        "timings": {"wall_s": 7.5},
    }


def _write_run(root: Path, run: str, records: list[dict[str, Any]]) -> Path:
    for rec in records:
        write_sidecar(rec, run=run, root=root)
    return root / run


def test_summary_direction_aware() -> None:
    summary = summarize_workers(_workers())
    assert summary["workers"] == 4
    assert summary["work_units.sum"] == 1000 + 1100 + 1200 + 1300
    assert summary["work_units.min"] == 1000
    assert summary["max_gap_ms.max"] == 130.0
    assert summary["migrations.sum"] == 3 + 4 + 5 + 6
    assert "max_gap_ms.sum" not in summary


def test_sidecar_roundtrip_and_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTSTR_RUN_ID", "r-env")
    monkeypatch.setenv("KTSTR_RESULTS_DIR", str(tmp_path))
    path = write_sidecar(_record("tests/vm/test_x.py::test_a", _workers()))
    assert path.parent == tmp_path / "r-env"
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and data["run_id"] == "r-env"
    loaded = load_run(tmp_path / "r-env")
    assert [r["test"] for r in loaded] == ["tests/vm/test_x.py::test_a"]
    assert resolve_run("latest") == tmp_path / "r-env"
    with pytest.raises(KtstrError, match="previous"):
        resolve_run("previous")
    with pytest.raises(KtstrError, match="not found"):
        resolve_run("nope")
    monkeypatch.setenv("KTSTR_RUN_ID", "../escape")
    with pytest.raises(KtstrError, match="KTSTR_RUN_ID"):
        write_sidecar(_record("t", []))


def test_compare_metric_gates() -> None:
    def status(metric: str, a: float, b: float) -> Status:
        return compare_samples("k", METRICS[metric], [a], [b]).status

    # One run a side: the gates alone decide. 30% more work: improvement, not regression.
    assert status("work_units.sum", 1000, 1300) is Status.IMPROVED
    assert status("work_units.sum", 1000, 700) is Status.REGRESSED
    # Gap 1 ms -> 2 ms is +100% but under the 20 ms absolute gate.
    assert status("max_gap_ms.max", 1.0, 2.0) is Status.UNCHANGED
    assert status("max_gap_ms.max", 100.0, 130.0) is Status.REGRESSED
    # Migrations gate loosely (100 absolute and 50%): counts swing with placement.
    assert status("migrations.sum", 10, 100) is Status.UNCHANGED
    # Within the relative gate.
    assert status("work_units.sum", 1000, 950) is Status.UNCHANGED


def test_compare_identical_pair_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [_record("t::a", _workers()), _record("t::b", _workers(1.1))]
    _write_run(tmp_path, "a", recs)
    _write_run(tmp_path, "b", copy.deepcopy(recs))
    assert _stats(["--root", str(tmp_path), "compare", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "0 regression(s)" in out
    cmp = compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    measured = [m for m in REGISTRY if m.extract(recs[0]) is not None]
    assert len(cmp.results) == 2 * len(measured) > 0


@pytest.mark.parametrize(
    ("workers", "metric"),
    [
        (_workers(scale_work=0.7), "work_units"),  # 30% less work
        (_workers(scale_gap=1.3), "max_gap_ms"),  # 30% longer stalls
    ],
)
def test_compare_flags_injected_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: list[dict[str, Any]], metric: str
) -> None:
    _write_run(tmp_path, "base", [_record("t::a", _workers()), _record("t::b", _workers())])
    _write_run(tmp_path, "cand", [_record("t::a", workers), _record("t::b", _workers())])
    assert _stats(["--root", str(tmp_path), "compare", "base", "cand"]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "REGRESSION" in line]
    assert flagged and all(metric in line for line in flagged)
    assert "-30.0%" in out or "+30.0%" in out
    # A looser threshold lets the same pair pass.
    assert _stats(["--root", str(tmp_path), "compare", "base", "cand", "--threshold", "35"]) == 0


def test_compare_verdict_regression(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", [_record("t::a", _workers())])
    _write_run(tmp_path, "b", [_record("t::a", _workers(), verdict="fail")])
    assert _stats(["--root", str(tmp_path), "compare", "a", "b"]) == 1
    assert _stats(["--root", str(tmp_path), "compare", "b", "a"]) == 0


def test_bad_abs_option(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", [_record("t::a", _workers())])
    with pytest.raises(KtstrError, match="METRIC=NUMBER"):
        _stats(["--root", str(tmp_path), "compare", "a", "a", "--abs", "gap"])


def test_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failing = _record("t::b", _workers(), verdict="fail")
    failing["reason"] = "check starvation failed: worker cg0/2 did 0 work units"
    failing["checks"] = [{"name": "starvation", "passed": False, "value": 0, "threshold": 1}]
    _write_run(tmp_path, "run1", [_record("t::a", _workers()), failing])
    assert _stats(["--root", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "run1" in out and "fail=1" in out and "pass=1" in out
    assert _stats(["--root", str(tmp_path), "show", "run1"]) == 0
    out = capsys.readouterr().out
    assert "worker cg0/2 did 0 work units" in out
    assert "check starvation: value 0 threshold 1" in out
    assert "total wall time 15.0s" in out


def test_report_html(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with_timeline = _record("t::a", _workers())
    with_timeline["timeline"] = {
        "interval_ms": 100,
        "workers": {"cg0/0": [0, 10, 20, 30], "cg0/1": [0, 5, 9, 30]},
        "cpus": {"0": [1.0, 0.5, 1.0, 1.0], "1": [0.0, 1.0, 1.0]},
    }
    run = _write_run(tmp_path, "r", [with_timeline, _record("t::b", _workers())])
    assert _stats(["--root", str(tmp_path), "report", "r"]) == 0
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    png = tmp_path / "one.png"
    assert _stats(["--root", str(tmp_path), "report", "r", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_flattens_nested_latency() -> None:
    rows = [
        {"cgroup": "a", "index": 0, "pid": 10, "work_units": 5,
         "wake_latency": {"count": 3, "p99_us": 80.0}},
        {"cgroup": "a", "index": 1, "pid": 11, "work_units": 7,
         "wake_latency": {"count": 4, "p99_us": 120.0}},
    ]
    summary = summarize_workers(rows)
    assert summary["wake_latency_p99_us.max"] == 120.0
    assert "pid.sum" not in summary and "index.sum" not in summary
    assert summary["work_units.min"] == 5


def test_sidecar_names_are_unique_per_test_id(tmp_path: Path) -> None:
    ids = ["tests/vm/test_x.py::test_x[a/b]", "tests/vm/test_x.py::test_x[a b]",
           "tests/vm/test_x.py::test_x[a_b]"]
    paths = [write_sidecar(_record(t, _workers()), run="r", root=tmp_path) for t in ids]
    assert len(set(paths)) == len(ids)
    assert sorted(r["test"] for r in load_run(tmp_path / "r")) == sorted(ids)
    for path in paths:  # still readable: the sanitized id leads
        assert path.name.startswith("tests_vm_test_x.py_test_x_a_b___scx_simple__default__")
        assert path.suffix == ".json" and len(path.name.encode()) < 255
    # The parts do not run together, and a rerun of one identity replaces its result.
    assert sidecar_name("t__s") != sidecar_name("t", "s")
    assert sidecar_name("t", "s", "p") != sidecar_name("t", "", "s", "p")
    assert sidecar_name("t", "s", "p", "1n") == sidecar_name("t", "s", "p", "1n")
    long_a, long_b = sidecar_name("t" * 1000 + "a"), sidecar_name("t" * 1000 + "b")
    assert long_a != long_b and len(long_a) < 255
    assert not sidecar_name(".hidden").startswith(".")


def test_sidecars_with_old_names_are_still_read(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Written before names carried a hash: <test>__<sched>__<profile>__<topology>.json
    old = tmp_path / "old"
    old.mkdir()
    record = {"schema": 1, "run_id": "old", **_record("t::a", _workers())}
    (old / "t_a__scx_simple__default__1n2l2c1t.json").write_text(json.dumps(record))
    _write_run(tmp_path, "new", [_record("t::a", _workers(scale_work=0.7))])
    assert _stats(["--root", str(tmp_path), "compare", "old", "new"]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert _stats(["--root", str(tmp_path), "show", "old"]) == 0
    assert "t::a [scx_simple@default 1n2l2c1t]" in capsys.readouterr().out
    assert _stats(["--root", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out.count("pass=1") == 2


BAD_SIDECARS = [
    (b"{", "not a readable sidecar"),
    (b"\xff\xfe{}", "not a readable sidecar"),
    (b"[" * 100_000, "not a readable sidecar"),
    (b'{"verdict": "pass"}', "no 'test'"),
    (b'{"test": 5}', "no 'test'"),
    (b'{"test": "t", "scheduler": "x"}', "'scheduler' must be an object"),
    (b'{"test": "t", "summary": [1]}', "'summary' must be an object"),
    (b'{"test": "t", "timings": {"wall_s": "abc"}}', "timings.wall_s must be a number"),
    (b'{"test": "t", "checks": [1]}', "'checks' must be a list of objects"),
    (b'{"test": "t", "metrics": {"workers": 3}}', "metrics.workers must be a list of objects"),
    (b'{"test": "t", "verdict": ["pass"]}', "'verdict' must be a string"),
    (b'{"test": "t", "timeline": {"cpus": [1]}}', "timeline.cpus must be an object"),
    (b'{"test": "t", "timeline": {"interval_ms": "x"}}', "timeline.interval_ms must be a number"),
]


@pytest.mark.parametrize(("content", "reason"), BAD_SIDECARS,
                         ids=[f"{i}-{reason}" for i, (_, reason) in enumerate(BAD_SIDECARS)])
def test_bad_sidecar_is_a_one_line_error(tmp_path: Path, content: bytes, reason: str) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "a.json").write_bytes(content)
    for argv in (["show", "r"], ["show", "r", "--json"], ["compare", "r", "r"], ["report", "r"]):
        with pytest.raises(KtstrError, match=reason) as err:
            _stats(["--root", str(tmp_path), *argv])
        assert "\n" not in str(err.value) and "a.json" in str(err.value)


def test_list_survives_a_bad_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path, "good", [_record("t::a", _workers())])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.json").write_text('{"test": "t", "scheduler": "x"}')
    assert _stats(["--root", str(tmp_path), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("good") and "pass=1" in line for line in lines)
    (bad,) = [line for line in lines if line.startswith("bad")]
    assert "unreadable" in bad and "'scheduler' must be an object" in bad


def test_runs_that_are_files_are_user_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(KtstrError, match="not a directory"):
        _stats(["--root", str(tmp_path), "show", str(plain)])
    with pytest.raises(KtstrError, match="not a directory"):
        _stats(["--root", str(plain), "list"])
    with pytest.raises(KtstrError, match="not found"):
        _stats(["--root", str(tmp_path), "show", str(tmp_path / "missing")])


def test_report_output_that_cannot_be_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _write_run(tmp_path, "r", [_record("t::a", _workers())])
    with pytest.raises(KtstrError, match="cannot write"):
        _stats(["--root", str(tmp_path), "report", "r", "-o", str(tmp_path / "no" / "r.html")])


def test_compare_threshold_must_be_finite(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", [_record("t::a", _workers())])
    for bad in ("nan", "inf", "-1"):
        with pytest.raises(KtstrError, match="threshold"):
            _stats(["--root", str(tmp_path), "compare", "a", "a", "--threshold", bad])


def test_report_draws_odd_but_well_formed_telemetry(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    odd = _record("t::a", [{"cgroup": "c", "worker": 0, "work_units": "lots", "cpus_used": 3},
                           {"cgroup": "c", "worker": 1, "work_units": 5, "cpus": ["x", 1]}])
    with_timeline = _record("t::b", _workers())
    with_timeline["timeline"] = {"interval_ms": 50, "workers": {"w": []},
                                 "cpus": {"0": [1.0], "a": [0.5], "\u00b2": [0.0], "1": []}}
    _write_run(tmp_path, "r", [odd, with_timeline])
    assert _stats(["--root", str(tmp_path), "report", "r"]) == 0
    assert (tmp_path / "r" / "report.html").read_text().count("data:image/png") == 2
