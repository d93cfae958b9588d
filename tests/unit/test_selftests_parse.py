"""The sched_ext selftests runner's output format, parsed into typed results.

Fixtures come from the 6.12 runner itself: ``LISTING`` is real output of
``runner -s -t '\\n'``; the other blocks are built by :func:`block`, which
prints with runner.c's own format strings (print_test_preamble,
print_test_result, the RESULTS trailer, SCX_ERR).
"""

from __future__ import annotations

from ktstr.selftests.parse import (
    END,
    START,
    Status,
    error_reason,
    parse_listing,
    parse_output,
    parse_result_line,
    substring_matches,
)

# runner.c (6.12): print_test_result and main()'s trailer.
RESULT_FMT = "%s %u %s # %s\n"
TRAILER_FMT = ("\n\n=============================\n\nRESULTS:\n\nPASSED:  %u\nSKIPPED: %u\n"
               "FAILED:  %u\n")
ERR_FMT = "ERR: %s:%d\n"  # scx_test.h SCX_ERR, on stderr, followed by the message line

LISTING = """\
===== START =====
TEST: create_dsq
DESCRIPTION: Create and destroy a dsq in a loop
OUTPUT:
ok 1 create_dsq # SKIP\x20
=====  END  =====
===== START =====
TEST: enq_last_no_enq_fails
DESCRIPTION: Verify we eject a scheduler if we specify the SCX_OPS_ENQ_LAST flag without \
defining ops.enqueue()
OUTPUT:
ok 2 enq_last_no_enq_fails # SKIP\x20
=====  END  =====
===== START =====
TEST: select_cpu_dfl
DESCRIPTION: Verify the default ops.select_cpu() dispatches tasks when idles cores are found, \
and skips ops.enqueue()
OUTPUT:
ok 3 select_cpu_dfl # SKIP\x20
=====  END  =====


=============================

RESULTS:

PASSED:  0
SKIPPED: 0
FAILED:  0
"""


def block(name: str, number: int, status: str, output: list[str] | None = None,
          description: str | None = "what it checks") -> str:
    """One test's stdout as runner.c prints it (``status``: ok | fail | skip)."""
    text = f"{START}\nTEST: {name}\n"
    if description is not None:
        text += f"DESCRIPTION: {description}\n"
    text += "OUTPUT:\n" + "".join(f"{line}\n" for line in output or [])
    result = "not ok" if status == "fail" else "ok"
    text += RESULT_FMT % (result, number, name, "SKIP " if status == "skip" else "")
    return text + f"{END}\n"


def trailer(passed: int, skipped: int, failed: int) -> str:
    return TRAILER_FMT % (passed, skipped, failed)


def test_pass_skip_and_fail_blocks_parse_with_their_output() -> None:
    text = (block("minimal", 1, "ok", ["loaded", "attached"])
            + block("hotplug", 2, "skip")
            + block("exit", 3, "fail", ["exit kind 1024"]) + trailer(1, 1, 1))
    out = parse_output(text)
    assert [(r.name, r.status, r.number) for r in out.results] == [
        ("minimal", Status.OK, 1), ("hotplug", Status.SKIP, 2), ("exit", Status.FAIL, 3)]
    assert out.results[0].output == ["loaded", "attached"]
    assert out.results[1].output == [] and out.results[1].reason == ""
    assert out.results[2].output == ["exit kind 1024"]
    assert out.descriptions == dict.fromkeys(("minimal", "hotplug", "exit"), "what it checks")
    assert out.counts == {"passed": 1, "skipped": 1, "failed": 1}
    assert out.unfinished is None and out.stray == []
    assert all(r.duration_s is None for r in out.results)  # the runner prints none


def test_quiet_blocks_have_no_description() -> None:
    out = parse_output(block("minimal", 1, "ok", description=None))
    assert out.results[0].status is Status.OK and out.descriptions == {}


