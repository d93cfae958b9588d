"""`ktstr replay`: which tests a results directory reruns, and how; bad input is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.results.replay import plan_replay, pytest_argv
from ktstr.results.sidecar import file_digest, write_sidecar


def _record(test: str, verdict: str, sha: str | None, sched: str = "scx_simple") -> dict:
    return {"test": test, "verdict": verdict, "topology": "1n1l2c1t",
            "scheduler": {"name": sched, "profile": "default"},
            "kernel": {"id": "6.12", "key": "6.12-test-none-0000"},
            "test_file": {"path": "x", "sha256": sha}}


def test_failed_tests_are_replayed_with_their_kernel_and_scheduler(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    mod = tmp_path / "tests" / "test_a.py"
    mod.write_text("def test_x(): pass\n")
    sha = file_digest(mod)
    records = [_record("tests/test_a.py::test_ok", "pass", sha),
               _record("tests/test_a.py::test_bad[p]", "fail", sha),
               _record("tests/test_a.py::test_lost", "inconclusive", sha, "eevdf")]
    tests = plan_replay(records, [], tmp_path)
    assert [t.nodeid for t in tests] == ["tests/test_a.py::test_bad[p]",
                                         "tests/test_a.py::test_lost"]
    assert tests[0].scheduler == "scx_simple@default" and tests[0].kernel == "6.12"
    assert any("no longer cached" in w for w in tests[0].warnings)
    argvs = pytest_argv(tests, trace=True)
    assert len(argvs) == 2 and "--ktstr-trace" in argvs[0]
    assert argvs[0][-1] == "tests/test_a.py::test_bad[p]"
    # By name; and a changed test file is said to have changed.
    mod.write_text("def test_x(): assert 0\n")
    named = plan_replay(records, ["test_ok"], tmp_path)
    assert [t.nodeid for t in named] == ["tests/test_a.py::test_ok"]
    assert any("changed since the run" in w for w in named[0].warnings)


def test_bad_replays_are_one_line_errors(tmp_path: Path) -> None:
    records = [_record("tests/test_gone.py::test_x", "fail", None)]
    with pytest.raises(KtstrError, match="no longer exists"):
        plan_replay(records, [], tmp_path)
    with pytest.raises(KtstrError, match="no test 'test_nope' in this run"):
        plan_replay(records, ["test_nope"], tmp_path)


def _ktstr(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ktstr", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin", "KTSTR_RESULTS_DIR": str(cwd / "res"),
                               "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def test_replay_command(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = _ktstr("replay", str(tmp_path / "empty"), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().endswith("not a results directory "
                                                               "(no sidecars)"), out.stderr
    (tmp_path / "t.py").write_text("def test_x(): pass\n")
    write_sidecar(_record("t.py::test_x", "fail", file_digest(tmp_path / "t.py")),
                  run="r1", root=tmp_path / "res")
    dry = _ktstr("replay", "r1", "--dry-run", "--sandbox", "never", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "--ktstr-scheduler scx_simple@default t.py::test_x" in dry.stdout
