"""Writing scheduler tests: ``@ktstr_test`` plus the scenario building blocks.

    from ktstr.testing import CgroupDef, execute_defs, ktstr_test

    @ktstr_test(topology="1n2l2c1t", duration=2.0)
    def test_steady(ctx):
        return execute_defs(ctx, [CgroupDef("cg0", workers=4)])

The pytest plugin (:mod:`ktstr.testing.plugin`, loaded through the
``pytest11`` entry point) collects such functions as VM tests.
"""

from __future__ import annotations

from typing import Any

from ktstr.testing.decorator import KtstrTestSpec, ktstr_test, spec_of

__all__ = ["KtstrTestSpec", "execute_defs", "execute_steps", "ktstr_test", "spec_of"]


def __getattr__(name: str) -> Any:
    # The scenario package is imported on first use so that collecting tests does not
    # need it; inside the guest it is always there.
    if name in ("execute_defs", "execute_steps", "CgroupDef", "Step"):
        import ktstr.scenario as scenario

        return getattr(scenario, name)
    raise AttributeError(name)
