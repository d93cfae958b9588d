"""Host side of `ktstr selftests`: the runner in the kernel entry, guest reports to results,
sidecars, and the command's checks before any VM starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ktstr.cli import main
from ktstr.errors import KtstrError
from ktstr.kernel import cache
from ktstr.kernel.cache import KernelEntry
from ktstr.results.sidecar import load_run, write_sidecar
from ktstr.selftests.build import (
    RunnerBuild,
    cached_runner,
    ensure_runner,
    install_runner,
    list_tests,
)
from ktstr.selftests.parse import SELECT_ENV, SelftestInfo, Status
from ktstr.selftests.run import (
    Outcome,
    SelftestsRun,
    collect,
    live_printer,
    print_results,
    sidecar_records,
    vm_timeout,
)
from ktstr.topology import Topology


def _entry(root: Path, kernel_id: str = "6.12", sched_ext: bool = True) -> KernelEntry:
    """A real cache entry (tiny files) installed by the cache's own installer."""
    src = root / "artifacts"
    src.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in cache.ARTIFACTS:
        (src / name).write_bytes(name.encode())
        files[name] = src / name
    key = f"{kernel_id}-test-tinyconfig-0123456789abcdef"
    return cache.install_entry(root, key, files, {
        "id": kernel_id, "flavour": "test", "version": f"{kernel_id}.1", "built_at": time.time(),
        "features": {"sched_ext": sched_ext}, "source_tree": str(root / "no-such-tree")})


def _cached_real_runner() -> RunnerBuild | None:
    """The 6.12 runner from the kernel cache, if one is built (never builds one)."""
    from ktstr.kernel import list_entries

    return next((b for e in list_entries() if (b := cached_runner(e)) is not None), None)


REAL = _cached_real_runner()
needs_real = pytest.mark.skipif(REAL is None, reason="no sched_ext selftests runner in the "
                                "kernel cache (ktstr selftests --kernel 6.12 --list builds one)")


# --------------------------------------------------------------------------- the entry


def test_runner_is_installed_into_the_entry_and_checked_on_every_use(tmp_path: Path) -> None:
    entry = _entry(tmp_path / "cache")
    assert cached_runner(entry) is None
    binary = tmp_path / "runner"
    binary.write_bytes(b"\x7fELF not really")
    tests = [SelftestInfo("minimal", "Verify we can load a fully minimal scheduler"),
             SelftestInfo("exit")]
    build = install_runner(entry, binary, tests, exact=True, build_seconds=12.5)
    assert build.runner == entry.path / "selftests" / "sched_ext" / "runner"
    assert os.access(build.runner, os.X_OK)
    assert build.tests == tuple(tests) and build.exact and build.build_seconds == 12.5
    assert cached_runner(entry) == build
    assert not list(entry.path.glob(".selftests-tmp-*"))
    cache.load_entry(entry.path)  # the kernel entry itself is still intact
    build.runner.write_bytes(b"\x7fELF changed!!!!")  # same size, other content
    assert cached_runner(entry) is None


def test_a_kernel_without_sched_ext_gets_no_runner(tmp_path: Path) -> None:
    entry = _entry(tmp_path / "cache", "6.1", sched_ext=False)
    with pytest.raises(KtstrError, match=r"6\.1 .*has no sched_ext"):
        ensure_runner(entry)


def test_an_entry_whose_source_tree_is_gone_says_how_to_rebuild(tmp_path: Path) -> None:
    entry = _entry(tmp_path / "cache")
    with pytest.raises(KtstrError, match=r"source tree .* is gone: rebuild it with "
                       r"`ktstr kernel build 6\.12`"):
        ensure_runner(entry)


def test_selection_keeps_the_runner_order_and_rejects_unknown_names() -> None:
    build = RunnerBuild(Path("/r"), tuple(SelftestInfo(n) for n in (
        "select_cpu_dfl", "select_cpu_dfl_nodispatch", "exit")), exact=True, kernel_key="k")
    assert build.select() == ["select_cpu_dfl", "select_cpu_dfl_nodispatch", "exit"]
    assert build.select(["exit", "select_cpu_dfl"]) == ["select_cpu_dfl", "exit"]
    with pytest.raises(KtstrError, match="unknown sched_ext selftests bogus, nope; this "
                       "kernel's runner has: select_cpu_dfl, "):
        build.select(["bogus", "exit", "nope"])
    assert build.also_selected("select_cpu_dfl") == []
    stock = RunnerBuild(build.runner, build.tests, exact=False, kernel_key="k")
    assert stock.also_selected("select_cpu_dfl") == ["select_cpu_dfl_nodispatch"]


