"""Scheduler lifecycle inside one boot: a scenario detaches and re-attaches the scheduler
under test, and its telemetry comes back split per phase."""

from __future__ import annotations

from ktstr.checks import Checks
from ktstr.scenario import AttachScheduler, CgroupDef, DetachScheduler, Step
from ktstr.testing import execute_steps, ktstr_test


@ktstr_test(topology="1n1l2c1t", scheduler="scx_simple", duration=3.0, gauntlet=False,
            checks=Checks(max_gap_ms=None, starvation=False))
def test_detach_eevdf_attach_under_scx_simple(ctx):
    """scx_simple -> EEVDF -> scx_simple: each phase has its own work and sched_ext state."""
    result = execute_steps(ctx, [
        Step(hold=0.3),
        Step(ops=(DetachScheduler(),), hold=0.3),
        Step(ops=(AttachScheduler(),), hold=0.3),
    ], setup=[CgroupDef("load", workers=4)])
    phases = result.phases
    assert [p.scheduler for p in phases] == ["simple", "kernel", "simple"], phases
    assert [p.started_by for p in phases] == ["", "DetachScheduler", "AttachScheduler"]
    assert phases[1].sched_state.get("state") == "disabled", phases[1].sched_state
    assert phases[2].sched_state.get("state") == "enabled", phases[2].sched_state
    assert all(p.work_units > 0 and p.cpu_ns > 0 for p in phases), phases
    for p in phases:
        result.notes.append(f"phase {p.index} {p.scheduler}: {p.work_rate:.0f} units/s")
    return result
