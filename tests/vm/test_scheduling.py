"""Scheduling properties under the run's scheduler (``--ktstr-scheduler``), as users write them.

Durations are short and topologies small (except where the topology is the
point): each test boots its own VM.
"""

from __future__ import annotations

import pytest

from ktstr.checks import Checks
from ktstr.scenario import (
    Affinity,
    CgroupDef,
    CpusetSpec,
    SetAffinity,
    SetCpuset,
    Step,
    SwapCpusets,
)
from ktstr.scenario.work import Bursty, CpuSpin, FutexPingPong, IoSync, Mixed, YieldHeavy
from ktstr.testing import execute_defs, execute_steps, ktstr_test


@pytest.mark.smoke
@ktstr_test(topology="1n2l2c1t", duration=2.0)
def test_steady(ctx):
    """Two cgroups, one per LLC's worth of work: everyone progresses, no long stalls."""
    return execute_defs(ctx, [CgroupDef("cg0", workers=2), CgroupDef("cg1", workers=2)])


@ktstr_test(topology="1n1l2c1t", duration=2.0, checks=Checks(fairness_spread_pct=35.0))
def test_oversubscribed(ctx):
    """Two runnable workers per CPU: nobody starves, off-CPU time stays even."""
    return execute_defs(ctx, [CgroupDef("busy", workers=4, work=CpuSpin())])


@ktstr_test(topology="1n2l2c1t", duration=2.0)
def test_cpuset_change(ctx):
    """Cpusets set per LLC, then swapped mid-run: workers follow and stay isolated."""
    setup = [
        CgroupDef("a", cpuset=CpusetSpec.llc(0), workers=2),
        CgroupDef("b", cpuset=CpusetSpec.llc(1), workers=2),
    ]
    steps = [
        Step(hold=0.4),
        Step(ops=(SwapCpusets("a", "b"),), hold=0.3),
        Step(ops=(SetCpuset("a", CpusetSpec.all()),), hold=0.3),
    ]
    return execute_steps(ctx, steps, setup=setup)


# Random pairs overlap (a CPU may hold three workers while another holds one), so the
# workers' off-CPU times differ by the draw, not by the scheduler: fairness is not the claim.
@ktstr_test(topology="tiny-1llc", duration=2.0, checks=Checks(fairness_spread_pct=None))
def test_affinity(ctx):
    """Workers pinned one CPU each, then re-pinned to random pairs: no isolation breach."""
    setup = [CgroupDef("pinned", workers=4, affinity=Affinity.single())]
    steps = [Step(hold=0.5), Step(ops=(SetAffinity("pinned", Affinity.random(2)),), hold=0.5)]
    return execute_steps(ctx, steps, setup=setup)


@ktstr_test(topology="1n2l2c1t", duration=2.0)
def test_nested_cgroups(ctx):
    """A parent cgroup holding two children with their own cpusets and workers."""
    parent = CgroupDef(
        "parent",
        workers=1,
        children=(
            CgroupDef("left", cpuset=CpusetSpec.llc(0), workers=2),
            CgroupDef("right", cpuset=CpusetSpec.llc(1), workers=2, work=YieldHeavy()),
        ),
    )
    return execute_defs(ctx, [parent])


@ktstr_test(topology="smt-2llc", duration=2.0, requires_smt=True,
            checks=Checks(fairness_spread_pct=None))
def test_mixed_workloads(ctx):
    """CPU-bound, I/O and bursty work side by side on an SMT machine."""
    return execute_defs(
        ctx,
        [
            CgroupDef("spin", workers=2, work=CpuSpin()),
            CgroupDef("mixed", workers=2, work=Mixed()),
            CgroupDef("io", workers=2, work=IoSync()),
            CgroupDef("bursty", workers=2, work=Bursty()),
        ],
    )


@ktstr_test(topology="1n1l2c1t", duration=2.0,
            checks=Checks(wake_p99_us=200_000.0, fairness_spread_pct=None))
def test_pingpong_latency(ctx):
    """Futex ping-pong pairs: wakeups are served (p99 bounded loosely: nested VMs are slow)."""
    return execute_defs(ctx, [CgroupDef("pp", workers=2, work=FutexPingPong())])


@ktstr_test(topology="numa2-2llc", duration=2.0, min_numa_nodes=2)
def test_numa_cpusets(ctx):
    """One cgroup per NUMA node: work stays on its node and both nodes progress."""
    return execute_defs(
        ctx,
        [
            CgroupDef("node0", cpuset=CpusetSpec.numa(0), workers=2),
            CgroupDef("node1", cpuset=CpusetSpec.numa(1), workers=2),
        ],
    )
