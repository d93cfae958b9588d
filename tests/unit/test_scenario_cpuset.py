"""Cpuset spec and affinity resolution on every topology preset."""

from __future__ import annotations

import random

import pytest

from ktstr.errors import KtstrError
from ktstr.scenario.cpuset import resolve_affinity, resolve_cpuset
from ktstr.scenario.model import Affinity, CpusetSpec
from ktstr.topology import PRESETS, Topology

PRESET_ITEMS = sorted(PRESETS.items())


@pytest.mark.parametrize(("name", "topo"), PRESET_ITEMS)
def test_all_llc_numa_on_every_preset(name: str, topo: Topology) -> None:
    everything = tuple(range(topo.nr_cpus))
    assert resolve_cpuset(CpusetSpec.all(), topo) == everything
    seen: list[int] = []
    for llc in range(topo.llcs):
        cpus = resolve_cpuset(CpusetSpec.llc(llc), topo)
        assert cpus == tuple(topo.cpus_in_llc(llc))
        assert {topo.place(c).llc for c in cpus} == {llc}
        seen.extend(cpus)
    assert sorted(seen) == list(everything)
    for node in range(topo.numa_nodes):
        cpus = resolve_cpuset(CpusetSpec.numa(node), topo)
        assert {topo.place(c).node for c in cpus} == {node}
        assert len(cpus) == topo.cpus_per_node
    with pytest.raises(KtstrError, match=f"no LLC {topo.llcs} .*has {topo.llcs}"):
        resolve_cpuset(CpusetSpec.llc(topo.llcs), topo)
    with pytest.raises(KtstrError, match="no NUMA node"):
        resolve_cpuset(CpusetSpec.numa(topo.numa_nodes), topo)


@pytest.mark.parametrize(("name", "topo"), PRESET_ITEMS)
def test_disjoint_partitions_every_preset(name: str, topo: Topology) -> None:
    n = topo.nr_cpus
    for count in (1, 2, 3, n):
        if count > n:
            continue
        parts = [resolve_cpuset(CpusetSpec.disjoint(i, count), topo) for i in range(count)]
        flat = [c for p in parts for c in p]
        assert sorted(flat) == list(range(n)), "slices must cover every CPU exactly once"
        assert len(set(flat)) == n
        assert all(p for p in parts)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(KtstrError, match=f"cannot split {n} CPUs into {n + 1}"):
        resolve_cpuset(CpusetSpec.disjoint(0, n + 1), topo)


@pytest.mark.parametrize(("name", "topo"), PRESET_ITEMS)
def test_range_and_overlap_every_preset(name: str, topo: Topology) -> None:
    n = topo.nr_cpus
    first = resolve_cpuset(CpusetSpec.range(0, 0.5), topo)
    second = resolve_cpuset(CpusetSpec.range(0.5, 1), topo)
    assert first[0] == 0 and second[-1] == n - 1
    assert len(first) == -(-n // 2) if n % 2 else len(first) == n // 2
    assert set(first) | set(second) == set(range(n))
    a = resolve_cpuset(CpusetSpec.overlap(0, 2, 0.5), topo)
    b = resolve_cpuset(CpusetSpec.overlap(1, 2, 0.5), topo)
    if n >= 2:
        assert set(a) & set(b), "overlapping neighbours share CPUs"
    assert set(a) | set(b) == set(range(n))
    with pytest.raises(KtstrError, match="empty or invalid range"):
        resolve_cpuset(CpusetSpec.range(0.5, 0.5), topo)
    with pytest.raises(KtstrError, match="empty or invalid range"):
        resolve_cpuset(CpusetSpec.range(0.7, 0.2), topo)


@pytest.mark.parametrize(("name", "topo"), PRESET_ITEMS)
def test_exact_and_parent_every_preset(name: str, topo: Topology) -> None:
    n = topo.nr_cpus
    assert resolve_cpuset(CpusetSpec.exact([n - 1, 0]), topo) == (0, n - 1)
    with pytest.raises(KtstrError, match=f"CPU {n} does not exist"):
        resolve_cpuset(CpusetSpec.exact([n]), topo)
    # Nested: a child's llc must lie inside its parent's CPUs.
    parent = tuple(topo.cpus_in_llc(0))
    assert resolve_cpuset(CpusetSpec.llc(0), topo, parent) == parent
    if topo.llcs > 1:
        with pytest.raises(KtstrError, match="outside the parent's cpuset"):
            resolve_cpuset(CpusetSpec.llc(1), topo, parent)
    half = resolve_cpuset(CpusetSpec.disjoint(1, 2), topo, parent) if len(parent) > 1 else parent
    assert set(half) <= set(parent)


def test_llc_five_on_two_llc_topology_message() -> None:
    topo = PRESETS["tiny-2llc"]
    with pytest.raises(KtstrError) as err:
        resolve_cpuset(CpusetSpec.llc(5), topo)
    assert str(err.value) == "cpuset llc:5 on 1n2l2c1t: no LLC 5 (the topology has 2; use 0-1)"


@pytest.mark.parametrize(("name", "topo"), PRESET_ITEMS)
def test_affinities_every_preset(name: str, topo: Topology) -> None:
    cpus = tuple(range(topo.nr_cpus))
    rng = random.Random(1)
    assert resolve_affinity(Affinity.inherit(), topo, cpus, 0, rng) is None
    singles = [resolve_affinity(Affinity.single(), topo, cpus, i, rng) for i in range(len(cpus))]
    assert sorted(s[0] for s in singles if s) == list(cpus)
    picked = resolve_affinity(Affinity.random(2), topo, cpus, 0, rng) if len(cpus) > 1 else None
    if picked is not None:
        assert len(picked) == 2 and set(picked) <= set(cpus)
    for i in range(topo.llcs):
        aligned = resolve_affinity(Affinity.llc_aligned(), topo, cpus, i, rng)
        assert aligned == tuple(topo.cpus_in_llc(i))
    with pytest.raises(KtstrError, match="cannot pick"):
        resolve_affinity(Affinity.random(len(cpus) + 1), topo, cpus, 0, rng)
    with pytest.raises(KtstrError, match="not in the cpuset"):
        resolve_affinity(Affinity.single(topo.nr_cpus + 3), topo, cpus, 0, rng)