@needs_real
def test_the_real_runner_lists_its_tests_and_selects_exactly() -> None:
    assert REAL is not None
    names = [t.name for t in list_tests(REAL.runner)]
    assert names == REAL.names and len(names) >= 20
    assert {"minimal", "select_cpu_dfl", "select_cpu_dfl_nodispatch"} <= set(names)
    only = list_tests(REAL.runner, env={**os.environ, SELECT_ENV: "select_cpu_dfl"})
    assert [t.name for t in only] == ["select_cpu_dfl"]
    assert only[0].description.startswith("Verify the default ops.select_cpu()")


@needs_real
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_listing_on_the_host_makes_no_bpf_call(tmp_path: Path) -> None:
    assert REAL is not None
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), str(REAL.runner), "-s", "-t", "\n"],
                   check=True, capture_output=True)
    calls = {line.split()[1].split("(")[0] for line in trace.read_text().splitlines()
             if len(line.split()) > 1}
    assert "write" in calls and "execve" in calls
    assert not calls & {"bpf", "perf_event_open", "ioctl_bpf", "clone", "clone3", "fork"}


# --------------------------------------------------------------------------- guest reports


def _done(name: str, status: str = "ok", **extra: object) -> dict[str, Any]:
    result: dict[str, object] = {"name": name, "status": status, "reason": "", "duration_s": 0.5,
                                 "exit_code": 0, "output": "", "stderr": "", "kernel": []}
    result.update(extra)
    return {"selftest": "done", "result": result}


def test_reports_become_results_in_the_requested_order() -> None:
    reports: list[dict[str, Any]] = [
        {"selftest": "start", "name": "minimal"}, _done("minimal"),
        {"selftest": "start", "name": "hotplug"}, _done("hotplug", "skip"),
               {"selftest": "start", "name": "exit"},
               _done("exit", "fail", reason="exit.c:42: Expected 1 == 2")]
    results, running = collect(["minimal", "hotplug", "exit"], reports, None, "")
    assert [(r.name, r.status) for r in results] == [
        ("minimal", Status.OK), ("hotplug", Status.SKIP), ("exit", Status.FAIL)]
    assert results[2].reason == "exit.c:42: Expected 1 == 2" and running is None
    run = SelftestsRun(results, None, "", None, 12.0)
    assert run.summary() == "1 passed, 1 failed, 1 skipped in 12.0 s"
    assert not run.ok and run.vm_line() is None


def test_a_vm_failure_fails_the_running_test_and_the_rest_did_not_run() -> None:
    reports: list[dict[str, Any]] = [{"selftest": "start", "name": "minimal"},
                                     _done("minimal"), {"selftest": "start", "name": "hotplug"}]
    results, running = collect(["minimal", "hotplug", "exit"], reports, "panic",
                               "Kernel panic - not syncing: Fatal exception\nconsole tail: ...")
    assert running == "hotplug"
    assert [(r.name, r.status) for r in results] == [
        ("minimal", Status.OK), ("hotplug", Status.FAIL), ("exit", Status.NOT_RUN)]
    assert results[1].reason == ("the VM failed (panic) during this test: Kernel panic - not "
                                 "syncing: Fatal exception")
    run = SelftestsRun(results, "panic", "Kernel panic - not syncing: Fatal exception", running,
                       30.0)
    assert run.summary() == "1 passed, 2 failed (1 not run), 0 skipped in 30.0 s"
    assert run.vm_line() == ("VM failure panic while hotplug ran: Kernel panic - not syncing: "
                             "Fatal exception")


def test_a_kernel_warning_during_a_passing_test_fails_it() -> None:
    lines = ["sched_ext: BPF scheduler \"maximal\" enabled",
             "WARNING: CPU: 1 PID: 80 at kernel/sched/ext.c:1714 dispatch_enqueue+0x1a0/0x2b0"]
    results, _ = collect(["maximal"], [_done("maximal", kernel=lines)], None, "")
    assert results[0].status is Status.FAIL
    assert results[0].reason.startswith("kernel: WARNING: CPU: 1 PID: 80 at kernel/sched/ext.c")


def test_hostile_reports_are_bounded_and_never_raise() -> None:
    bad: list[dict[str, Any]] = [{"selftest": "done", "result": "not a dict"}, {"selftest": "done"},
           {"selftest": "done", "result": {"name": 5}}, {"selftest": "start", "name": ["x"]}]
    huge = _done("exit", "bogus-status", output="o" * 10_000_000, stderr="e" * 10,
                 duration_s=True, exit_code="0", kernel=["k" * 5000] * 5000)
    results, _ = collect(["exit"], [*bad, huge], None, "")
    r = results[0]
    assert r.status is Status.FAIL  # an unknown status is not a pass
    assert len(r.output) == 4096 and r.duration_s is None and r.exit_code is None
    assert len(r.kernel) == 200 and all(len(line) == 300 for line in r.kernel)
    assert Outcome.from_report({"name": "x" * 10_000, "status": "ok"}) is not None


