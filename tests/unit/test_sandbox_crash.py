"""A lost sandbox says how its own kernel died and keeps the console that shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktstr.sandbox import run as sandbox_run

PANIC = """\
[  812.1] BUG: kernel NULL pointer dereference, address: 0000000000000008
[  812.1] #PF: supervisor read access in kernel mode
[  812.1] Oops: Oops: 0000 [#1] PREEMPT SMP NOPTI
[  812.1] RIP: 0010:svm_complete_interrupts+0x1d/0x120
[  812.1] Call Trace:
[  812.1]  <IRQ>
[  812.1] RIP: 0010:some_later_frame+0x1/0x2
[  812.2] Kernel panic - not syncing: Fatal exception in interrupt
[  812.2] Kernel Offset: disabled
"""


def test_the_reason_names_the_first_bug_its_rip_and_the_panic(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("booting\n" + PANIC)
    why = sandbox_run._why(log, tmp_path / "qemu.log")
    assert why == ("BUG: kernel NULL pointer dereference, address: 0000000000000008 | "
                   "Oops: Oops: 0000 [#1] PREEMPT SMP NOPTI | "
                   "RIP: 0010:svm_complete_interrupts+0x1d/0x120 | "
                   "Kernel panic - not syncing: Fatal exception in interrupt")
    # Without a crash: how far the sandbox's init got and the kernel's last line after it.
    log.write_text("x\nktstr-init: [2.1] base mounts done\nktstr-init: [2.6] running the "
                   "command\nkvm: vcpu0 Unhandled WRMSR\n")
    assert sandbox_run._why(log, tmp_path / "qemu.log") == (
        "ktstr-init: [2.6] running the command | kvm: vcpu0 Unhandled WRMSR")
    log.write_text("ktstr-init: [2.1] base mounts done\n")
    assert sandbox_run._why(log, tmp_path / "qemu.log") == "ktstr-init: [2.1] base mounts done"


def test_a_lost_sandbox_keeps_its_console_under_the_cache_newest_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "cache"))
    log = tmp_path / "console.log"
    log.write_text(PANIC)
    err = sandbox_run._crashed("sandbox VM exited", log)
    kept = Path(str(err).rsplit("console kept: ", 1)[1].rstrip(")"))
    assert kept.read_text() == PANIC and kept.parent == tmp_path / "cache/sandbox/crashes"
    crashes = kept.parent
    for i in range(sandbox_run.CRASH_LOGS_KEPT + 3):
        (crashes / f"20000101-0000{i:02d}-1-console.log").write_text("old")
    sandbox_run.keep_console(log)
    left = sorted(p.name for p in crashes.iterdir())
    assert len(left) == sandbox_run.CRASH_LOGS_KEPT
    assert not any(name.startswith("20000101-000000") for name in left)


def test_qemu_logs_the_sandbox_cpu_resets_and_a_triple_fault_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ktstr.sandbox.qemu import Machine, qemu_command

    m = Machine(kernel=Path("/k"), cmdline="c", memory_mb=512, cpus=1, shares=(),
                console_log=tmp_path / "console.log", stdout_path="/o", stderr_path="/e",
                reset_log=tmp_path / sandbox_run.RESET_LOG)
    argv = qemu_command(m)
    assert argv[argv.index("-d") + 1] == "cpu_reset"
    assert argv[argv.index("-D") + 1] == str(tmp_path / "reset.log")
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "console.log").write_text("ktstr-init: [2.6] running the command\n")
    (tmp_path / "reset.log").write_text("CPU Reset (CPU 0)\nEAX=0\nTriple fault\n")
    err = sandbox_run._crashed("sandbox VM exited (QEMU status 0)", tmp_path / "console.log")
    assert "| QEMU: the sandbox's CPU triple-faulted (console kept: " in str(err)
    kept = Path(str(err).rsplit("console kept: ", 1)[1].rstrip(")"))
    assert kept.read_text().endswith("--- QEMU -d cpu_reset ---\nCPU Reset (CPU 0)\nEAX=0\n"
                                     "Triple fault\n")
