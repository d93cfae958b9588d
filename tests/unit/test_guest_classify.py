"""run_guest's failure classification over channel messages and a VmResult."""

from __future__ import annotations

from pathlib import Path

from ktstr.initramfs import BaseArchive
from ktstr.runner import collect
from ktstr.vmm.vm import VmResult

BASE = BaseArchive(Path("/nonexistent"), "k", 0, True, 0.0, 0, "/py", ())


def vm(console: str = "", *, timed_out: bool = False, error: str | None = None,
       exit_code: int | None = 0, reason: str = "poweroff") -> VmResult:
    return VmResult(exit_code=exit_code, console=console, channel2=b"", timed_out=timed_out,
                    panicked="Kernel panic" in console, boot_ms=12.0, exit_counts=[],
                    duration_s=1.0, error=error, reason=reason)


def msgs(*bodies: dict) -> list[tuple[float, dict]]:
    return [(float(i), b) for i, b in enumerate(bodies)]


OK = (
    {"type": "hello"}, {"type": "scenario_start"}, {"type": "report", "data": {"x": 1}},
    {"type": "result", "value": {"answer": 42}}, {"type": "end", "exit_code": 0},
)


def test_success() -> None:
    run = collect(msgs(*OK), [], vm(), BASE, 10, scenario_mode=True)
    assert run.ok and run.failure is None
    assert run.result == {"answer": 42}
    assert run.reports == [{"x": 1}]
    assert run.timings["scenario_start"] == 1.0 and run.timings["boot_ms"] == 12.0


def test_guest_exception_carries_traceback() -> None:
    tb = "Traceback (most recent call last):\n  File ...\nValueError: boom"
    run = collect(msgs({"type": "hello"}, {"type": "failure", "kind": "exception",
                                           "message": "ValueError: boom", "traceback": tb},
                       {"type": "end", "exit_code": 1}), [], vm(exit_code=1), BASE, 0,
                  scenario_mode=True)
    assert run.failure == "exception" and "boom" in run.message and run.traceback == tb


def test_scheduler_ejection_includes_scheduler_output() -> None:
    run = collect(msgs({"type": "failure", "kind": "scheduler_ejected",
                        "message": "scheduler 'qmap' was ejected (runtime error: boom)",
                        "details": {"log_tail": "EXIT: runtime error (boom)"}},
                       {"type": "end", "exit_code": 1}), [], vm(), BASE, 0, scenario_mode=True)
    assert run.failure == "scheduler_ejected"
    assert "EXIT: runtime error (boom)" in run.message


def test_kernel_panic_wins_over_missing_end() -> None:
    console = "boot...\nKernel panic - not syncing: Attempted to kill init!\n"
    run = collect(msgs({"type": "hello"}), [], vm(console, reason="reboot", exit_code=None),
                  BASE, 0, scenario_mode=True)
    assert run.failure == "panic" and "Attempted to kill init" in run.message


def test_kernel_warning_fails_an_otherwise_good_run() -> None:
    console = "WARNING: CPU: 1 PID: 7 at kernel/sched/ext.c:123 foo+0x1/0x2\n"
    run = collect(msgs(*OK), [], vm(console), BASE, 0, scenario_mode=True)
    assert run.failure == "kernel_warning"


def test_timeout_and_missing_end_and_channel_errors() -> None:
    t = collect(msgs({"type": "hello"}), [], vm(timed_out=True, error="no poweroff in 5 s",
                                                  exit_code=None, reason="timeout"),
                BASE, 0, scenario_mode=True)
    assert t.failure == "timeout"
    n = collect(msgs({"type": "hello"}), [], vm(), BASE, 0, scenario_mode=True)
    assert n.failure == "no_end_marker"
    c = collect(msgs(*OK), ["channel: frame CRC mismatch"], vm(), BASE, 0, scenario_mode=True)
    assert c.failure == "channel" and "CRC" in c.message


def test_shell_nonzero_exit_is_not_a_failure() -> None:
    run = collect(msgs({"type": "shell", "exit_code": 3, "stdout": "", "stderr": ""},
                       {"type": "end", "exit_code": 3}), [], vm(exit_code=3), BASE, 0,
                  scenario_mode=False)
    assert run.ok and run.exit_code == 3 and run.shell is not None


def test_ejection_on_the_console_names_the_cause_when_the_guest_did_not_finish() -> None:
    from ktstr.console import last_ejection

    console = (
        'sched_ext: BPF scheduler "qmap" disabled (runnable task stall)\n'
        "sched_ext: qmap: init[1] failed to run for 2.056s\n"
        "   update_curr_scx+0x11/0x36\n"
    )
    assert last_ejection(console) == (
        "scheduler 'qmap' was ejected (runnable task stall: init[1] failed to run for 2.056s)"
    )
    clean = 'sched_ext: BPF scheduler "simple" disabled (unregistered from user space)\n'
    assert last_ejection(clean) is None
    assert last_ejection("no scheduler messages\n") is None


def test_a_triple_fault_is_its_own_failure_kind() -> None:
    lost = vm(reason="reboot", exit_code=None)
    lost.detail = "vcpu 14: triple fault (shutdown)\nrax=0 rip=fff0"
    run = collect(msgs({"type": "hello"}), [], lost, BASE, 0, scenario_mode=True)
    assert run.failure == "triple_fault"
    assert run.message.startswith("vcpu 14: triple fault (shutdown)")
    # A reboot the guest asked for (i8042, ACPI) stays a missing end marker.
    asked = collect(msgs({"type": "hello"}), [], vm(reason="reboot", exit_code=None), BASE, 0,
                    scenario_mode=True)
    assert asked.failure == "no_end_marker"
