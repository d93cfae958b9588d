"""Real benchmark programs as scenario steps inside the guest, under the run's scheduler:
their metrics land in the sidecar (``payload_metrics``), where ``ktstr stats compare``
gates on them between two runs (say eevdf and scx_simple)."""

from __future__ import annotations

from ktstr.scenario import CgroupDef, Step
from ktstr.scenario.model import RunPayload, WaitPayload
from ktstr.scenario.payload import CYCLICTEST, HACKBENCH
from ktstr.testing import execute_steps, ktstr_test

_HACKBENCH = HACKBENCH.with_args("-g", "1", "-l", "50", "-s", "100")
_CYCLICTEST = CYCLICTEST.with_args("-q", "-D", "2", "-t", "2", "-i", "1000", "-h", "20000")


@ktstr_test(topology="1n1l2c1t", duration=3.0, timeout=240.0, payloads=[HACKBENCH, CYCLICTEST])
def test_hackbench_and_cyclictest_payloads(ctx):
    """cyclictest measures wake-up latency while hackbench and two spinners load the CPUs."""
    result = execute_steps(ctx, [
        Step(ops=(RunPayload(_CYCLICTEST), RunPayload(_HACKBENCH, wait=True)), hold=0.2),
        Step(ops=(WaitPayload("cyclictest"),), hold=0.1),
    ], setup=[CgroupDef("load", workers=2)])
    by = {p.label: p for p in result.payloads}
    assert by["hackbench"].metrics.get("time_s", 0) > 0, by["hackbench"]
    assert by["cyclictest"].metrics.get("p99_us", 0) > 0, by["cyclictest"]
    return result
