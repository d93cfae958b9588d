"""Declarative scheduler scenarios: cgroups, workloads, steps, and the runner.

Everything in this package runs inside the guest (packed into the
initramfs) and directly on a host in "host mode", so it uses only the
Python standard library.
"""

from __future__ import annotations

from ktstr.scenario.model import (
    AddCgroup,
    Affinity,
    CgroupDef,
    ClearCpuset,
    CpusetSpec,
    MoveAllTasks,
    Op,
    RemoveCgroup,
    SchedPolicy,
    SetAffinity,
    SetCpuset,
    Spawn,
    Step,
    StopCgroup,
    SwapCpusets,
)
from ktstr.scenario.runner import ScenarioContext, execute_defs, execute_steps

__all__ = [
    "AddCgroup",
    "Affinity",
    "CgroupDef",
    "ClearCpuset",
    "CpusetSpec",
    "MoveAllTasks",
    "Op",
    "RemoveCgroup",
    "ScenarioContext",
    "SchedPolicy",
    "SetAffinity",
    "SetCpuset",
    "Spawn",
    "Step",
    "StopCgroup",
    "SwapCpusets",
    "execute_defs",
    "execute_steps",
]
