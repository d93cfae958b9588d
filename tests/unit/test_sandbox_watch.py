"""The sandbox's console watch: soft lockups and panics of the emulated host end the run."""

from __future__ import annotations

from pathlib import Path

from ktstr.sandbox.watch import ConsoleWatch, HeartbeatWatch, classify_line

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


def test_a_heartbeat_that_stops_changing_means_the_host_is_gone(tmp_path: Path) -> None:
    beat = tmp_path / "heartbeat"
    watch = HeartbeatWatch(beat, started=0.0, silence_s=120, first_s=300)
    assert watch.poll(100.0) is None  # still booting: no heartbeat yet
    beat.write_text("12.50 20.00\n")
    assert watch.poll(110.0) is None
    beat.write_text("17.51 30.00\n")
    assert watch.poll(200.0) is None  # a new beat, however late, restarts the clock
    assert watch.poll(319.0) is None
    problem = watch.poll(321.0)
    assert problem is not None and problem.kind == "hung"
    assert "no heartbeat for 121 s" in problem.message and "17.51" in problem.message


def test_a_sandbox_that_never_beats_is_hung_after_the_boot_allowance(tmp_path: Path) -> None:
    watch = HeartbeatWatch(tmp_path / "heartbeat", started=10.0, silence_s=120, first_s=300)
    assert watch.poll(309.0) is None
    problem = watch.poll(310.0)
    assert problem is not None and "never started" in problem.message
