"""Scheduler phases in the scenario runner: the split of telemetry at each lifecycle op,
and the refusal where nothing can attach a scheduler (a host). The guest's real control
is exercised in tests/vm/test_phases.py."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ktstr.errors import KtstrError
from ktstr.scenario import AttachScheduler, CgroupDef, DetachScheduler, RestartScheduler, Step
from ktstr.scenario.cgroups import cgroup_mounts
from ktstr.scenario.host import host_session
from ktstr.scenario.model import ReplaceScheduler
from ktstr.scenario.runner import ScenarioContext, SchedulerControl, execute_steps

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or cgroup_mounts() == (None, None),
                                reason="needs root and a cpuset cgroup controller")


class _Switch:
    """Stands in for the guest's sched_ext: a name that detach and attach change."""

    def __init__(self) -> None:
        self.name: str | None = "simple"
        self.calls: list[str] = []

    def current(self) -> str | None:
        return self.name

    def state(self) -> dict[str, Any]:
        return {"state": "enabled" if self.name else "disabled"}

    def detach(self) -> None:
        self.calls.append("detach")
        self.name = None

    def attach(self, binary: str | None, args: tuple[str, ...] | None) -> None:
        self.calls.append(f"attach {binary} {args}")
        self.name = "simple"


def test_phases_split_the_work_at_each_lifecycle_op() -> None:
    switch = _Switch()
    assert isinstance(switch, SchedulerControl)
    with host_session() as s:
        ctx = ScenarioContext(s.topology, 1.0, s.root, cpu_ids=s.cpu_ids,
                              scheduler_control=switch)
        result = execute_steps(ctx, [
            Step(hold_s=0.2), Step(ops=(DetachScheduler(),), hold_s=0.2),
            Step(ops=(AttachScheduler(("-s", "5000")),), hold_s=0.2),
            Step(ops=(RestartScheduler(),), hold_s=0.2),
        ], setup=[CgroupDef("a", workers=2)])
    assert switch.calls == ["detach", "attach None ('-s', '5000')", "detach", "attach None None"]
    phases = result.phases
    assert [p.scheduler for p in phases] == ["simple", "kernel", "simple", "simple"]
    assert [p.sched_state["state"] for p in phases] == ["enabled", "disabled", "enabled",
                                                         "enabled"]
    assert phases[3].started_by == "RestartScheduler"
    assert all(p.work_units > 0 and 0.15 < p.end_s - p.start_s < 0.6 for p in phases)
    assert sum(p.cgroup_units["a"] for p in phases) <= result.cgroup("a").work_units
    assert result.to_dict()["phases"][0]["work_rate"] > 0


def test_without_a_scheduler_control_lifecycle_ops_are_refused() -> None:
    with host_session() as s:
        ctx = ScenarioContext(s.topology, 1.0, s.root, cpu_ids=s.cpu_ids)
        with pytest.raises(KtstrError, match="DetachScheduler needs a scheduler to control"):
            execute_steps(ctx, [Step(ops=(DetachScheduler(),), hold_s=0.1)])


def test_replace_needs_something_to_replace_with() -> None:
    with pytest.raises(KtstrError, match="give a binary or args"):
        ReplaceScheduler()
    with pytest.raises(KtstrError, match="tuple of strings"):
        ReplaceScheduler(args=["-s", 5])  # type: ignore[list-item]
