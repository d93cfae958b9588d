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
from ktstr.results.compare import compare_metric, compare_runs


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
    # 30% more work: improvement, not regression.
    d = compare_metric("k", "work_units.sum", 1000, 1300)
    assert d.improved and not d.regressed
    # 30% less work: regression.
    assert compare_metric("k", "work_units.sum", 1000, 700).regressed
    # Gap 1 ms -> 2 ms is +100% but under the 20 ms absolute gate.
    assert not compare_metric("k", "max_gap_ms.max", 1.0, 2.0).regressed
    assert compare_metric("k", "max_gap_ms.max", 100.0, 130.0).regressed
    # Neutral metrics never gate.
    assert not compare_metric("k", "migrations.sum", 10, 100).regressed
    # Within the relative threshold.
    assert not compare_metric("k", "work_units.sum", 1000, 950).regressed


def test_compare_identical_pair_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [_record("t::a", _workers()), _record("t::b", _workers(1.1))]
    _write_run(tmp_path, "a", recs)
    _write_run(tmp_path, "b", copy.deepcopy(recs))
    assert _stats(["--root", str(tmp_path), "compare", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "0 regression(s)" in out
    cmp = compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    assert len(cmp.deltas) == 2 * len(recs[0]["summary"])


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
