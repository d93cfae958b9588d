"""One VM test's pipeline without the VM: spec -> plan -> request -> run -> verdict -> sidecar.

Each stage is the real code; only the guest is stood in for, by the dicts and the
VmResult it would have produced.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from stats_sidecars import BASE, plan

from ktstr.checks import Checks, scheduler_health
from ktstr.results.sidecar import sidecar_record
from ktstr.runner import GuestRun, collect
from ktstr.scenario.runner import apply_checks
from ktstr.scheduler import BUILTIN
from ktstr.telemetry import ScenarioResult, WorkerStats
from ktstr.testing.decorator import to_result_dict
from ktstr.testing.run import RunPlan, evaluate_checks, judge
from ktstr.topology import Topology, run_timeout_s
from ktstr.vmm.vm import VmResult
from ktstr.wire.request import RunRequest


def vm(console: str = "", *, timed_out: bool = False, error: str | None = None,
       reason: str = "poweroff") -> VmResult:
    return VmResult(exit_code=None if timed_out else 0, console=console, channel2=b"",
                    timed_out=timed_out, panicked=False, boot_ms=10.0, exit_counts=[],
                    duration_s=1.0, error=error, reason=reason)


def gappy_result() -> ScenarioResult:
    """What Runner.finish() returns for two workers with a 2.5 s gap each."""
    workers = [WorkerStats(cgroup="cg0", index=i, pid=100 + i, work="spin", work_units=2000,
                           wall_ns=2_000_000_000, cpu_ns=1_800_000_000, max_gap_ms=2500.0,
                           off_cpu_pct=10.0) for i in range(2)]
    return ScenarioResult("s", "1n2l2c1t", 2.0, workers=workers)


def test_a_check_override_given_to_execute_steps_in_the_guest_is_honoured() -> None:
    # In the guest: execute_steps(ctx, steps, checks=Checks(max_gap_ms=5000)) ends with this.
    returned = to_result_dict(apply_checks(gappy_result(), Checks(max_gap_ms=5000.0)))
    # On the host, under the plan's own thresholds (the default 2000 ms gap).
    p = plan()
    assert p.checks.max_gap_ms == 2000.0
    run = GuestRun(vm(), BASE, result=returned)
    checks = evaluate_checks(p, run)
    gap = next(c for c in checks if c.name == "max_gap")
    assert gap.passed and gap.threshold == 5000.0, gap
    assert judge(run, checks, False).passed
    # Telemetry nobody judged is evaluated on the host, with the plan's thresholds.
    unjudged = GuestRun(vm(), BASE, result=gappy_result().to_dict())
    gap = next(c for c in evaluate_checks(p, unjudged) if c.name == "max_gap")
    assert not gap.passed and gap.threshold == 2000.0


@pytest.mark.parametrize(("line", "kind"), [
    ("[    3.1] WARNING: possible circular locking dependency detected", "kernel_warning"),
    ("[    3.1] kernel BUG at mm/slub.c:441!", "kernel_bug"),
    ("[    3.1] general protection fault, probably for non-canonical address 0xdead: 0000",
     "kernel_oops"),
])
def test_the_run_and_the_health_check_read_a_kernel_problem_alike(line: str, kind: str) -> None:
    text = f"boot\n{line}\n"
    run = collect([(0.0, {"type": "result", "value": None}), (1.0, {"type": "end",
                   "exit_code": 0})], [], vm(text), BASE, 0, scenario_mode=True)
    assert run.failure == kind
    health = {c.name: c for c in scheduler_health(text)}
    assert not health[kind].passed and line.strip() in health[kind].message


@pytest.mark.parametrize(("reason", "ejected"), [
    ("unregistered from BPF", False),
    ("unregistered from user space", False),
    ("runtime error", True),
])
def test_the_run_and_the_health_check_agree_on_what_an_ejection_is(reason: str,
                                                                   ejected: bool) -> None:
    text = f'sched_ext: BPF scheduler "qmap" disabled ({reason})\n'
    # The guest never finished: an ejection is the cause, anything else is not.
    run = collect([(0.0, {"type": "hello"})], [], vm(text), BASE, 0, scenario_mode=True)
    assert (run.failure == "scheduler_ejected") is ejected, run.summary()
    health = {c.name: c for c in scheduler_health(text)}
    assert health["sched_ext_ejected"].passed is not ejected


def test_the_console_tail_travels_as_a_field_not_inside_the_message() -> None:
    noise = "".join(f"[ {i}.0] sched_ext: noise line {i}\n" for i in range(200))
    run = collect([(0.0, {"type": "hello"}), (0.5, {"type": "scenario_start"})], [],
                  vm(noise, timed_out=True, error="no poweroff in 5 s", reason="timeout"),
                  BASE, 0, scenario_mode=True)
    assert run.failure == "timeout"
    assert "noise" not in run.message and "console tail" not in run.message
    assert run.console_tail and run.console_tail == run.vm.console_tail
    assert run.summary().endswith(run.console_tail)
    # expect_err matches the failure, never the console that came with it.
    assert not judge(run, [], "noise line").passed
    assert judge(run, [], "poweroff").passed


def test_guest_memory_and_timeout_are_resolved_once_and_recorded_as_booted() -> None:
    p = plan()
    assert p.spec.memory_mb is None and p.spec.timeout is None
    request = p.request()
    assert request.memory_mb is None
    assert request.guest_memory_mb == p.topology.default_memory_mb() == 256
    assert request.timeout_s == run_timeout_s(p.topology, p.spec.duration)
    assert request.topology is p.topology
    # What run_guest booted with is what the sidecar says, not the declaration (None).
    run = GuestRun(vm(), BASE, result=None, memory_mb=request.guest_memory_mb,
                   timeout_s=request.timeout_s)
    record = sidecar_record(p, judge(run, [], False), run, 1.0, 2.0)
    assert record["memory_mb"] == 256
    # The gauntlet plans with the same rule: a test that asks for nothing gets the default.
    from ktstr.gauntlet import GauntletTest

    assert GauntletTest.from_dict(p.spec.to_dict()).memory_mb is None
    big = Topology.parse("1n4l8c2t")
    assert big.default_memory_mb(p.spec.memory_mb) == 64 * big.nr_cpus


def test_the_scheduler_reaches_the_guest_as_one_spec_built_in_one_place() -> None:
    base = plan()
    sched = BUILTIN["scx_central"]
    p = RunPlan(test_id="t", spec=base.spec, test_file=base.test_file, kernel=base.kernel,
                kernel_spec=base.kernel_spec, scheduler=sched, profile=sched.profile("slice"),
                scheduler_binary=Path(sys.executable), topology=base.topology,
                extra_args=("-v",))
    spec = p.scheduler_spec
    assert spec is not None
    assert spec.binary == sys.executable
    assert spec.args == [*sched.command_args(sched.profile("slice")), "-v"] == ["-s", "5000", "-v"]
    assert spec.watchdog_timeout_ms == int(sched.watchdog_timeout * 1000)
    assert (spec.attach_retries, spec.attach_transient) == (4, list(sched.attach.transient))
    request = p.request()
    assert request.scheduler == spec
    wire = RunRequest(scheduler=request.scheduler)
    assert RunRequest.from_json(wire.to_json()).scheduler == spec
    record = sidecar_record(p, judge(GuestRun(vm(), BASE), [], False), GuestRun(vm(), BASE),
                            1.0, 2.0)
    assert record["scheduler"]["watchdog_timeout_s"] == sched.watchdog_timeout
    assert plan().scheduler_spec is None  # EEVDF: nothing to start


def _zero_work_result() -> dict[str, object]:
    res = gappy_result()
    for w in res.workers:
        w.work_units = 0
    return res.to_dict()


def test_a_guest_lost_before_its_scenario_is_inconclusive_even_when_failure_is_expected() -> None:
    lost = GuestRun(vm(timed_out=True, error="guest did not power off", reason="timeout"),
                    BASE, failure="timeout", message="guest did not power off within 60 s")
    for expect in (False, True, "timeout"):
        verdict = judge(lost, [], expect)
        assert (verdict.passed, verdict.status) == (False, "inconclusive"), expect
        assert verdict.reason.startswith("inconclusive: the guest was lost before")
    # The same timeout once the scenario had started is the scheduler's failure.
    late = GuestRun(vm(timed_out=True, reason="timeout"), BASE, failure="timeout",
                    message="guest did not power off", timings={"scenario_start": 3.0})
    assert judge(late, [], False).status == "error"
    # A scheduler that failed before the scenario is a signal, not a lost guest.
    attach = GuestRun(vm(), BASE, failure="scheduler_attach", message="init failed")
    assert judge(attach, [], False).status == "error"


def test_a_scenario_where_no_worker_progressed_is_inconclusive() -> None:
    idle = GuestRun(vm(), BASE, result=_zero_work_result())
    verdict = judge(idle, [], False)
    assert verdict.status == "inconclusive" and "none of the 2 workers" in verdict.reason
    assert judge(GuestRun(vm(), BASE, result=gappy_result().to_dict()), [], False).passed


def test_inconclusive_repeats_combine_to_inconclusive_and_its_message_starts_with_it() -> None:
    from ktstr.testing.run import Attempt, combined_verdict, format_failure

    idle = GuestRun(vm(), BASE, result=_zero_work_result())
    verdict = judge(idle, [], False)
    both = [Attempt(verdict, idle, 0.0, 1.0), Attempt(verdict, idle, 1.0, 2.0)]
    assert combined_verdict(both)[0].status == "inconclusive"
    assert format_failure("t [x]", verdict, idle, None).startswith("inconclusive: ")


def test_an_attach_attempt_the_policy_retried_is_not_an_ejection_of_the_run() -> None:
    text = ('sched_ext: BPF scheduler "central" disabled (scx_bpf_error)\n'
            "sched_ext: central: init from non-central CPU\n"
            'sched_ext: BPF scheduler "central" enabled\n')
    attempt = {"attempt": 1, "kind": "scheduler_ejected", "transient": "init from non-central"}
    attached = {"type": "sched_attached", "state": {"state": "enabled", "attempts": [attempt]}}
    run = collect([(0.0, {"type": "hello"}), (0.1, attached),
                   (0.5, {"type": "result", "value": None}), (1.0, {"type": "end",
                                                                     "exit_code": 0})],
                  [], vm(text), BASE, 0, scenario_mode=True)
    assert run.retried_ejections == 1
    assert {c.name: c for c in scheduler_health(text, run.retried_ejections)}[
        "sched_ext_ejected"].passed
    # A later ejection, after the retried one, still fails the run's health.
    again = text + 'sched_ext: BPF scheduler "central" disabled (runtime error)\n'
    health = {c.name: c for c in scheduler_health(again, run.retried_ejections)}
    assert not health["sched_ext_ejected"].passed
    assert "(runtime error)" in health["sched_ext_ejected"].message


def test_a_documented_scheduler_bug_is_a_known_issue_never_a_pass() -> None:
    from ktstr.checks import CheckResult
    from ktstr.testing.run import KNOWN_ISSUE, Attempt, as_known_issue, combined_verdict

    central = BUILTIN["scx_central"]
    ejected = GuestRun(vm(), BASE, failure="scheduler_ejected",
                       message="runtime error: SCX_DSQ_LOCAL[_ON] cannot move migration "
                               "disabled init[86] from CPU 1 to 0")
    known = as_known_issue(judge(ejected, [], False), ejected, central, "test_mixed[x]")
    assert (known.passed, known.status) == (False, KNOWN_ISSUE)
    assert "known issue of scx_central: dispatch_to_cpu()" in known.reason
    assert "cannot move migration disabled init[86]" in known.reason
    # Another failure of the same scheduler stays a failure; so does the same text under
    # a scheduler that does not document it.
    other = GuestRun(vm(), BASE, failure="scheduler_ejected", message="runnable task stall")
    assert as_known_issue(judge(other, [], False), other, central, "t").status == "error"
    simple = BUILTIN["scx_simple"]
    assert as_known_issue(judge(ejected, [], False), ejected, simple, "t").status == "error"
    # flatcg's starvation of cgroup tasks by pinned ones is known only where tasks are pinned.
    flatcg = BUILTIN["scx_flatcg"]
    stall = GuestRun(vm(), BASE, failure="scheduler_ejected",
                     message="runnable task stall: rcu_sched[14] failed to run for 11.2s")
    assert as_known_issue(judge(stall, [], False), stall, flatcg,
                          "test_affinity").status == KNOWN_ISSUE
    assert as_known_issue(judge(stall, [], False), stall, flatcg,
                          "test_steady[1n1l4c1t]").status == "error"
    # A passing run stays a pass; a failed check can be a known issue too.
    fine = GuestRun(vm(), BASE)
    assert as_known_issue(judge(fine, [], False), fine, central, "t").passed
    check = CheckResult("sched_ext_ejected", False,
                        message="SCX_DSQ_LOCAL[_ON] cannot move migration disabled x[1]")
    assert as_known_issue(judge(fine, [check], False), fine, central, "t").status == KNOWN_ISSUE
    # Repeats: all known -> known; known beside a plain failure -> the failure.
    k = Attempt(known, ejected, 0.0, 1.0)
    f = Attempt(judge(other, [], False), other, 1.0, 2.0)
    assert combined_verdict([k, k])[0].status == KNOWN_ISSUE
    assert combined_verdict([k, f])[0].status == "error"


def test_a_known_issue_is_validated_where_it_is_declared() -> None:
    from ktstr.errors import KtstrError
    from ktstr.scheduler import KnownIssue, Scheduler

    with pytest.raises(KtstrError, match="needs its reason"):
        KnownIssue("stall", " ")
    with pytest.raises(KtstrError, match="known issue pattern"):
        KnownIssue("(", "why")
    with pytest.raises(KtstrError, match="known_issues must be KnownIssue"):
        Scheduler("s", known_issues=("stall",))  # type: ignore[arg-type]
    # with_args keeps them (negative tests build on the built-ins).
    assert BUILTIN["scx_central"].with_args("-v").known_issues == \
        BUILTIN["scx_central"].known_issues


def test_a_guest_that_hangs_after_a_retried_attach_is_not_blamed_on_the_retried_ejection() -> None:
    text = ('sched_ext: BPF scheduler "central" disabled (scx_bpf_error)\n'
            "sched_ext: central: init from non-central CPU\n"
            'sched_ext: BPF scheduler "central" enabled\n')
    attempt = {"attempt": 1, "kind": "scheduler_ejected", "transient": "init from non-central"}
    attached = {"type": "sched_attached", "state": {"state": "enabled", "attempts": [attempt]}}
    msgs = [(0.0, {"type": "hello"}), (0.1, attached), (0.2, {"type": "scenario_start"})]
    hung = collect(msgs, [], vm(text, timed_out=True, error="guest did not power off",
                                reason="timeout"), BASE, 0, scenario_mode=True)
    assert hung.failure == "timeout", hung.message
    # An ejection after the retried one is still the cause of a guest that never finished.
    later = text + ('sched_ext: BPF scheduler "central" disabled (runtime error)\n'
                    "sched_ext: central: SCX_DSQ_LOCAL[_ON] cannot move migration disabled\n")
    ejected = collect(msgs, [], vm(later, timed_out=True, reason="timeout"), BASE, 0,
                      scenario_mode=True)
    assert ejected.failure == "scheduler_ejected"
    assert "cannot move migration disabled" in ejected.message


def test_the_sidecar_keeps_when_each_guest_phase_began() -> None:
    p = plan()
    run = GuestRun(vm(), BASE, result=None)
    run.timings.update({"hello": 9.5, "scenario_start": 10.25, "scenario_end": 12.3,
                        "end": 12.5, "result": 12.4, "prep_s": 0.5})
    timings = sidecar_record(p, judge(run, [], False), run, 1.0, 2.0)["timings"]
    # The phase marks only (not every message type), on the host clock since VM start.
    assert timings["guest_s"] == {"hello": 9.5, "scenario_start": 10.25,
                                  "scenario_end": 12.3, "end": 12.5}
    assert timings["prep_s"] == 0.5
    bare = sidecar_record(p, judge(GuestRun(vm(), BASE), [], False), GuestRun(vm(), BASE),
                          1.0, 2.0)
    assert bare["timings"]["guest_s"] is None
    assert bare["timings"]["guest_steps_s"] is None


def test_the_guests_start_up_steps_are_kept_only_where_sane() -> None:
    # The guest is hostile: only the steps its message declares, and plausible durations.
    timed = [(1.0, {"type": "hello", "steps": {"mounts": 0.5, "channel": 1, "bad name": 1.0,
                                                **{f"s{i}": 0.1 for i in range(40)}}}),
             (2.0, {"type": "scenario_start",
                    "steps": {"import": 0.75, "setup": -1.0, "disks": 1e9, "mounts": 9.0}}),
             (3.0, {"type": "scenario_end", "steps": {"late": 1.0}}),  # not a start-up mark
             (4.0, {"type": "end", "exit_code": 0})]
    run = collect(timed, [], vm(), BASE, 0, scenario_mode=True)
    steps = run.startup_steps
    assert steps == {"mounts": 0.5, "channel": 1.0, "import": 0.75}
    assert all(isinstance(v, float) for v in steps.values())
    timings = sidecar_record(plan(), judge(run, [], False), run, 1.0, 2.0)["timings"]
    assert timings["guest_steps_s"]["import"] == 0.75
    # A steps field, or a step, of the wrong type is refused with the message.
    for bad in ([1, 2], {"mounts": True}, {"channel": "1.0"}):
        refused = collect([(1.0, {"type": "hello", "steps": bad})], [], vm(), BASE, 0,
                          scenario_mode=True)
        assert refused.startup_steps == {} and refused.channel_errors
