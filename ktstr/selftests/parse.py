"""The sched_ext selftests runner's output, as typed results (pure functions).

Format, from ``tools/testing/selftests/sched_ext/runner.c`` (6.12), per test::

    ===== START =====
    TEST: <name>
    DESCRIPTION: <description>        (left out with -q)
    OUTPUT:
    <whatever the test prints on stdout>
    ok <N> <name> #                   pass
    ok <N> <name> # SKIP              skip (6.12 prints no reason after SKIP)
    not ok <N> <name> #               fail
    =====  END  =====

then ``RESULTS:`` with ``PASSED:``/``SKIPPED:``/``FAILED:`` counts. The exit
status is always 0, and no duration is printed. Tests report failures with
``SCX_ERR`` on *stderr*: ``ERR: <file>:<line>`` followed by the message.

Listing: 6.12 has no ``-l``; ``-s -t FILTER`` with a filter no name contains
prints every test's preamble and an ``ok N name # SKIP`` line without running
anything (later kernels add ``-l``, one name per line; both parse here).

Standard library only: the guest imports this module too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

START = "===== START ====="
END = "=====  END  ====="
RESULT_RE = re.compile(r"^(ok|not ok) (\d+) (.*?)(?: #(.*))?$")
COUNT_RE = re.compile(r"^(PASSED|SKIPPED|FAILED):\s+(\d+)$")
ERR_RE = re.compile(r"^ERR: (\S+:\d+)$")
SELECT_ENV = "KTSTR_SCX_TEST"
"""With ktstr's exact-selection wrap (``ktstr.selftests.build``): the one test to register."""
LIST_FILTER = "\n"
"""A ``-t`` filter no test name can contain (names are printed one per line)."""


class Status(StrEnum):
    OK = "ok"
    FAIL = "fail"
    SKIP = "skip"
    TIMEOUT = "timeout"
    """Killed after the per-test timeout (set by the guest, never printed by the runner)."""
    NOT_RUN = "not_run"
    """The VM (or sched_ext) failed before this test could run."""

    @property
    def failed(self) -> bool:
        return self in (Status.FAIL, Status.TIMEOUT, Status.NOT_RUN)


@dataclass(frozen=True)
class SelftestInfo:
    name: str
    description: str = ""


@dataclass
class SelftestResult:
    name: str
    status: Status
    reason: str = ""
    """The SKIP reason (empty on 6.12), or why the test failed / did not run."""
    output: list[str] = field(default_factory=list)
    """Lines the test printed between ``OUTPUT:`` and its result line."""
    number: int | None = None
    """The runner's test number (counts only the tests that invocation ran)."""
    duration_s: float | None = None
    """The runner prints none; the guest's measured wall time of the test's process."""


@dataclass
class RunnerOutput:
    results: list[SelftestResult] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)
    unfinished: str | None = None
    """The test whose block started but has no result line (the runner died or was killed)."""
    unfinished_output: list[str] = field(default_factory=list)
    counts: dict[str, int] | None = None
    """The closing ``RESULTS:`` counts (``passed``, ``skipped``, ``failed``), when printed."""
    stray: list[str] = field(default_factory=list)
    """Lines outside any test block (other than the closing summary)."""


def parse_result_line(line: str) -> tuple[Status, int, str, str] | None:
    """``(status, number, name, reason)`` of a TAP-style result line, else None."""
    m = RESULT_RE.match(line.rstrip())
    if not m:
        return None
    ok, number, name, directive = m.group(1) == "ok", int(m.group(2)), m.group(3), m.group(4)
    directive = (directive or "").strip()
    if ok and directive[:4].upper() == "SKIP":
        return Status.SKIP, number, name, directive[4:].strip(" :")
    return (Status.OK if ok else Status.FAIL), number, name, ""


def parse_output(text: str) -> RunnerOutput:
    """Everything the runner printed on stdout, block by block.

    Tolerates a cut-off head (a bounded tail) and a cut-off end (a killed runner).
    """
    out = RunnerOutput()
    current: str | None = None
    lines: list[str] = []
    in_output = False
    in_summary = False
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if line == START:
            if current is not None:  # a block without a result: keep the last one only
                out.unfinished, out.unfinished_output = current, lines
            current, lines, in_output, in_summary = "", [], False, False
            continue
        if current == "" and not in_output and line.startswith("TEST: "):
            current = line[len("TEST: "):]
            continue
        if current and not in_output and line.startswith("DESCRIPTION: "):
            out.descriptions[current] = line[len("DESCRIPTION: "):]
            continue
        if current and not in_output and line == "OUTPUT:":
            in_output = True
            continue
        parsed = parse_result_line(line)
        if parsed is not None and (current is None or parsed[2] == current):
            status, number, name, reason = parsed
            out.results.append(SelftestResult(name, status, reason, lines, number))
            current, lines, in_output = None, [], False
            if out.unfinished == name:
                out.unfinished, out.unfinished_output = None, []
            continue
        if current is not None and in_output:
            lines.append(line)
        elif line == END:
            continue
        elif line == "RESULTS:":
            in_summary = True
        elif in_summary and (m := COUNT_RE.match(line)):
            out.counts = out.counts or {}
            out.counts[m.group(1).lower()] = int(m.group(2))
        elif line.strip() and not set(line.strip()) <= {"="}:
            out.stray.append(line)
    if current is not None:
        out.unfinished, out.unfinished_output = current or None, lines
    return out


def parse_listing(text: str) -> list[SelftestInfo]:
    """The tests a runner has, from ``-s -t LIST_FILTER`` output or from ``-l`` output."""
    parsed = parse_output(text)
    if parsed.results:
        return [SelftestInfo(r.name, parsed.descriptions.get(r.name, "")) for r in parsed.results]
    names = [line.strip() for line in text.splitlines()]
    return [SelftestInfo(n) for n in names if n and not set(n) <= {"="} and " " not in n
            and not COUNT_RE.match(n) and n != "RESULTS:"]


def error_reason(stderr: str) -> str:
    """The first ``SCX_ERR`` report on stderr as one line (``file.c:42: message``), or ''."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        m = ERR_RE.match(line.strip())
        if m:
            message = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{m.group(1)}: {message}" if message else m.group(1)
    return ""


def substring_matches(name: str, names: list[str]) -> list[str]:
    """The tests the stock runner's ``-t NAME`` selects: every name containing NAME."""
    return [n for n in names if name in n]