def test_live_lines_are_printed_once_and_a_broken_report_is_ignored() -> None:
    lines: list[str] = []
    printed: set[str] = set()
    handle = live_printer(lines.append, printed)
    handle({"type": "report", "data": _done("minimal")})
    handle({"type": "report", "data": _done("minimal")})
    handle({"type": "report", "data": {"selftest": "start", "name": "exit"}})
    handle({"type": "report", "data": None})
    handle({"type": "report"})
    assert printed == {"minimal"} and len(lines) == 1
    assert lines[0].split() == ["minimal", "ok", "0.5", "s"]
    results, _ = collect(["minimal", "exit"], [_done("minimal"), _done("exit", "timeout",
                                                                        reason="no result")],
                         None, "")
    out: list[str] = []
    print_results(SelftestsRun(results, None, "", None, 3.0), printed, out.append)
    assert [o.split()[:2] for o in out[:-1]] == [["exit", "TIMEOUT"]]
    assert out[-1] == "1 passed, 1 failed (1 timed out), 0 skipped in 3.0 s"


def test_a_skip_without_a_reason_says_so() -> None:
    assert Outcome("hotplug", Status.SKIP, duration_s=0.1).line().endswith(
        "SKIP       0.1 s  (the runner gives no reason)")


def test_the_vm_timeout_covers_every_test_budget() -> None:
    assert vm_timeout(21, 60) > 21 * 60
    assert vm_timeout(1, 10) < vm_timeout(2, 10)


# --------------------------------------------------------------------------- sidecars


def test_one_sidecar_per_test_through_the_results_writer(tmp_path: Path) -> None:
    entry = _entry(tmp_path / "cache")
    results, running = collect(["minimal", "exit"], [
        {"selftest": "start", "name": "minimal"}, _done("minimal"),
        {"selftest": "start", "name": "exit"}], "timeout", "guest timed out")
    run = SelftestsRun(results, "timeout", "guest timed out", running, 40.0)
    records = sidecar_records(run, entry, Topology.parse("1n1l2c1t"), 2048, time.time())
    paths = [write_sidecar(r, run="run-1", root=tmp_path / "results") for r in records]
    assert len({p.name for p in paths}) == 2
    loaded = {r["test"]: r for r in load_run(tmp_path / "results" / "run-1")}
    assert set(loaded) == {"selftests/sched_ext/minimal", "selftests/sched_ext/exit"}
    assert loaded["selftests/sched_ext/minimal"]["verdict"] == "pass"
    exit_record = loaded["selftests/sched_ext/exit"]
    assert exit_record["verdict"] == "fail" and exit_record["failure_kind"] == "fail"
    assert exit_record["vm_failure"] == {"kind": "timeout", "running": "exit"}
    assert exit_record["kernel"]["id"] == "6.12" and exit_record["topology"] == "1n1l2c1t"
    json.dumps(exit_record)


# --------------------------------------------------------------------------- the command


def test_bad_input_is_one_line_before_any_kernel_is_resolved(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import ktstr.kernel

    def no_build(*_args: object, **_kw: object) -> None:
        raise AssertionError("resolve_kernel must not run for bad input")

    monkeypatch.setattr(ktstr.kernel, "resolve_kernel", no_build)
    for argv, message in (
        (["--topology", "9x"], "topology '9x': expected a label"),
        (["--memory-mb", "10"], "--memory-mb 10 is too small"),
        (["--timeout-per-test", "0"], "--timeout-per-test must be positive, got 0"),
    ):
        assert main(["selftests", "--kernel", "6.12", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_a_cached_kernel_without_sched_ext_is_refused_before_any_build(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ktstr.kernel

    def no_build(*_args: object, **_kw: object) -> None:
        raise AssertionError("resolve_kernel would build the kernel")

    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ktstr.kernel, "resolve_kernel", no_build)
    _entry(tmp_path / "cache", "6.1", sched_ext=False)
    assert main(["selftests", "--kernel", "6.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ktstr: error: kernel 6.1 (6.1.1) has no sched_ext (CONFIG_SCHED_CLASS_EXT "
                   "unset): the sched_ext selftests need a 6.12+ kernel, e.g. --kernel 6.12")


@needs_real
def test_an_unknown_test_name_is_refused_before_the_vm(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    assert main(["selftests", "--kernel", "6.12", "-t", "minimal", "-t", "bogus",
                 "--sandbox", "never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ktstr: error: unknown sched_ext selftest bogus; this kernel's runner "
                          "has: create_dsq, ")
    assert len(err.splitlines()) == 1


@needs_real
def test_list_prints_the_runner_tests_without_booting(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    assert REAL is not None
    assert main(["selftests", "--kernel", "6.12", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in listed["tests"]] == REAL.names
    assert listed["exact_selection"] is True
