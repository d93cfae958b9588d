"""The scenario vocabulary: parsing, validation, nesting, holds; the catalog's scaling."""

from __future__ import annotations

import pytest

from ktstr.errors import KtstrError
from ktstr.scenario import catalog
from ktstr.scenario.model import (
    CgroupDef,
    CpusetSpec,
    SchedPolicy,
    Step,
)
from ktstr.scenario.work import FutexPingPong, PipeIo
from ktstr.topology import PRESETS


@pytest.mark.parametrize(
    "text", ["all", "llc:1", "numa:0", "range:0-0.5", "disjoint:1/4", "overlap:1/4@0.25",
             "exact:0,2-3"],
)
def test_cpuset_spec_parse_describe(text: str) -> None:
    assert CpusetSpec.parse(text).describe() == text


def test_cpuset_spec_parse_error() -> None:
    with pytest.raises(KtstrError, match="expected all, llc:I"):
        CpusetSpec.parse("llc:x")


def test_policy_validation() -> None:
    assert SchedPolicy.fifo(50).describe() == "fifo:50"
    with pytest.raises(KtstrError, match="priority must be 1-99"):
        SchedPolicy.rr(0)
    with pytest.raises(KtstrError, match="takes no priority"):
        SchedPolicy(SchedPolicy.batch().kind, 3)


def test_cgroupdef_nesting_and_validation() -> None:
    d = CgroupDef("outer", workers=0, children=(CgroupDef("a", children=(CgroupDef("x"),)),
                                                CgroupDef("b")))
    assert [n for n, _ in d.flatten()] == ["outer", "outer/a", "outer/a/x", "outer/b"]
    with pytest.raises(KtstrError, match="cgroup name"):
        CgroupDef("../escape")
    with pytest.raises(KtstrError, match="nice must be"):
        CgroupDef("a", nice=20)


def test_step_hold() -> None:
    assert Step(hold=0.25).hold_seconds(8) == 2
    assert Step(hold=0.25, hold_s=1.5).hold_seconds(8) == 1.5
    with pytest.raises(KtstrError):
        Step(hold=-1)


def test_pairs_need_even_workers() -> None:
    with pytest.raises(KtstrError, match="even worker count"):
        FutexPingPong().make_shared(3, "/tmp")
    with pytest.raises(KtstrError, match="even worker count"):
        PipeIo().make_shared(1, "/tmp")


def test_catalog_has_the_named_scenarios() -> None:
    required = {
        "steady", "steady_llc", "oversubscribed", "cpuset_apply_midrun", "cpuset_clear_midrun",
        "cpuset_resize_midrun", "cgroup_add_midrun", "cgroup_remove_midrun", "affinity_change",
        "affinity_pinned", "mixed_workloads", "nested_steady", "nested_task_move",
        "fork_exit_churn", "nice_sweep", "pipe_io", "futex_pingpong", "sched_fifo_mix",
        "host_contention", "io_sync", "bursty", "cache_pressure",
    }
    assert required <= set(catalog.CATALOG)
    assert len(catalog.CATALOG) >= 20
    with pytest.raises(KtstrError, match="no scenario named 'nope'"):
        catalog.get("nope")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_scenario_scales_to_every_preset(preset: str) -> None:
    topo = PRESETS[preset]
    for sc in catalog.CATALOG.values():
        for workers in (None, 1, 3):
            steps = sc.steps(catalog.Params(topo, workers))
            assert steps and abs(sum(s.hold for s in steps) - 1.0) < 0.02, sc.name
            catalog.validate(steps, topo)


def test_validate_rejects_impossible_steps() -> None:
    topo = PRESETS["tiny-2llc"]
    from ktstr.scenario.model import AddCgroup, SetCpuset

    with pytest.raises(KtstrError, match="no LLC 5"):
        catalog.validate([Step((AddCgroup(CgroupDef("a", CpusetSpec.llc(5))),))], topo)
    with pytest.raises(KtstrError, match="no cgroup 'b'"):
        catalog.validate([Step((SetCpuset("b", CpusetSpec.all()),))], topo)


def test_catalog_covers_the_categories() -> None:
    from collections import Counter

    from ktstr.scenario.catalog import CATEGORIES

    counts = Counter(s.category for s in catalog.CATALOG.values())
    assert len(catalog.CATALOG) >= 81 and set(counts) == set(CATEGORIES), counts
    assert all(s.description and len(s.description) < 110 for s in catalog.CATALOG.values())
    with pytest.raises(ValueError, match="category 'misc' is not one of"):
        catalog.Scenario("x", "misc", "d", lambda p: [])
