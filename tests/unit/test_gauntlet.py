"""Gauntlet expansion and budgeted selection."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktstr.errors import KtstrError
from ktstr.gauntlet import (
    Constraints,
    GauntletTest,
    HostCapacity,
    Shard,
    Variant,
    coverage_of,
    estimate_cost,
    expand,
    parse_kernels,
    read_plan,
    select,
    shard_of,
    take_shard,
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
    # Every preset but max-cpu, whose APIC IDs pass what a guest brings online here.
    assert sum(v.test == "t_any" for v in variants) == (len(PRESETS) - 1) * n_profiles
    assert "max-cpu" not in {v.preset for v in variants}
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
    seen: set[tuple[str, ...]] = set()
    for v in chosen:
        if seen == full:
            break
        assert v.coverage() not in seen
        seen.add(v.coverage())
    # The cheapest variant of each triple is what gets picked (coverage per second).
    cheapest: dict[tuple[str, ...], float] = {}
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


def test_old_plan_without_kernel_reads(tmp_path: Path) -> None:
    row = {"test": "a", "scheduler": "eevdf", "profile": "default", "preset": "tiny-1llc",
           "topology": "1n1l4c1t", "cost_s": 10.0}  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps([row]))
    (v,) = read_plan(tmp_path / "old.json")
    assert v.kernel == "" and v.id == "eevdf@default-tiny-1llc"


# --- host capacity ---------------------------------------------------------------------


def test_host_memory_uses_the_topology_default() -> None:
    """A 128-vCPU guest gets 8192 MB whatever the test asks below that."""
    topo = PRESETS["large-128cpu"]
    assert HostCapacity(cpus=64, memory_mb=16384).allows(topo, 512) is None
    why = HostCapacity(cpus=64, memory_mb=16000).allows(topo, 512)
    assert why and "8192 MB guest" in why
    why = HostCapacity(cpus=64, memory_mb=16384).allows(topo, 10000)
    assert why and "10000 MB guest" in why


def test_host_limits_on_this_machine_shape() -> None:
    """2 CPUs and 24 GiB: at most 16 vCPUs; with 64 CPUs, 192 vCPUs fit, 252 do not."""
    assert HostCapacity(cpus=2, memory_mb=24576).allows(PRESETS["large-numa2"], None)
    wide = HostCapacity(cpus=64, memory_mb=24576)
    assert wide.allows(PRESETS["numa4-192cpu"], None) is None  # 12288 MB, half the RAM
    assert "MB guest" in (wide.allows(PRESETS["max-cpu"], None) or "")
    why = HostCapacity(cpus=64, memory_mb=1 << 20).allows(PRESETS["max-cpu"], None)
    assert why and "APIC IDs up to 433 > 255" in why
    reach = HostCapacity(cpus=64, memory_mb=1 << 20, apic_id_reach=0x7FFF)
    assert reach.allows(PRESETS["max-cpu"], None) is None


# --- kernels and shards ----------------------------------------------------------------

KERNELS = {"6.12": True, "6.1": False}


def _fleet_plan() -> list[Variant]:
    tests = [GauntletTest("a"), GauntletTest("b", duration_s=5.0)]
    return expand(tests, SCHEDS, BIG_HOST, kernels=KERNELS)


def test_kernels_are_a_dimension() -> None:
    variants = _fleet_plan()
    by_kernel = {k: [v for v in variants if v.kernel == k] for k in KERNELS}
    assert {v.scheduler for v in by_kernel["6.1"]} == {"eevdf"}  # no sched_ext in 6.1
    assert {v.scheduler for v in by_kernel["6.12"]} == {s.name for s in SCHEDS}
    assert len({v.cell_id for v in variants}) == len(variants)
    # Coverage counts per kernel: a budget spends on both kernels before repeating one.
    chosen = select(variants, 60.0)
    assert {v.kernel for v in chosen} == set(KERNELS)


def test_parse_kernels() -> None:
    assert parse_kernels("6.12,6.1") == ["6.12", "6.1"]
    assert parse_kernels(" 6.12 , 6.12,6.6 ") == ["6.12", "6.6"]
    for bad in ("", " , ", "6.12,a/b"):
        with pytest.raises(KtstrError, match="--kernels"):
            parse_kernels(bad)


def test_shard_parse() -> None:
    assert Shard.parse("2/3") == Shard(2, 3) and str(Shard.parse(" 1/1 ")) == "1/1"
    for bad, why in (("4/3", "between 1 and 3"), ("0/2", "between 1 and 2"),
                     ("1/0", "at least 1"), ("a/b", "expected I/N"), ("1/2/3", "expected I/N"),
                     ("-1/2", "expected I/N"), ("", "expected I/N")):  # fmt: skip
        with pytest.raises(KtstrError, match=why) as info:
            Shard.parse(bad)
        assert "\n" not in str(info.value)


def _check_partition(variants: list[Variant], count: int) -> None:
    shards = [take_shard(variants, Shard(i, count)) for i in range(1, count + 1)]
    ids = [v.cell_id for shard in shards for v in shard]
    assert sorted(ids) == sorted(v.cell_id for v in variants)  # no gap, no overlap
    assert len(set(ids)) == len(ids)


def test_shards_cover_the_plan_exactly_once() -> None:
    variants = _fleet_plan()
    _check_partition(variants, 3)
    sizes = [len(take_shard(variants, Shard(i, 3))) for i in (1, 2, 3)]
    assert min(sizes) > 0.2 * len(variants)  # roughly even, not all in one
    assert take_shard(variants, None) == variants
    assert take_shard(variants, Shard(1, 1)) == variants


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_shards_partition_any_count_and_order(count: int, seed: int) -> None:
    variants = _fleet_plan()
    _check_partition(variants, count)
    # Stable: the assignment does not depend on the order cells come in.
    shuffled = variants[:]
    random.Random(seed).shuffle(shuffled)
    shard = Shard(seed % count + 1, count)
    assert {v.cell_id for v in take_shard(shuffled, shard)} == {
        v.cell_id for v in take_shard(variants, shard)
    }


def test_shard_of_is_fixed() -> None:
    """Pinned values: a change here would move cells between the machines of a fleet."""
    assert [shard_of(f"6.12/t[{i}]", 4) for i in range(8)] == [4, 1, 4, 1, 1, 4, 2, 2]
    assert shard_of("6.12/a[eevdf@default-tiny-1llc]", 1) == 1
