"""The guest side of ``ktstr verifier``: a little work for the scheduler to dispatch."""

from __future__ import annotations

from typing import Any


def run(ctx: Any) -> Any:
    from ktstr.scenario import CgroupDef
    from ktstr.testing import execute_defs

    return execute_defs(ctx, [CgroupDef("probe", workers=2)])
