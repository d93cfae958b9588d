"""The guest-side driver of the sched_ext selftests, run on the host.

The real runner would load BPF schedulers into the host kernel, so a small
stand-in prints what runner.c prints (its format strings) and misbehaves on
demand; the process handling (timeouts, process groups, bounded output, the
sched_ext state check) is the real code.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ktstr.guest.sched import GuestFailure
from ktstr.selftests.guest import GuestArgs, run_all, run_process, run_test
from ktstr.selftests.parse import SELECT_ENV, Status
from ktstr.selftests.run import collect

STAND_IN = textwrap.dedent(f"""\
    #!{sys.executable}
    import os, subprocess, sys, time
    name = os.environ.get("{SELECT_ENV}") or sys.argv[sys.argv.index("-t") + 1]
    mode = os.environ.get("MODE", "ok")
    print("===== START =====\\nTEST: %s\\nDESCRIPTION: d\\nOUTPUT:" % name, flush=True)
    print("working on", name, flush=True)
    if mode == "hang":
        child = subprocess.Popen(["sleep", "300"])
        open(os.environ["PIDFILE"], "w").write(str(child.pid))
        time.sleep(300)
    if mode == "leave_child":
        child = subprocess.Popen(["sleep", "300"])  # inherits stdout and stderr
        open(os.environ["PIDFILE"], "w").write(str(child.pid))
    if mode == "segv":
        os.kill(os.getpid(), 11)
    if mode == "flood":
        sys.stdout.write("o" * (1 << 20))
        sys.stderr.write("e" * (1 << 20))
    if mode == "fail":
        sys.stderr.write("ERR: exit.c:42\\nExpected 1 == 2\\n")
    if mode == "quiet_exit":
        sys.exit(0)
    result = "not ok" if mode == "fail" else "ok"
    print("%s 1 %s # %s" % (result, name, "SKIP " if mode == "skip" else ""))
    print("=====  END  =====")
