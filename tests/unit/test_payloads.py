"""Payloads: the real hackbench, cyclictest and stress-ng run here as scenario steps, their
output parsed; bad payloads fail cleanly, naming themselves; the numbers reach the sidecar
and `stats compare`."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from ktstr.checks import check_payloads
from ktstr.errors import KtstrError
from ktstr.results.compare import compare_runs
from ktstr.results.metrics import get_metric, payload_metrics
from ktstr.results.sidecar import payload_sections
from ktstr.scenario import CgroupDef, Step
from ktstr.scenario.cgroups import cgroup_mounts
from ktstr.scenario.host import host_session
from ktstr.scenario.model import KillPayload, RunPayload, WaitPayload
from ktstr.scenario.payload import (
    CYCLICTEST,
    HACKBENCH,
    STRESS_NG_CPU,
    Payload,
    PayloadMetric,
    PayloadOutputError,
    parse_cyclictest,
    parse_hackbench,
    parse_stress_ng,
)
from ktstr.scenario.runner import ScenarioContext, execute_steps
from ktstr.telemetry import ScenarioResult
from ktstr.testing.decorator import KtstrTestSpec, ktstr_test, spec_of
from ktstr.testing.plugin import missing_payloads, payload_binaries

host = pytest.mark.skipif(os.geteuid() != 0 or cgroup_mounts() == (None, None),
                          reason="needs root and a cpuset cgroup controller")


def _out(payload: Payload) -> str:
    proc = subprocess.run([payload.program, *payload.args], capture_output=True, text=True,
                          timeout=60, check=False)
    return proc.stdout + proc.stderr


# ---- parsers, on the programs' real output ------------------------------------------


def test_hackbench_output_parses() -> None:
    assert parse_hackbench(_out(HACKBENCH.with_args("-g", "1", "-l", "50")))["time_s"] > 0


def test_cyclictest_output_parses() -> None:
    m = parse_cyclictest(_out(CYCLICTEST.with_args("-q", "-D", "1", "-t", "2", "-i", "1000",
                                                   "-h", "10000")))
    assert 0 < m["p99_us"] <= m["max_us"]


def test_stress_ng_output_parses() -> None:
    m = parse_stress_ng(_out(STRESS_NG_CPU.with_args("--cpu", "1", "--timeout", "1s",
                                                     "--metrics-brief")))
    assert m["cpu_bogo_ops_s"] > 0


@pytest.mark.parametrize("parse", [parse_hackbench, parse_cyclictest, parse_stress_ng])
def test_output_that_does_not_parse_says_what_it_lacked(parse) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PayloadOutputError):
        parse("Segmentation fault\n")


def test_cyclictest_p99_from_the_histogram() -> None:
    text = ("000001 000090 000000\n000002 000009 000000\n000009 000001 000000\n"
            "# Total: 000000100\n# Max Latencies: 00009\n# Histogram Overflows: 00000\n")
    assert parse_cyclictest(text) == {"max_us": 9.0, "p99_us": 2.0}


def test_bad_payload_declarations() -> None:
    with pytest.raises(KtstrError, match="payload name"):
        Payload("a b", "x")
    with pytest.raises(KtstrError, match="timeout_s must be > 0"):
        Payload("x", "x", timeout_s=0)
    with pytest.raises(KtstrError, match="RunPayload takes a Payload"):
        RunPayload("hackbench")  # type: ignore[arg-type]


# ---- as scenario steps on this machine -------------------------------------------------


def _run(steps: list[Step], setup: list[CgroupDef] | None = None) -> ScenarioResult:
    with host_session() as s:
        ctx = ScenarioContext(s.topology, 1.0, s.root, cpu_ids=s.cpu_ids)
        return execute_steps(ctx, steps, setup=setup or [CgroupDef("load", workers=1)])


@host
def test_hackbench_and_cyclictest_as_steps_give_metrics() -> None:
    result = _run([
        Step(ops=(RunPayload(CYCLICTEST.with_args("-q", "-D", "1", "-t", "1", "-i", "1000",
                                                   "-h", "5000")),
                  RunPayload(HACKBENCH.with_args("-g", "1", "-l", "50"), wait=True)),
             hold_s=0.1),
        Step(ops=(WaitPayload("cyclictest"),), hold_s=0.1),
    ])
    by = {p.label: p for p in result.payloads}
    assert by["hackbench"].exit_code == 0 and by["hackbench"].metrics["time_s"] > 0
    assert by["cyclictest"].metrics["p99_us"] > 0 and not by["cyclictest"].failed
    check = next(c for c in result.checks if c["name"] == "payloads")
    assert check["passed"] and "hackbench (time_s" in check["message"]


@host
def test_a_payload_runs_inside_its_cgroup() -> None:
    where = Payload("where", "/bin/cat", ("/proc/self/cgroup",),
                    parse=lambda text: {"in_cgroup": float("/load" in text)},
                    metrics=(PayloadMetric("in_cgroup", "", True),))
    result = _run([Step(ops=(RunPayload(where, cgroup="load", wait=True),), hold_s=0.1)])
    assert result.payloads[0].metrics == {"in_cgroup": 1.0}, result.payloads[0].output_tail


@host
def test_failing_payloads_fail_the_run_naming_themselves() -> None:
    missing = Payload("ghost", "/nonexistent/ghost")
    crash = Payload("crash", "/bin/sh", ("-c", "echo dying; exit 3"))
    garbled = Payload("garbled", "/bin/echo", ("hello",), parse=parse_hackbench)
    slow = Payload("slow", "/bin/sleep", ("30",), timeout_s=0.3)
    result = _run([Step(ops=tuple(RunPayload(p, wait=True)
                                  for p in (missing, crash, garbled, slow)), hold_s=0.1)])
    errors = {p.label: p.error for p in result.payloads}
    assert "is not here" in str(errors["ghost"])
    assert errors["crash"] == "exited with status 3"
    assert "did not parse: no 'Time: SECONDS' line" in str(errors["garbled"])
    assert errors["slow"] == "did not finish within 0.3 s"
    check = next(c for c in result.checks if c["name"] == "payloads")
    assert not check["passed"] and check["value"] == 4
    assert check["message"].startswith("payload ghost (/nonexistent/ghost) program")
    assert result.passed is False


@host
def test_kill_and_scenario_end_stop_payloads() -> None:
    sleeper = Payload("sleeper", "/bin/sleep", ("30",))
    result = _run([
        Step(ops=(RunPayload(sleeper, label="a"), RunPayload(sleeper, label="b")), hold_s=0.2),
        Step(ops=(KillPayload("a"),), hold_s=0.1),
    ])
    by = {p.label: p for p in result.payloads}
    assert by["a"].killed_by == "KillPayload" and by["b"].killed_by == "scenario end"
    assert not by["a"].failed and by["a"].duration_s < 5
    with pytest.raises(KtstrError, match="no running payload 'nope'"):
        _run([Step(ops=(WaitPayload("nope"),), hold_s=0.1)])


# ---- from the result to the sidecar and stats compare ---------------------------------


def _record(label: str, time_s: float) -> dict[str, object]:
    payloads = [{"label": label, "metrics": {"time_s": time_s}, "units": {"time_s": "s"},
                 "higher_is_better": {"time_s": False}}]
    return {"test": "t", "topology": "1n1l2c1t", "verdict": "pass", "summary": {},
            **payload_sections(payloads)}


def test_payload_metrics_reach_stats_compare() -> None:
    a = [{**_record("hackbench", 1.0), "repeats": [
        {"payload_metrics": {"hackbench.time_s": v}} for v in (1.00, 1.02, 0.98, 1.01, 0.99)]}]
    b = [{**_record("hackbench", 2.0), "repeats": [
        {"payload_metrics": {"hackbench.time_s": v}} for v in (2.00, 2.05, 1.95, 2.02, 1.98)]}]
    metric = get_metric("payload.hackbench.time_s", payload_metrics([*a, *b]))
    assert metric.unit == "s" and metric.direction < 0
    cmp = compare_runs(a, b)
    row = next(r for r in cmp.results if r.metric.name == "payload.hackbench.time_s")
    assert row.status.value == "regressed", row


def test_payload_failure_check_reads_the_last_output_line() -> None:
    from ktstr.telemetry import PayloadResult

    result = ScenarioResult("s", "t", 1.0, payloads=[PayloadResult(
        "x", "x", ["/bin/x"], 1, 0.1, output_tail="a\nboom\n", error="exited with status 1")])
    assert check_payloads(result).message.endswith("last output: boom")


# ---- declared on a test, resolved on the host ---------------------------------------


def test_declared_payloads_are_packed_or_named_missing() -> None:
    def scenario(ctx):  # type: ignore[no-untyped-def]
        return None

    scenario.__qualname__ = "scenario"
    ok: KtstrTestSpec = spec_of(ktstr_test(payloads=[HACKBENCH, CYCLICTEST])(scenario))
    bins = payload_binaries([ok])
    assert [b.name for b in bins] == ["cyclictest", "hackbench"]
    assert missing_payloads(ok) is None
    gone = spec_of(ktstr_test(payloads=[Payload("x", "no-such-program-here",
                                                package="x-tools")])(scenario))
    assert missing_payloads(gone) == ("payload x: program 'no-such-program-here' not found on "
                                      "this host: apt-get install x-tools")
    with pytest.raises(KtstrError, match=re.escape("payloads=['hackbench'] must be a list")):
        ktstr_test(payloads=["hackbench"])(scenario)
