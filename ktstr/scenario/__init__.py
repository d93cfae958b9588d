"""Declarative scheduler scenarios: cgroups, workloads, steps, and the runner.

Everything in this package runs inside the guest (packed into the
initramfs) and directly on a host in "host mode", so it uses only the
Python standard library.
"""

from __future__ import annotations

from ktstr.scenario.controls import CgroupControls, CpuMax
from ktstr.scenario.model import (
    AddCgroup,
    Affinity,
    AttachScheduler,
    CaptureCgroupProcs,
    CgroupDef,
    ClearCpuset,
    CpusetSpec,
    DetachScheduler,
    FreezeCgroup,
    MoveAllTasks,
    Op,
    RemoveCgroup,
    ReplaceScheduler,
    RestartScheduler,
    SchedPolicy,
    SetAffinity,
    SetControls,
    SetCpuset,
    Spawn,
    Step,
    StopCgroup,
    SwapCpusets,
    UnfreezeCgroup,
)
from ktstr.scenario.runner import ScenarioContext, execute_defs, execute_steps

__all__ = [
    "AddCgroup",
    "Affinity",
    "AttachScheduler",
    "CaptureCgroupProcs",
    "CgroupControls",
    "CgroupDef",
    "ClearCpuset",
    "CpuMax",
    "CpusetSpec",
    "DetachScheduler",
    "FreezeCgroup",
    "MoveAllTasks",
    "Op",
    "RemoveCgroup",
    "ReplaceScheduler",
    "RestartScheduler",
    "ScenarioContext",
    "SchedPolicy",
    "SetAffinity",
    "SetControls",
    "SetCpuset",
    "Spawn",
    "Step",
    "StopCgroup",
    "SwapCpusets",
    "UnfreezeCgroup",
    "execute_defs",
    "execute_steps",
]
