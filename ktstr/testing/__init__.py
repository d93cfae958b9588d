"""Writing scheduler tests: ``@ktstr_test`` plus the scenario building blocks.

    from ktstr.scenario import CgroupDef
    from ktstr.testing import execute_defs, ktstr_test

    @ktstr_test(topology="1n2l2c1t", duration=2.0)
    def test_steady(ctx):
        return execute_defs(ctx, [CgroupDef("cg0", workers=4)])

The pytest plugin (:mod:`ktstr.testing.plugin`, loaded through the
``pytest11`` entry point) collects such functions as VM tests.
``execute_defs``/``execute_steps`` are the scenario runner's: they take the
guest's ctx as is (``ktstr.scenario.ScenarioContext.of`` maps its names).
"""

from __future__ import annotations

from ktstr.scenario.runner import execute_defs, execute_steps
from ktstr.testing.decorator import KtstrTestSpec, ktstr_test, spec_of

__all__ = ["KtstrTestSpec", "execute_defs", "execute_steps", "ktstr_test", "spec_of"]
