"""Writing scheduler tests: ``@ktstr_test`` plus the scenario building blocks.

    from ktstr.scenario import CgroupDef
    from ktstr.testing import execute_defs, ktstr_test

    @ktstr_test(topology="1n2l2c1t", duration=2.0)
    def test_steady(ctx):
        return execute_defs(ctx, [CgroupDef("cg0", workers=4)])

The pytest plugin (:mod:`ktstr.testing.plugin`, loaded through the
``pytest11`` entry point) collects such functions as VM tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ktstr.testing.decorator import KtstrTestSpec, ktstr_test, spec_of

__all__ = ["KtstrTestSpec", "execute_defs", "execute_steps", "ktstr_test", "spec_of"]


def scenario_context(ctx: Any) -> Any:
    """A :class:`ktstr.scenario.ScenarioContext` for the scenario runner from any ctx.

    The guest's context names things its own way (``duration_s``, a Path
    ``cgroup_root``, thresholds in ``args``); the runner wants plain fields.
    A ScenarioContext passes through unchanged.
    """
    from ktstr.scenario import ScenarioContext

    if isinstance(ctx, ScenarioContext):
        return ctx
    duration = getattr(ctx, "duration", None) or getattr(ctx, "duration_s", None)
    checks = getattr(ctx, "checks", None)
    if checks is None:
        raw = (getattr(ctx, "args", None) or {}).get("checks")
        if raw is not None:
            from ktstr.checks import Checks

            checks = Checks().override(raw)
    scratch = getattr(ctx, "scratch_dir", None) or getattr(ctx, "scratch", None)
    extra: dict[str, Any] = {"scratch_dir": str(scratch)} if scratch else {}
    return ScenarioContext(
        topology=ctx.topology,
        duration=float(duration or 1.0),
        cgroup_root=str(ctx.cgroup_root),
        cpu_ids=getattr(ctx, "cpu_ids", None),
        checks=checks,
        **extra,
    )


def execute_defs(ctx: Any, defs: Sequence[Any], **kwargs: Any) -> Any:
    """:func:`ktstr.scenario.execute_defs` with the test's context adapted."""
    from ktstr import scenario

    return scenario.execute_defs(scenario_context(ctx), defs, **kwargs)


def execute_steps(ctx: Any, steps: Sequence[Any], **kwargs: Any) -> Any:
    """:func:`ktstr.scenario.execute_steps` with the test's context adapted."""
    from ktstr import scenario

    return scenario.execute_steps(scenario_context(ctx), steps, **kwargs)
