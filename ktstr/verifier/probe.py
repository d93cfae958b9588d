"""The guest side of ``ktstr verifier``: a little work for the scheduler to dispatch."""

from __future__ import annotations

from typing import Any


def run(ctx: Any) -> dict[str, Any]:
    from ktstr.scenario import CgroupDef
    from ktstr.testing import execute_defs

    # The guest runtime takes a dict (the JSON it sends back), not the result object.
    return execute_defs(ctx, [CgroupDef("probe", workers=2)]).to_dict()