def test_result_lines_with_and_without_a_skip_reason() -> None:
    # 6.12 prints "# " (pass/fail) and "# SKIP " (skip) with a trailing space, no reason.
    assert parse_result_line("ok 7 maximal # ") == (Status.OK, 7, "maximal", "")
    assert parse_result_line("not ok 7 maximal # ") == (Status.FAIL, 7, "maximal", "")
    assert parse_result_line("ok 8 hotplug # SKIP ") == (Status.SKIP, 8, "hotplug", "")
    assert parse_result_line("ok 8 hotplug # SKIP cpu1 is offline") == (
        Status.SKIP, 8, "hotplug", "cpu1 is offline")
    assert parse_result_line("ok 8 hotplug") == (Status.OK, 8, "hotplug", "")
    assert parse_result_line("not ok 2 x # SKIP ") == (Status.FAIL, 2, "x", "")
    assert parse_result_line("okay 1 x") is None
    assert parse_result_line("ok x y") is None


def test_a_result_like_line_in_a_tests_output_is_output() -> None:
    text = block("maximal", 1, "ok", ["ok 5 something_else # ", "not ok 6 other # "])
    out = parse_output(text)
    assert [r.name for r in out.results] == ["maximal"]
    assert out.results[0].output == ["ok 5 something_else # ", "not ok 6 other # "]


def test_a_killed_runner_leaves_its_test_unfinished() -> None:
    text = block("minimal", 1, "ok") + f"{START}\nTEST: reload_loop\nDESCRIPTION: d\nOUTPUT:\n"
    text += "iteration 1\niteration 2\n"
    out = parse_output(text)
    assert [r.name for r in out.results] == ["minimal"]
    assert out.unfinished == "reload_loop"
    assert out.unfinished_output == ["iteration 1", "iteration 2"]
    assert out.counts is None


def test_a_tail_without_its_preamble_still_yields_the_result() -> None:
    full = block("create_dsq", 1, "ok", [f"line {i}" for i in range(100)]) + trailer(1, 0, 0)
    tail = full[-300:]
    out = parse_output(tail)
    assert [(r.name, r.status) for r in out.results] == [("create_dsq", Status.OK)]
    assert out.counts == {"passed": 1, "skipped": 0, "failed": 0}


def test_listing_from_the_real_6_12_runner() -> None:
    tests = parse_listing(LISTING)
    assert [t.name for t in tests] == ["create_dsq", "enq_last_no_enq_fails", "select_cpu_dfl"]
    assert tests[0].description == "Create and destroy a dsq in a loop"
    assert parse_output(LISTING).counts == {"passed": 0, "skipped": 0, "failed": 0}


def test_listing_in_the_one_name_per_line_format_of_later_runners() -> None:
    assert [t.name for t in parse_listing("create_dsq\nexit\nhotplug\n")] == [
        "create_dsq", "exit", "hotplug"]


def test_error_reason_is_the_first_scx_err_report() -> None:
    stderr = ("libbpf: prog 'x': attached\n" + ERR_FMT % ("exit.c", 42)
              + "Expected skel->bss->exit_kind == SCX_EXIT_UNREG (0 == 64)\n"
              + ERR_FMT % ("exit.c", 50) + "later\n")
    assert error_reason(stderr) == (
        "exit.c:42: Expected skel->bss->exit_kind == SCX_EXIT_UNREG (0 == 64)")
    assert error_reason(ERR_FMT % ("minimal.c", 9)) == "minimal.c:9"
    assert error_reason("no errors here\n") == ""


def test_substring_selection_of_the_stock_runner() -> None:
    names = ["select_cpu_dfl", "select_cpu_dfl_nodispatch", "select_cpu_dispatch",
             "select_cpu_dispatch_bad_dsq", "exit"]
    assert substring_matches("select_cpu_dfl", names) == ["select_cpu_dfl",
                                                          "select_cpu_dfl_nodispatch"]
    assert substring_matches("exit", names) == ["exit"]