""")


@pytest.fixture
def runner(tmp_path: Path) -> Path:
    path = tmp_path / "runner"
    path.write_text(STAND_IN)
    path.chmod(0o755)
    return path


@pytest.fixture
def scx(tmp_path: Path) -> Path:
    """A stand-in for /sys/kernel/sched_ext with sched_ext disabled."""
    root = tmp_path / "sched_ext"
    (root / "root").mkdir(parents=True)
    (root / "state").write_text("disabled\n")
    (root / "root" / "ops").write_text("\n")
    return root


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A killed child of a killed parent is reaped by init; a zombie still answers.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def test_a_hanging_test_is_killed_with_its_whole_process_group(runner: Path,
                                                               tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    out = run_process([str(runner), "-t", "reload_loop"], timeout_s=1.5, limit=4096,
                      env=_env(MODE="hang", PIDFILE=str(pidfile)))
    assert out.timed_out
    assert time.monotonic() - start < 6
    assert out.exit_code == -9
    assert "working on reload_loop" in out.stdout
    assert _gone(int(pidfile.read_text())), "the test's child survived the timeout"


def test_a_child_left_holding_the_pipes_is_not_a_timeout(runner: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    out = run_process([str(runner), "-t", "minimal"], timeout_s=30, limit=4096,
                      env=_env(MODE="leave_child", PIDFILE=str(pidfile)))
    assert not out.timed_out and out.exit_code == 0
    assert time.monotonic() - start < 10
    assert "ok 1 minimal" in out.stdout
    assert _gone(int(pidfile.read_text())), "the child left behind was not killed"


def test_output_is_bounded_to_the_last_bytes(runner: Path) -> None:
    out = run_process([str(runner), "-t", "create_dsq"], timeout_s=30, limit=4096,
                      env=_env(MODE="flood"))
    assert len(out.stdout.encode()) <= 4096 and len(out.stderr.encode()) <= 4096
    assert out.stderr == "e" * 4096 and out.stderr_dropped == (1 << 20) - 4096
    assert out.stdout.endswith("=====  END  =====\n")  # the result line survives
    assert out.stdout_dropped > (1 << 20) - 4096


@pytest.mark.parametrize(("mode", "status", "reason"), [
    ("ok", Status.OK, ""),
    ("skip", Status.SKIP, ""),
    ("fail", Status.FAIL, "exit.c:42: Expected 1 == 2"),
    ("segv", Status.FAIL, "runner was killed by SIGSEGV for maximal"),
    ("quiet_exit", Status.FAIL, "runner exited without a result line for maximal"),
])
def test_each_outcome_of_one_runner_process(runner: Path, scx: Path, mode: str, status: Status,
                                            reason: str, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setenv("MODE", mode)
    args = GuestArgs(runner=str(runner), timeout_s=20, settle_s=0.2)
    result = run_test(args, "maximal", None, scx_root=scx)
    assert (result.status, result.reason) == (status.value, reason)
    assert result.state_after == "disabled"
    if mode in ("ok", "fail"):
        assert result.output == "working on maximal"
    assert result.duration_s > 0


def test_the_exact_selection_variable_names_the_test(runner: Path, scx: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "ok")
    exact = run_test(GuestArgs(runner=str(runner), exact=True, settle_s=0.1), "exit", None,
                     scx_root=scx)
    assert exact.status == "ok"
    monkeypatch.setenv(SELECT_ENV, "some_other_test")  # only the wrap reads it
    stock = run_test(GuestArgs(runner=str(runner), exact=False, settle_s=0.1), "exit", None,
                     scx_root=scx)
    assert stock.status == "fail" and "without a result line" in stock.reason
    assert stock.also_ran == ["some_other_test"]


def test_a_test_that_leaves_a_scheduler_attached_fails(runner: Path, scx: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "ok")
    (scx / "state").write_text("enabled\n")
    (scx / "root" / "ops").write_text("maximal\n")
    start = time.monotonic()
    result = run_test(GuestArgs(runner=str(runner), settle_s=0.3), "maximal", None,
                      scx_root=scx)
    assert time.monotonic() - start >= 0.3
    assert result.status == "fail"
    assert result.reason.startswith("left sched_ext 'enabled' with 'maximal' attached 0.3 s")
    assert result.state_after == "enabled"


def test_guest_args_round_trip() -> None:
    args = GuestArgs(runner="/r", tests=("a", "b"), timeout_s=5, exact=False)
    assert GuestArgs.from_dict(args.to_dict()) == args


class Reports:
    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []

    def report(self, data: dict[str, object]) -> None:
        json.dumps(data)  # what the guest context checks before sending
        self.sent.append(data)


def test_a_whole_run_reports_each_test_and_the_host_reads_the_reports(
        runner: Path, scx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "ok")
    reports = Reports()
    names = ("create_dsq", "minimal", "exit")
    value = run_all(GuestArgs(runner=str(runner), tests=names, settle_s=0.1), reports,
                    scx_root=scx)
    assert value == {"completed": 3, "tests": 3, "exact": True}
    assert [(r["selftest"], r.get("name")) for r in reports.sent[::2]] == [
        ("start", n) for n in names]
    results, running = collect(list(names), reports.sent, None, "")
    assert [(r.name, r.status) for r in results] == [(n, Status.OK) for n in names]
    assert running is None


def test_after_a_stuck_scheduler_the_remaining_tests_do_not_run(
        runner: Path, scx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "ok")
    (scx / "state").write_text("disabling\n")  # as if the first test wedged sched_ext
    with pytest.raises(GuestFailure, match=r"sched_ext is 'disabling' .* before any test ran"):
        run_all(GuestArgs(runner=str(runner), tests=("minimal",), settle_s=0.1), Reports(),
                scx_root=scx)

    class Wedge(Reports):
        def report(self, data: dict[str, object]) -> None:
            super().report(data)
            if data.get("selftest") == "start":
                (scx / "state").write_text("enabled\n")

    (scx / "state").write_text("disabled\n")
    reports = Wedge()
    value = run_all(GuestArgs(runner=str(runner), tests=("maximal", "minimal", "exit"),
                              settle_s=0.1), reports, scx_root=scx)
    assert value["completed"] == 1
    results, _ = collect(["maximal", "minimal", "exit"], reports.sent, None, "")
    assert [r.status for r in results] == [Status.FAIL, Status.NOT_RUN, Status.NOT_RUN]
    assert results[1].reason == "sched_ext stuck 'enabled' after maximal"


def test_a_kernel_without_sched_ext_is_a_guest_failure(runner: Path, tmp_path: Path) -> None:
    with pytest.raises(GuestFailure) as info:
        run_all(GuestArgs(runner=str(runner)), Reports(), scx_root=tmp_path / "none")
    assert info.value.kind == "scheduler_unsupported"
