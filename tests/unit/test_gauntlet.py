"""Gauntlet expansion and budgeted selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.gauntlet import (
    Constraints,
    GauntletTest,
    HostCapacity,
    Variant,
    coverage_of,
    estimate_cost,
    expand,
    read_plan,
    select,
    topology_class,
    write_plan,
)
from ktstr.scheduler import BUILTIN
from ktstr.topology import PRESETS, Topology

BIG_HOST = HostCapacity(cpus=64, memory_mb=262144)
SMALL_HOST = HostCapacity(cpus=2, memory_mb=24576)
SCHEDS = [BUILTIN["eevdf"], BUILTIN["scx_simple"], BUILTIN["scx_qmap"]]


def test_topology_class() -> None:
    assert topology_class(Topology.parse("1n1l4c1t")) == "single-llc"
    assert topology_class(Topology.parse("1n2l2c2t")) == "multi-llc+smt"
    assert topology_class(Topology.parse("2n4l2c1t")) == "numa"


def test_expand_respects_constraints_capacity_and_kernel() -> None:
    tests = [
        GauntletTest("t_any"),
        GauntletTest("t_smt", constraints=Constraints(requires_smt=True, max_cpus=16)),
        GauntletTest("t_pinned", scheduler="scx_qmap"),
    ]
    variants = expand(tests, SCHEDS, BIG_HOST)
    n_profiles = sum(len(s.profiles()) for s in SCHEDS)
    assert sum(v.test == "t_any" for v in variants) == len(PRESETS) * n_profiles
    smt = [v for v in variants if v.test == "t_smt"]
    assert smt and all(Topology.parse(v.topology).threads_per_core == 2 for v in smt)
    assert all(Topology.parse(v.topology).nr_cpus <= 16 for v in smt)
    assert {v.scheduler for v in variants if v.test == "t_pinned"} == {"scx_qmap"}
    # A 2-CPU host drops the 64-vCPU presets.
    small = expand(tests, SCHEDS, SMALL_HOST)
    assert max(Topology.parse(v.topology).nr_cpus for v in small) <= 16
    assert len(small) < len(variants)
    # A kernel without sched_ext keeps only EEVDF.
    assert {v.scheduler for v in expand(tests, SCHEDS, BIG_HOST, sched_ext=False)} == {"eevdf"}


def test_select_without_budget_keeps_all() -> None:
    variants = expand([GauntletTest("a")], SCHEDS, SMALL_HOST)
    assert len(select(variants, None)) == len(variants)


def test_select_budget_greedy_coverage() -> None:
    tests = [GauntletTest("a"), GauntletTest("b", duration_s=10.0)]
    variants = expand(tests, SCHEDS, SMALL_HOST)
    full = coverage_of(variants)
    budget = 300.0
    chosen = select(variants, budget)
    assert sum(v.cost_s for v in chosen) <= budget
    # Every pick before full coverage adds a new (scheduler, class, profile) triple.
    seen: set[tuple[str, str, str]] = set()
    for v in chosen:
        if seen == full:
            break
        assert v.coverage() not in seen
        seen.add(v.coverage())
    # The cheapest variant of each triple is what gets picked (coverage per second).
    cheapest = {}
    for v in variants:
        cheapest[v.coverage()] = min(cheapest.get(v.coverage(), v.cost_s), v.cost_s)
    for v in chosen[: len(seen)]:
        assert v.cost_s == cheapest[v.coverage()]
    # The short test is preferred over the 10 s one for the same coverage.
    assert chosen[0].test == "a"
    # A big enough budget covers everything; deterministic.
    everything = select(variants, 1e9)
    assert coverage_of(everything) == full
    assert select(variants, budget) == chosen


def test_select_tiny_budget_and_bad_budget() -> None:
    variants = expand([GauntletTest("a")], SCHEDS, SMALL_HOST)
    cheapest = min(v.cost_s for v in variants)
    assert select(variants, cheapest - 0.01) == []
    assert len(select(variants, cheapest)) == 1
    with pytest.raises(KtstrError, match="budget"):
        select(variants, 0)


def test_cost_grows_with_cpus_and_duration() -> None:
    small, big = Topology.parse("1n1l2c1t"), Topology.parse("1n4l4c1t")
    t = GauntletTest("a", duration_s=2.0)
    assert estimate_cost(t, big) > estimate_cost(t, small)
    assert estimate_cost(GauntletTest("a", duration_s=5.0), small) > estimate_cost(t, small)


def test_plan_roundtrip(tmp_path: Path) -> None:
    plan = select(expand([GauntletTest("a")], SCHEDS, SMALL_HOST), 100)
    write_plan(plan, tmp_path / "plan.json")
    assert read_plan(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text("[{}]")
    with pytest.raises(KtstrError, match="regenerate"):
        read_plan(tmp_path / "bad.json")
    assert isinstance(plan[0], Variant) and plan[0].id.count("@") == 1
