"""The one reading of a kernel console: which kernel problems it shows, how sched_ext left.

Every consumer asks this module, so a "kernel warning" or a "clean unregister" means the
same thing everywhere: the guest (:mod:`ktstr.guest.sched` reads /dev/kmsg with it), the
host's run classifier (:func:`ktstr.runner.collect`), the health checks
(:func:`ktstr.checks.scheduler_health`) and the selftests. Standard library only, since
the guest imports it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ProblemKind:
    name: str
    """What ``GuestRun.failure`` and the health check are called."""
    pattern: re.Pattern[str]
    what: str
    fails_run: bool
    """The kernel is broken: the guest run fails on it by itself. Otherwise (a stall, a hung
    task) only the health check fails, so ``Checks(health=False)`` can accept it."""


PROBLEMS: tuple[ProblemKind, ...] = (
    ProblemKind("panic", re.compile(r"Kernel panic - not syncing"), "kernel panic", True),
    ProblemKind("initramfs", re.compile(r"Initramfs unpacking failed"),
                "initramfs unpacking failure", True),
    ProblemKind("kernel_bug", re.compile(r"\bBUG: |kernel BUG at"), "kernel bug", True),
    ProblemKind("kernel_oops", re.compile(r"\bOops: |general protection fault"),
                "kernel oops", True),
    # WARN() prints "WARNING: CPU: n PID: ..."; lockdep and RCU print "WARNING: <what>".
    ProblemKind("kernel_warning", re.compile(r"\bWARNING: |-+\[ cut here \]-+"),
                "kernel warning", True),
    ProblemKind("rcu_stall", re.compile(r"rcu: INFO: \S+ detected stalls|rcu_\w+ detected "
                                        r"stalls|rcu: INFO: \S+ self-detected stall"),
                "rcu stall", False),
    ProblemKind("hung_task", re.compile(r"INFO: task \S+ blocked for more than \d+ seconds"),
                "hung task", False),
)
"""In the order a run failure is named by: the first kind the console shows wins."""


@dataclass(frozen=True)
class Problem:
    kind: str
    line: str
    """The first console line showing it, stripped."""


def _lines(text: str | Sequence[str]) -> Sequence[str]:
    return text.splitlines() if isinstance(text, str) else text


def problems(text: str | Sequence[str]) -> dict[str, list[str]]:
    """Every kind of :data:`PROBLEMS` (all of them, in order) -> the lines showing it."""
    lines = _lines(text)
    return {k.name: [line.strip() for line in lines if k.pattern.search(line)]
            for k in PROBLEMS}


def run_failure(text: str | Sequence[str]) -> Problem | None:
    """The problem that fails a guest run by itself (the first such kind shown), or None."""
    lines = _lines(text)
    for kind in PROBLEMS:
        if not kind.fails_run:
            continue
        for line in lines:
            if kind.pattern.search(line):
                return Problem(kind.name, line.strip())
    return None


# ---- how the sched_ext scheduler left --------------------------------------------------

DISABLED_RE = re.compile(r'sched_ext: BPF scheduler "([^"]*)" disabled \((.*)\)')
"""``scx_disable_workfn``: ``pr_err`` for an error exit, ``pr_info`` otherwise; an error exit
follows it with ``sched_ext: NAME: MESSAGE`` (the scx_bpf_error text, the stalled task)."""
UNREGISTERED = "unregistered from user space"
"""The reason when the scheduler's own process detached it: how a SIGINT stop ends
(:attr:`ktstr.guest.sched.ExitReport.clean_unregister`)."""
NOT_EJECTED = frozenset({UNREGISTERED, "unregistered from BPF",
                         "unregistered from the main kernel", "disabled by sysrq-S"})
"""The exit reasons below ``SCX_EXIT_ERROR`` (``scx_exit_reason()``): the scheduler left or
was told to, the kernel did not eject it."""


def disabled_events(lines: Sequence[str]) -> list[dict[str, str]]:
    """Every 'BPF scheduler disabled' record: ``name``, ``reason``, the follow-up ``message``."""
    return [event for _, event in _events(lines)]


def _events(lines: Sequence[str]) -> Iterable[tuple[str, dict[str, str]]]:
    for i, line in enumerate(lines):
        m = DISABLED_RE.search(line)
        if not m:
            continue
        event = {"name": m.group(1), "reason": m.group(2), "message": ""}
        prefix = f"sched_ext: {m.group(1)}: "
        for follow in lines[i + 1:i + 4]:
            if prefix in follow:
                event["message"] = follow.split(prefix, 1)[1]
                break
        yield line, event


def is_ejection(reason: str) -> bool:
    return reason not in NOT_EJECTED


def first_ejection(text: str | Sequence[str], skip: int = 0) -> str | None:
    """The first console line where the kernel ejected a scheduler, stripped; None if none.
    The first ``skip`` ejections are passed over (attach attempts that were retried)."""
    found = (line.strip() for line, ev in _events(_lines(text)) if is_ejection(ev["reason"]))
    return next(itertools.islice(found, skip, None), None)


def last_ejection(text: str | Sequence[str], skip: int = 0) -> str | None:
    """How the kernel's last disable record ejected the scheduler, or None when the last one
    was no ejection (or there is none): the cause of a guest that never finished. The first
    ``skip`` ejections (attach attempts that were retried) are not records of the run."""
    events = disabled_events(_lines(text))
    retried = set([i for i, ev in enumerate(events) if is_ejection(ev["reason"])][:skip])
    events = [ev for i, ev in enumerate(events) if i not in retried]
    if not events or not is_ejection(events[-1]["reason"]):
        return None
    return f"scheduler {events[-1]['name']!r} was ejected ({exit_text(events[-1])})"


def exit_text(event: dict[str, str]) -> str:
    """``REASON`` or ``REASON: MESSAGE``: what the kernel said when it disabled a scheduler."""
    return f"{event['reason']}: {event['message']}" if event["message"] else event["reason"]


TAIL_LINES = 40


def tail_lines(text: str, lines: int = TAIL_LINES) -> str:
    """The console's last ``lines`` lines, for a person (failure reports, sidecars)."""
    return "\n".join(text.rstrip().splitlines()[-lines:])
