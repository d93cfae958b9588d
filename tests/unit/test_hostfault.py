"""Which failed runs are faults of the emulated host, and when they are rerun."""

from __future__ import annotations

from ktstr.hostfault import SANDBOX_RETRIES, host_fault, should_retry


def test_triple_fault_and_hang_are_host_faults_without_a_guest_crash() -> None:
    fault = host_fault("triple_fault", "vcpu 3: triple fault (shutdown)\nregs", "booting\n")
    assert fault is not None and fault.kind == "triple_fault"
    assert fault.line() == "triple_fault: vcpu 3: triple fault (shutdown)"
    assert host_fault("hung", "guest hung: no guest progress for 30 s", "") is not None


def test_a_guest_side_failure_is_never_a_host_fault() -> None:
    for kind in ("timeout", "no_end_marker", "scheduler_ejected", "check_failed", None):
        assert host_fault(kind, "x", "") is None
    # The guest's kernel said what went wrong first: the guest is at fault.
    for console in ("BUG: soft lockup - CPU#2 stuck for 22s!", "Kernel panic - not syncing",
                    "rcu: INFO: rcu_sched detected stalls on CPUs/tasks:"):
        assert host_fault("hung", "guest hung", console) is None


def test_rerun_only_in_the_sandbox_and_only_once() -> None:
    fault = host_fault("hung", "guest hung", "")
    assert should_retry(fault, 0, emulated=True)
    assert not should_retry(fault, SANDBOX_RETRIES, emulated=True)
    assert not should_retry(fault, 0, emulated=False)
    assert not should_retry(None, 0, emulated=True)
