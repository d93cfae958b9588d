"""Auto-repro, traces and replay end to end: an inner pytest run of two failing VM tests
under ``--ktstr-repro on-failure``, then its report and ``ktstr replay``.

- scx_qmap's stall (``-t``) without ``expect_err``: it fails, and the repro, traced and
  probed, fails the same way: "reproduced", with a trace file and a timeline;
- a test whose host check fails only the first time it runs: "did not reproduce";
- ``ktstr replay`` of the inner run with that test reruns exactly it (in a fresh
  process, whose first run fails again) and exits non-zero.

The scheduler is pinned, so this runs once per matrix (in the eevdf session).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

INNER = '''
from ktstr.scenario import CgroupDef
from ktstr.scheduler import BUILTIN
from ktstr.testing import execute_defs, ktstr_test

QMAP_STALL = BUILTIN["scx_qmap"].with_args("-t", "5", name="scx_qmap_stall")
_runs = []


@ktstr_test(topology="1n1l2c1t", scheduler=QMAP_STALL, duration=6.0, watchdog_timeout=2.0,
            gauntlet=False)
def test_qmap_stall_fails(ctx):
    return execute_defs(ctx, [CgroupDef("victims", workers=6)])


def _fail_first_run(run):
    _runs.append(run)
    assert len(_runs) > 1, "injected: this test fails on its first run only"


@ktstr_test(topology="1n1l2c1t", scheduler="eevdf", duration=1.0, gauntlet=False,
            host_check=_fail_first_run)
def test_fails_once(ctx):
    return execute_defs(ctx, [CgroupDef("a", workers=1)])
'''


def _sidecars(root: Path) -> dict[str, dict]:
    out = {}
    for path in root.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "test" in data:
            out[data["test"].rsplit("::", 1)[-1]] = data
    return out


@pytest.mark.pins_scheduler("eevdf")  # boots its own VMs: once per matrix
def test_repro_report_and_replay(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    kernel = request.config.getoption("ktstr_kernel") or "6.12"
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {**os.environ, "KTSTR_RESULTS_DIR": str(tmp_path / "results"),
           "KTSTR_RUN_ID": "inner", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    env.pop("KTSTR_RESUME", None)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
            "-ra", "--ktstr-kernel", kernel, "--ktstr-repro", "on-failure", "test_inner.py"]
    inner = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=1500, check=False)
    out = inner.stdout + inner.stderr
    assert inner.returncode == 1, out[-4000:]
    assert "repro: reproduced" in out, out[-4000:]
    assert "repro: did not reproduce" in out, out[-4000:]
    cars = _sidecars(tmp_path / "results")
    stall = cars["test_qmap_stall_fails"]["repro"]
    assert stall["outcome"] == "reproduced", stall
    assert "enqueue_task_scx" in stall["kprobes"], stall
    trace = Path(stall["trace"]["path"])
    text = trace.read_text()
    assert "sched_switch:" in text and "[001]" in text and "[000]" in text
    assert cars["test_fails_once"]["repro"]["outcome"] == "did not reproduce"

    report = subprocess.run([sys.executable, "-m", "ktstr", "stats", "report",
                             str(tmp_path / "results" / "inner")], env=env,
                            capture_output=True, text=True, timeout=1200, check=False)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "results" / "inner" / "report.html").read_text()
    assert "repro timeline" in page, page[:2000]

    replay = subprocess.run([sys.executable, "-m", "ktstr", "replay", "inner", "test_fails_once",
                             "--sandbox", "never"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900, check=False)
    rout = replay.stdout + replay.stderr
    assert replay.returncode != 0, rout[-3000:]
    command = next(line for line in rout.splitlines() if line.startswith("ktstr replay:"))
    assert "test_fails_once" in command and "test_qmap_stall_fails" not in command, command
