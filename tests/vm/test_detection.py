"""Detection power: misbehaviour the checks exist for must be reported inside the VM.

Each test provokes one specific problem under the run's scheduler and expects
the run to fail with that check's message (the worker, cgroup and CPU named),
not with any failure. Both reuse the mechanisms the host-mode acceptance tests
use (``tests/host/test_host_mode.py``): the catalog's ``fifo_hog_starvation``
scenario, and a worker moved into another cgroup behind the runner's back.
``expect_err`` is matched against the failed checks' lines as the plugin reports
them: ``check <name> <worker>: value V (threshold T) <message>``, one per line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ktstr.scenario import CgroupDef, CpusetSpec, ScenarioContext
from ktstr.scenario.catalog import Params
from ktstr.scenario.catalog import get as catalog_scenario
from ktstr.scenario.runner import Runner
from ktstr.testing import execute_steps, ktstr_test

if TYPE_CHECKING:
    from ktstr.runner import GuestRun


@contextlib.contextmanager
def _threads_on(cpus: set[int]) -> Iterator[None]:
    """Pin every thread of this process (the guest init and its sampler) to ``cpus``.

    Keeps the scenario runner off the CPU a SCHED_FIFO hog owns, so it can still
    sample, stop the workers and report. Workers forked meanwhile inherit the mask,
    but joining their cgroup gives them its cpuset (the masks do not intersect).
    """
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    saved = {tid: os.sched_getaffinity(tid) for tid in tids}
    for tid in tids:
        os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid, mask in saved.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, mask)


@ktstr_test(
    topology="1n1l2c1t", duration=2.0, gauntlet=False,
    # Starved outright (no work, a long stall) or, where the scheduler still lets the
    # victim in now and then (scx_central), a progress gap over the limit: either way the
    # failed check names the victim, its cgroup and the hogged CPU. Under a sched_ext
    # scheduler the RT hog starves the ext class on its CPU, and sched_ext's own watchdog
    # may eject the scheduler first (scx_simple, scx_qmap): that names the stalled task.
    expect_err=r"(?m)^check (starvation|max_gap) victims\[\d\] pid \d+: .*\bworker "
               r"victims\[\d\] pid \d+ in cgroup victims \(CPUs 1\)"
               r":? (made 0 work units|went \d+ ms without progress|longest gap between)"
               r"|scheduler '\w+' was ejected during the scenario \(runnable task stall: "
               r"\S+\[\d+\] failed to run for",
)
def test_fifo_hog_starvation_is_detected(ctx):
    """Two normal spinners share CPU 1 with a SCHED_FIFO spinner: they get only what
    RT throttling / the fair server leaves them (~5 %, in ~1 s bursts), so the
    starvation check names a victim."""
    scenario = catalog_scenario("fifo_hog_starvation")
    steps = scenario.steps(Params(ctx.topology))
    hog_cpu = ctx.topology.nr_cpus - 1  # the scenario's hog and victims share the last CPU
    with _threads_on(set(range(ctx.topology.nr_cpus)) - {hog_cpu}):
        return execute_steps(ctx, steps, name=scenario.name, checks=scenario.checks or None)


@ktstr_test(
    topology="1n1l2c1t", duration=1.0, gauntlet=False,
    expect_err=r"(?m)^check isolation home\[0\] pid \d+: .*\bworker home\[0\] pid \d+ in cgroup "
               r"home ran on CPU 1 outside its cpuset 0\b",
)
def test_worker_outside_its_cpuset_is_detected(ctx):
    """A worker of cgroup ``home`` (cpuset 0) is attached to cgroup ``away`` (cpuset 1)
    without telling the runner: it keeps running, now on CPU 1, and the isolation
    check must name it and that CPU."""
    runner = Runner(ScenarioContext.of(ctx), "inject")
    try:
        runner.add(CgroupDef("home", CpusetSpec.exact([0]), workers=1))
        runner.add(CgroupDef("away", CpusetSpec.exact([1]), workers=0))
        runner.hold(0.4 * ctx.duration_s)
        runner.backend.attach("away", runner.live[0].pid)
        runner.hold(0.6 * ctx.duration_s)
        # Telemetry only: the host evaluates the checks over it.
        return runner.finish()
    finally:
        runner.close()


def _stuck_vcpus_unwound(run: GuestRun) -> None:
    """Where each vCPU of the timed-out guest was, unwound from its registers in guest RAM:
    the idle one through the kernel's idle loop (a real unwind, not a stack scan)."""
    obs = run.observation
    assert obs is not None and obs.open_s is not None, obs and obs.problems
    assert obs.final_snapshot() is not None, obs.problems
    assert sorted(r.index for r in obs.vcpu_regs) == [0, 1], obs.vcpu_regs
    stacks = obs.vcpu_stacks
    idle = [s for s in stacks.values() if any(f.startswith("do_idle+") for f in s)
            and not any(f.startswith("? ") for f in s)]
    assert idle, stacks


@ktstr_test(topology="1n1l2c1t", scheduler="eevdf", duration=1.0, timeout=30.0,
            gauntlet=False, host_check=_stuck_vcpus_unwound,
            expect_err=r"guest did not power off within|no guest progress for")
def test_a_hung_guest_says_where_its_vcpus_were(ctx):
    """A guest that never finishes: the failure says where each vCPU was in the kernel."""
    os.sched_setaffinity(0, {0})
    while True:
        pass
