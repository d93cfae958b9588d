"""Which failed runs are faults of the emulated host, and when they are rerun."""

from __future__ import annotations

import pytest

from ktstr.hostfault import (
    F_CLOCK_JUMP,
    SANDBOX_RETRIES,
    host_fault,
    run_vm,
    should_retry,
    vm_fault,
)
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
    assert result.reason == "hung" and len(lost) == SANDBOX_RETRIES == 4
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


def test_a_vcpu_spinning_in_kernel_text_padding_without_an_oops_is_a_host_fault() -> None:
    padding = {0: ("0xffffffff816808d0 (kernel text padding)", "__schedule+0x5c9"),
               1: ("lapic_next_deadline+0x21",)}
    fault = host_fault("timeout", "guest did not power off", "", vcpu_stacks=padding)
    assert fault is not None and fault.kind == "stuck_vcpu"
    assert "vcpu 0 spun in kernel mode at 0xffffffff816808d0" in fault.detail
    assert host_fault("hung", "no guest progress", "", vcpu_stacks=padding) is not None
    # Not when the guest oopsed, when the PC is merely unknown (a BPF program, a module),
    # or when the run failed some other way.
    assert host_fault("timeout", "x", "Oops: int3", vcpu_stacks=padding) is None
    assert host_fault("timeout", "x", "", vcpu_stacks={0: ("0xffffffffa0001000 (in no "
                                                          "function)",)}) is None
    assert host_fault("scheduler_ejected", "x", "", vcpu_stacks=padding) is None
    assert host_fault("timeout", "x", "", vcpu_stacks={}) is None


def test_a_retried_attach_ejection_does_not_put_a_later_hang_on_the_guest() -> None:
    retried = ('sched_ext: BPF scheduler "central" disabled (scx_bpf_error)\n'
               "sched_ext: central: init from non-central CPU\n"
               'sched_ext: BPF scheduler "central" enabled\n')
    assert host_fault("hung", "no guest progress", retried) is None
    assert host_fault("hung", "no guest progress", retried, retried_ejections=1) is not None
    # An attached scheduler is no crash; an ejection past the retried ones is.
    assert host_fault("hung", "x", 'sched_ext: BPF scheduler "simple" enabled\n') is not None
    ejected = retried + ('sched_ext: BPF scheduler "central" disabled (runtime error)\n'
                         "sched_ext: central: stall\n")
    assert host_fault("hung", "x", ejected, retried_ejections=1) is None


def test_a_bare_boot_that_times_out_before_init_is_a_lost_boot() -> None:
    booting = "Linux version 6.12.117\nio scheduler kyber registered\n"
    fault = vm_fault(_vm("timeout", console=booting))
    assert fault is not None and fault.kind == "lost_boot"
    assert "stopped after 'io scheduler kyber registered'" in fault.detail
    # Init ran (the hang is the guest's own), the console is quiet (nothing to tell), or
    # the kernel said what went wrong: a timeout, no rerun.
    assert vm_fault(_vm("timeout", console=booting + "Run /init as init process\n")) is None
    assert vm_fault(_vm("timeout", console="")) is None
    assert vm_fault(_vm("timeout", console=booting + "Kernel panic - not syncing\n")) is None


# As the sandbox printed it under scx_simple (6.12.118), trimmed.
IDLE_LOCKUP = """sched_ext: "simple" does not implement cgroup cpu.weight
watchdog: BUG: soft lockup - CPU#0 stuck for 30s! [swapper/0:0]
CPU: 0 UID: 0 PID: 0 Comm: swapper/0 Not tainted 6.12.118 #1
Sched_ext: simple (enabled+all)
RIP: 0010:tick_nohz_idle_got_tick+0x0/0x22
Call Trace:
 <TASK>
 ? do_idle+0x14f/0x185
 </TASK>
"""


def test_a_soft_lockup_of_the_idle_task_alone_is_a_clock_jump() -> None:
    fault = host_fault(None, "kernel_bug", IDLE_LOCKUP)
    assert fault is not None and fault.kind == F_CLOCK_JUMP
    assert "swapper/0:0" in fault.detail


def test_a_soft_lockup_of_a_real_task_or_another_crash_stays_on_the_guest() -> None:
    busy = IDLE_LOCKUP.replace("[swapper/0:0]", "[worker:231]")
    assert host_fault(None, "kernel_bug", busy) is None
    assert host_fault(None, "kernel_bug", IDLE_LOCKUP + "Oops: 0000 [#1] SMP\n") is None
    second = IDLE_LOCKUP + "watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [spin:99]\n"
    assert host_fault(None, "kernel_bug", second) is None


def test_an_rcu_stall_before_a_triple_fault_stays_a_host_fault() -> None:
    stall = ("rcu: INFO: rcu_sched detected stalls on CPUs/tasks:\n"
             "rcu: \t2-...0: (40 ticks this GP) idle=5c64/1/0x4000000000000000\n")
    fault = host_fault("triple_fault", "vcpu 3: triple fault (shutdown)", stall)
    assert fault is not None and fault.kind == "triple_fault"
    # Other failures with a stall, and a triple fault after an oops, are the guest's.
    assert host_fault("hung", "no vCPU exit for 30 s", stall) is None
    assert host_fault("timeout", "timed out", stall) is None
    assert host_fault("triple_fault", "vcpu 3", stall + "Oops: 0002 [#1] SMP\n") is None
