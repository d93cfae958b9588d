"""Which failed runs are faults of the emulated host, and when they are rerun."""

from __future__ import annotations

import pytest

from ktstr.hostfault import SANDBOX_RETRIES, host_fault, run_vm, should_retry, vm_fault
from ktstr.vmm.vm import VmResult


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


def _vm(reason: str, detail: str = "", console: str = "") -> VmResult:
    return VmResult(exit_code=None, console=console, channel2=b"", timed_out=False,
                    panicked=False, boot_ms=None, exit_counts=[], duration_s=1.0, error=None,
                    reason=reason, detail=detail)


def test_a_bare_vm_run_lost_to_the_host_is_rerun_in_the_sandbox(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTSTR_IN_SANDBOX", "1")
    results = iter([_vm("reboot", "vcpu 10: triple fault (shutdown)"), _vm("poweroff")])
    result, lost = run_vm(lambda: next(results))
    assert result.reason == "poweroff"
    assert [f.kind for f in lost] == ["triple_fault"]
    # The loss after the budget is the answer, not another rerun; a guest-requested reboot
    # never reruns.
    results = iter([_vm("hung", "no guest progress")] * (SANDBOX_RETRIES + 2))
    result, lost = run_vm(lambda: next(results))
    assert result.reason == "hung" and len(lost) == SANDBOX_RETRIES == 2
    assert vm_fault(_vm("reboot", "")) is None
    assert vm_fault(_vm("hung", "x", console="Kernel panic - not syncing: boom")) is None


def test_outside_the_sandbox_nothing_is_rerun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KTSTR_IN_SANDBOX", raising=False)
    result, lost = run_vm(lambda: _vm("reboot", "vcpu 1: triple fault (shutdown)"))
    assert result.reason == "reboot" and lost == []


def test_an_inconclusive_run_is_lost_even_with_a_stall_on_its_console() -> None:
    from ktstr.hostfault import inconclusive_fault

    fault = inconclusive_fault("inconclusive", "inconclusive: the guest was lost before the "
                               "scenario started (timeout: ...)\nmore")
    assert fault is not None and fault.kind == "inconclusive"
    assert fault.detail.startswith("inconclusive: the guest was lost")
    assert "more" not in fault.detail
    assert should_retry(fault, 0, emulated=True)
    assert not should_retry(fault, SANDBOX_RETRIES, emulated=True)
    assert not should_retry(fault, 0, emulated=False)  # on real KVM it stands
    for status in ("fail", "error", "pass"):
        assert inconclusive_fault(status, "x") is None
