"""The scenario catalog as a VM suite: one VM test per catalog entry, under the run's
scheduler (``nox -s vm_catalog``; the gauntlet can take it like any VM suite).

Each entry runs with its own check overrides; an entry that is expected to fail (not in
the default run) is an ``expect_err`` test. The functions are made at import, so the
guest finds each one by name as it does any scenario.
"""

from __future__ import annotations

from ktstr.scenario import catalog
from ktstr.testing import execute_steps, ktstr_test

TOPOLOGY = "1n2l1c1t"
"""Two LLCs of one CPU each: the smallest shape every entry resolves on."""
DURATION_S = 2.0


def _make(sc: catalog.Scenario):  # type: ignore[no-untyped-def]
    def scenario(ctx):  # type: ignore[no-untyped-def]
        steps = sc.steps(catalog.Params(ctx.topology))
        return execute_steps(ctx, steps, name=sc.name)

    name = f"test_catalog_{sc.name}"
    scenario.__name__ = scenario.__qualname__ = name
    scenario.__module__ = __name__
    scenario.__doc__ = sc.description
    return name, ktstr_test(topology=TOPOLOGY, duration=DURATION_S, payloads=sc.payloads,
                            checks=dict(sc.checks) or None,
                            expect_err=not sc.in_default_run)(scenario)


for _sc in catalog.CATALOG.values():
    _name, _test = _make(_sc)
    globals()[_name] = _test
