"""The pytest plugin and @ktstr_test, driven through pytester (no VM boots here)."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ktstr.checks import CheckResult, reported_checks
from ktstr.errors import KtstrError
from ktstr.gauntlet import Variant, write_plan
from ktstr.initramfs import BaseArchive
from ktstr.runner import GuestRun
from ktstr.sandbox.detect import detect_kvm
from ktstr.testing import ktstr_test, spec_of
from ktstr.testing.run import judge
from ktstr.vmm.vm import VmResult

pytest_plugins = ["pytester"]

# When ktstr is installed the pytest11 entry point loads the plugin; otherwise load it by name.
_INSTALLED = any(ep.name == "ktstr" for ep in entry_points(group="pytest11"))
PLUGIN = [] if _INSTALLED else ["-p", "ktstr.testing.plugin"]

SUITE = '''
from ktstr.testing import ktstr_test

@ktstr_test(topology="1n2l2c1t", duration=1.0)
def test_steady(ctx):
    return {}

@ktstr_test(topology="1n1l2c2t", scheduler="scx_qmap", requires_smt=True, expect_err=True)
def test_pinned(ctx):
    return {}

def test_plain():
    assert True
'''


VM = VmResult(exit_code=0, console="", channel2=b"", timed_out=False, panicked=False,
              boot_ms=1.0, exit_counts=[], duration_s=1.0, reason="poweroff")
BASE = BaseArchive(Path("/nonexistent"), "k", 0, True, 0.0, 0, "/py", ())


def scenario(ctx: object) -> dict[str, int]:
    """A module-level scenario function for decorator checks (never booted here)."""
    return {}


def two_args(ctx: object, extra: object) -> None:
    return None


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTSTR_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("KTSTR_RUN_ID", "unit")
    monkeypatch.delenv("KTSTR_SCHEDULER", raising=False)
    monkeypatch.delenv("KTSTR_KERNEL", raising=False)
    monkeypatch.delenv("KTSTR_IN_SANDBOX", raising=False)


def test_collects_decorated_functions_as_vm_items(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest(*PLUGIN, "--collect-only", "-q")
    result.stdout.fnmatch_lines(
        ["test_suite.py::test_steady", "test_suite.py::test_pinned", "test_suite.py::test_plain"]
    )
    # The VM items carry the `vm` marker, so `-m "not vm"` leaves only the plain test.
    result = pytester.runpytest(*PLUGIN, "-m", "not vm", "-q")
    result.assert_outcomes(passed=1, deselected=2)


def test_pinned_own_keeps_only_the_sessions_own_pinned_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE + '''
import pytest

@pytest.mark.pins_scheduler("eevdf")
def test_boots_its_own():
    assert True
''')
    def collected(*args: str) -> set[str]:
        result = pytester.runpytest(*PLUGIN, "--collect-only", "-q", *args)
        return {line.split("::")[-1] for line in result.stdout.lines if "::" in line}

    everything = {"test_steady", "test_pinned", "test_plain", "test_boots_its_own"}
    assert collected() == everything
    assert collected("--ktstr-pinned", "own") == everything - {"test_pinned"}
    assert collected("--ktstr-pinned", "own", "--ktstr-scheduler", "scx_qmap") == \
        everything - {"test_boots_its_own"}


def test_bad_declaration_fails_collection_with_clear_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bad='''
from ktstr.testing import ktstr_test

@ktstr_test(topology="2n3l2c1t")
def test_x(ctx):
    return {}
'''
    )
    result = pytester.runpytest(*PLUGIN, "--collect-only")
    result.stdout.fnmatch_lines(["*llcs (3) must be a multiple of numa_nodes (2)*"])
    assert result.ret != 0


def test_bad_scheduler_option_is_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest(*PLUGIN, "--ktstr-scheduler", "scx_nope", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown scheduler 'scx_nope'*"])


def test_unwritable_results_directory_is_usage_error_before_any_vm(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = pytester.path / "blocker"
    blocker.write_text("a file where the results directory's parent should be")
    monkeypatch.setenv("KTSTR_RESULTS_DIR", str(blocker / "results"))
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest(*PLUGIN, "-k", "test_steady")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*results directory*blocker is not a directory*KTSTR_RESULTS_DIR*"])
    # Plain tests and collection alone do not need it.
    assert pytester.runpytest(*PLUGIN, "-k", "test_plain").ret == 0
    assert pytester.runpytest(*PLUGIN, "--collect-only", "-q").ret == 0


def test_unusable_kvm_outside_sandbox_says_how_to_run(pytester: pytest.Pytester) -> None:
    status = detect_kvm()
    if status.usable:
        pytest.skip(f"this machine's KVM is usable ({status.reason}); the message is not shown")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest(*PLUGIN, "-k", "test_steady")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*KVM is unusable on this machine*nox -s vm_tests*"])
    # A clear message, not a traceback through the plugin.
    assert "Traceback" not in result.stdout.str()


def test_dump_specs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    out = pytester.path / "specs.json"
    result = pytester.runpytest(*PLUGIN, "--collect-only", "-q", "--ktstr-dump-specs", str(out))
    assert result.ret == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"test_steady", "test_pinned"}
    assert rows["test_pinned"]["scheduler"] == "scx_qmap"
    assert rows["test_pinned"]["constraints"]["requires_smt"] is True
    assert rows["test_pinned"]["constraints"]["sched_ext_only"] is True
    assert rows["test_steady"]["duration_s"] == 1.0
    assert rows["test_steady"]["nodeid"] == "test_suite.py::test_steady"


def test_gauntlet_plan_expands_items(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    plan = [
        Variant("test_steady", "scx_simple", "default", "tiny-2llc", "1n2l2c1t", 10.0),
        Variant("test_steady", "scx_qmap", "batch", "smt-1llc", "1n1l2c2t", 11.0),
        Variant("test_other", "eevdf", "default", "tiny-1llc", "1n1l4c1t", 10.0),
    ]
    write_plan(plan, pytester.path / "plan.json")
    result = pytester.runpytest(*PLUGIN, "--collect-only", "-q", "--ktstr-gauntlet", "plan.json")
    result.stdout.fnmatch_lines(
        [
            "test_suite.py::test_steady[[]scx_simple@default-tiny-2llc[]]",
            "test_suite.py::test_steady[[]scx_qmap@batch-smt-1llc[]]",
        ]
    )
    assert "test_pinned" not in result.stdout.str()


def test_decorator_validation() -> None:
    with pytest.raises(KtstrError, match="timeout=2 must exceed duration=3"):
        ktstr_test(duration=3, timeout=2)(scenario)
    with pytest.raises(KtstrError, match="duration=-1"):
        ktstr_test(duration=-1)(scenario)
    with pytest.raises(KtstrError, match="does not divide evenly"):
        ktstr_test(topology="2n2l2c1t", memory_mb=1025)(scenario)
    with pytest.raises(KtstrError, match="unknown scheduler"):
        ktstr_test(scheduler="nope")(scenario)
    with pytest.raises(KtstrError, match="needs SMT"):
        ktstr_test(topology="1n1l2c1t", requires_smt=True)(scenario)
    with pytest.raises(KtstrError, match="fifo_vcpus=True needs performance_mode=True"):
        ktstr_test(fifo_vcpus=True)(scenario)
    with pytest.raises(KtstrError, match="exactly one argument"):
        ktstr_test(two_args)
    with pytest.raises(KtstrError, match="module level"):

        @ktstr_test
        def nested(ctx: object) -> None:
            return None

    spec = spec_of(ktstr_test(scheduler="scx_qmap@batch", memory_mb=512)(scenario))
    assert spec is not None and spec.profile is not None and spec.profile.name == "batch"
    assert spec.target.endswith(":scenario")
    perf = spec_of(ktstr_test(performance_mode=True, fifo_vcpus=True)(scenario))
    assert perf is not None and perf.performance_mode and perf.fifo_vcpus


def test_disk_config_validated_at_decoration() -> None:
    from ktstr.disks import DiskConfig, Filesystem

    with pytest.raises(KtstrError, match="too small"):
        ktstr_test(disk=DiskConfig(capacity_mb=10, filesystem=Filesystem.BTRFS))(scenario)
    with pytest.raises(KtstrError, match="not a DiskConfig"):
        ktstr_test(disk=["256M"])(scenario)
    spec = spec_of(ktstr_test(disk=DiskConfig(capacity_mb=256))(scenario))
    assert spec is not None and len(spec.disks) == 1


def test_judge_and_expect_err() -> None:
    good = GuestRun(VM, BASE)
    bad_check = [CheckResult("starvation", False, value=0, threshold=1, worker="cg0[1]")]
    crashed = GuestRun(VM, BASE, failure="watchdog", message="stall 5s")
    assert judge(good, [], expect_err=False).passed
    v = judge(good, bad_check, expect_err=False)
    assert not v.passed and "starvation cg0[1]: value 0 (threshold 1)" in v.reason
    v = judge(crashed, [], expect_err=False)
    assert v.status == "error" and "watchdog: stall 5s" in v.reason
    assert judge(crashed, [], expect_err=True).passed
    assert judge(good, bad_check, expect_err=True).passed
    v = judge(good, [], expect_err=True)
    assert not v.passed and "expect_err=True" in v.reason


def test_checks_from_assert_result_dict() -> None:
    parsed = reported_checks(
        {"passed": False, "checks": [{"name": "gap", "passed": False, "value": 2500,
                                      "threshold": 2000, "worker": "cg0[0]"}]}
    )
    assert parsed is not None and parsed[0].name == "gap" and not parsed[0].passed
    assert reported_checks({"workers": []}) is None


def test_expect_err_regex() -> None:
    stall = GuestRun(VM, BASE, failure="scheduler_ejected",
                     message="scheduler 'qmap' was ejected (runnable task stall)")
    assert judge(stall, [], expect_err="stall").passed
    v = judge(stall, [], expect_err="scx_bpf_error")
    assert not v.passed and "not as expected" in v.reason
    with pytest.raises(KtstrError, match="not a regex"):
        ktstr_test(expect_err="(")(scenario)


def test_guest_entry_adapts_ctx_and_result() -> None:
    from types import SimpleNamespace

    from ktstr.checks import AssertResult, Checks

    seen = {}

    def body(ctx: object) -> AssertResult:
        seen["duration"] = ctx.duration  # type: ignore[attr-defined]
        seen["checks"] = ctx.checks  # type: ignore[attr-defined]
        return AssertResult.fail("worker cg0[0] made no progress")

    body.__qualname__ = "scenario"
    body.__module__ = __name__
    entry = ktstr_test(body)
    ctx = SimpleNamespace(duration_s=3.0, args={"checks": {"max_gap_ms": 100.0}})
    out = entry(ctx)
    assert seen["duration"] == 3.0
    assert isinstance(seen["checks"], Checks) and seen["checks"].max_gap_ms == 100.0
    assert out["kind"] == "assert_result" and out["passed"] is False
    parsed = reported_checks(out)
    assert parsed and not parsed[0].passed and "no progress" in parsed[0].message


def test_a_resumed_run_skips_the_vm_tests_that_already_passed(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    from ktstr.results.sidecar import write_sidecar

    pytester.makepyfile(test_suite=SUITE)
    results = pytester.path / "results"
    monkeypatch.setenv("KTSTR_RESULTS_DIR", str(results))
    write_sidecar({"test": "test_suite.py::test_steady", "verdict": "pass"}, "unit", results)
    write_sidecar({"test": "test_suite.py::test_pinned", "verdict": "fail"}, "unit", results)
    (results / "unit" / "torn.json").write_text('{"test": "test_suite.py::test_pl')
    monkeypatch.setenv("KTSTR_RESUME", "1")
    result = pytester.runpytest(*PLUGIN, "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*resuming run unit: 1 VM test(s) passed*"])
    assert "test_suite.py::test_steady" not in result.stdout.str()
    result.stdout.fnmatch_lines(["test_suite.py::test_pinned", "test_suite.py::test_plain"])
    monkeypatch.delenv("KTSTR_RESUME")
    result = pytester.runpytest(*PLUGIN, "--collect-only", "-q")
    result.stdout.fnmatch_lines(["test_suite.py::test_steady"])


def test_pinned_own_runs_a_pinned_test_only_in_its_schedulers_session(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    eevdf = pytester.runpytest(*PLUGIN, "--collect-only", "-q", "--ktstr-pinned", "own")
    eevdf.stdout.fnmatch_lines(["test_suite.py::test_steady", "test_suite.py::test_plain",
                                "*1 deselected*"])
    assert "test_pinned" not in eevdf.stdout.str()
    qmap = pytester.runpytest(*PLUGIN, "--collect-only", "-q", "--ktstr-pinned", "own",
                              "--ktstr-scheduler", "scx_qmap@default")
    qmap.stdout.fnmatch_lines(["test_suite.py::test_steady", "test_suite.py::test_pinned"])


def test_trace_and_repro_options(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    bad = pytester.runpytest(*PLUGIN, "--collect-only", "--ktstr-repro", "sometimes")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    ok = pytester.runpytest(*PLUGIN, "--collect-only", "-q", "--ktstr-trace",
                            "--ktstr-repro", "on-failure")
    assert ok.ret == pytest.ExitCode.OK
