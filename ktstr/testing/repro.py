"""Auto-repro: a failed VM test run once more, traced, with kprobes where it failed.

The probes go on the kernel functions of the failure's backtrace (the sched_ext exit
info, else the stacks of the tasks the monitor saw stalled) and on sched_ext's own
class callbacks, which call the scheduler's struct_ops programs (the programs
themselves are BPF: kprobes cannot attach to them). The repro's verdict is stated
on its own, never merged with the first run's:

- ``reproduced``: it failed the same way (same failure kind, or the same check);
- ``different failure``: it failed another way;
- ``did not reproduce``: it passed;
- ``did not reach the workload``: it was lost before its scenario (inconclusive).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ktstr.wire.request import TraceSpec

if TYPE_CHECKING:
    from ktstr.observe.monitor import Observation
    from ktstr.testing.run import Attempt, RunPlan

SCX_CALLBACKS = ("select_task_rq_scx", "enqueue_task_scx", "dequeue_task_scx", "balance_scx",
                 "put_prev_task_scx", "set_next_task_scx", "task_tick_scx")
"""sched_ext's class callbacks: where the kernel calls into the scheduler's BPF ops."""
MAX_PROBES = 12
_FRAME = re.compile(r"^([A-Za-z_][\w.]*)\+0x[0-9a-f]+$")

REPRODUCED = "reproduced"
DIFFERENT = "different failure"
NOT_REPRODUCED = "did not reproduce"
NOT_REACHED = "did not reach the workload"


@dataclass(frozen=True)
class ProbeTargets:
    functions: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    """Frames that cannot be probed, each with why."""


def probe_targets(obs: Observation | None, sched_ext: bool) -> ProbeTargets:
    """The kernel functions to probe in a repro of the run ``obs`` watched."""
    frames: list[str] = []
    if obs is not None:
        snap = obs.exit_snapshot
        if snap is not None and snap.sched_ext is not None and snap.sched_ext.exit is not None:
            frames.extend(snap.sched_ext.exit.backtrace)
        final = obs.final
        stalled = {pid for pid in obs.stalls}
        for task in (final.tasks if final is not None else ()):
            if task.pid in stalled:
                frames.extend(task.stack)
    functions: list[str] = []
    skipped: list[str] = []
    for frame in frames:
        m = _FRAME.match(frame)
        if frame.startswith("bpf_prog:"):
            skipped.append(f"{frame}: a BPF program (kprobes cannot attach; the sched_ext "
                           "callbacks are probed instead)")
        elif m is None:
            skipped.append(f"{frame}: no symbol")
        elif m[1] not in functions:
            functions.append(m[1])
    if sched_ext:
        functions.extend(f for f in SCX_CALLBACKS if f not in functions)
    if len(functions) > MAX_PROBES:
        skipped.extend(f"{f}: over the {MAX_PROBES}-probe budget" for f in functions[MAX_PROBES:])
        functions = functions[:MAX_PROBES]
    return ProbeTargets(tuple(functions), tuple(dict.fromkeys(skipped)))


def failure_kind(attempt: Attempt) -> str:
    """How a run failed, to compare two runs: its failure kind, else its first failed
    check, else its verdict (an expected failure that did not come)."""
    if attempt.run.failure:
        return attempt.run.failure
    failed = [c.name for c in attempt.verdict.checks if not c.passed]
    return f"check {failed[0]}" if failed else attempt.verdict.status


@dataclass
class Repro:
    outcome: str
    first: str
    """The first run's failure kind (:func:`failure_kind`)."""
    again: str
    """The repro run's (``pass`` if it passed)."""
    reason: str
    probes: ProbeTargets = field(default_factory=ProbeTargets)
    trace: dict[str, Any] | None = None
    dump: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return f"repro: {self.outcome} (first run: {self.first}; repro: {self.again})"

    def to_record(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "first": self.first, "again": self.again,
                "reason": self.reason, "kprobes": list(self.probes.functions),
                "skipped_probes": list(self.probes.skipped), "trace": self.trace,
                "dump": self.dump}


def classify(first: Attempt, again: Attempt) -> str:
    if again.verdict.status == "inconclusive":
        return NOT_REACHED
    if again.verdict.passed:
        return NOT_REPRODUCED
    return REPRODUCED if failure_kind(again) == failure_kind(first) else DIFFERENT


def reproduce(plan: RunPlan, first: Attempt) -> tuple[Repro, Attempt]:
    """Run ``plan`` once more, traced and probed where ``first`` failed."""
    from ktstr.testing.run import run_once

    probes = first.probes or probe_targets(None, plan.scheduler.sched_ext)
    base = plan.trace or TraceSpec()
    again = run_once(replace(plan, trace=replace(base, kprobes=list(probes.functions))))
    outcome = classify(first, again)
    trace = again.run.trace
    obs = again.run.observation
    repro = Repro(outcome, failure_kind(first),
                  "pass" if again.verdict.passed else failure_kind(again),
                  again.verdict.reason, probes,
                  trace.record() if trace is not None else None,
                  dict(obs.dump_paths) if obs is not None else {})
    return repro, again
