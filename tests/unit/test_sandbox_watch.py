"""The sandbox's console watch: soft lockups and panics of the emulated host end the run."""

from __future__ import annotations

from pathlib import Path

from ktstr.sandbox.watch import ConsoleWatch, classify_line

LOCKUP = "[  123.4] watchdog: BUG: soft lockup - CPU#1 stuck for {}s! [python3:150]"


def test_a_short_soft_lockup_is_tolerated_a_long_one_is_not() -> None:
    assert classify_line(LOCKUP.format(26)) is None
    problem = classify_line(LOCKUP.format(52))
    assert problem is not None and problem.kind == "soft_lockup"
    assert "CPU#1 stuck for 52 s in [python3:150]" in problem.message


def test_a_panic_is_reported() -> None:
    problem = classify_line("Kernel panic - not syncing: Fatal exception in interrupt")
    assert problem is not None and problem.kind == "panic"
    assert "Fatal exception in interrupt" in problem.message


def test_watch_reads_incrementally_and_across_split_lines(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("booting\n" + LOCKUP.format(60)[:30])
    watch = ConsoleWatch(log)
    assert watch.poll() is None  # the lockup line is not complete yet
    with log.open("a") as f:
        f.write(LOCKUP.format(60)[30:] + "\n")
    problem = watch.poll()
    assert problem is not None and problem.kind == "soft_lockup"
    assert watch.poll() is None  # reported once; nothing new


def test_missing_log_is_no_problem(tmp_path: Path) -> None:
    assert ConsoleWatch(tmp_path / "absent").poll() is None
