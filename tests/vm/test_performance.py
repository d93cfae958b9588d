"""Performance mode in a real guest: pinned vCPU threads, 2 MB pages, HLT/PAUSE exits off.

The host check reads what the VMM applied (the sidecar's ``performance``) and the guest
still runs its scenario to the end; where the host cannot give a part (the sandbox's
kernel has no transparent hugepages), the record must say why.
"""

from __future__ import annotations

from ktstr.checks import Checks
from ktstr.runner import GuestRun
from ktstr.scenario import CgroupDef
from ktstr.testing import execute_defs, ktstr_test


def _performance_applied(run: GuestRun) -> None:
    applied = run.vm.performance
    assert applied is not None, "performance mode was not applied"
    cpus = run.reservation.get("cpus")
    assert run.reservation.get("mode") == "llc", run.reservation
    assert applied["pinned"] == cpus[:2], (applied, run.reservation)
    if applied["memory"] == "4k":
        assert any(line.startswith("2 MB pages:") for line in applied["missing"]), applied
    else:
        assert applied["huge_kb"], applied
    for name in ("hlt", "pause"):
        assert name in applied["disabled_exits"] or any(
            name in line for line in applied["missing"]), applied
    assert run.vm.dilation is not None


@ktstr_test(topology="1n1l2c1t", scheduler="eevdf", duration=2.0, performance_mode=True,
            gauntlet=False,
            checks=Checks(fairness_spread_pct=None), host_check=_performance_applied)
def test_performance_mode_is_applied(ctx):
    return execute_defs(ctx, [CgroupDef("a", workers=2)])
