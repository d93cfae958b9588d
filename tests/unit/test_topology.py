"""Topology presets, the guest memory default, the boot budget and the KVM limit check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktstr.errors import KtstrError
from ktstr.topology import (
    EXTRA_NAMES,
    MAX_VCPUS,
    PRESET_TABLE,
    PRESETS,
    Topology,
    boot_budget_s,
    run_timeout_s,
)

REPO = Path(__file__).resolve().parents[2]

REFERENCE_LABELS = {
    "1n5l3c1t", "1n7l2c1t", "1n4l16c2t", "1n15l8c2t", "1n14l9c2t", "2n2l8c2t", "4n8l4c1t",
    "4n12l8c2t", "1n8l8c2t",
}  # fmt: skip
NAMES_IN_USE = {
    "min-2cpu", "tiny-1llc", "tiny-2llc", "smt-1llc", "smt-2llc", "odd-3llc", "odd-5llc",
    "medium-4llc", "medium-4llc-smt", "wide-1llc", "numa2-2llc", "numa2-4llc", "numa2-8llc",
    "numa4-4llc", "numa4-8llc", "large-8llc", "large-numa2", "max-64cpu",
}  # fmt: skip
"""Every name the tree used before the preset set grew: tests and docs refer to them."""


def test_preset_set_shape() -> None:
    assert len(PRESET_TABLE) == 25 == len(PRESETS)
    cpus = [p.topology.nr_cpus for p in PRESET_TABLE]
    assert min(cpus) == 4 and max(cpus) == 252 and cpus == sorted(cpus)
    assert max(p.topology.numa_nodes for p in PRESET_TABLE) == 4
    labels = [p.topology.label for p in PRESET_TABLE]
    assert len(set(labels)) == len(labels), "two presets with the same shape"
    assert set(labels) >= REFERENCE_LABELS
    assert PRESETS["large-128cpu"].nr_cpus == 128
    for p in PRESET_TABLE:
        assert p.description and "\n" not in p.description and len(p.description) < 90


def test_existing_names_still_parse() -> None:
    for name in NAMES_IN_USE:
        topo = Topology.parse(name)
        assert topo == PRESETS.get(name, EXTRA_NAMES.get(name))
    assert Topology.parse("min-2cpu").nr_cpus == 2
    assert "min-2cpu" not in PRESETS  # below the gauntlet's 4-vCPU floor


def test_names_in_docs_and_tests_exist() -> None:
    """A preset name quoted anywhere in the README, docs or tests must resolve."""
    pattern = re.compile(r"[\"'`]((?:tiny|smt|odd|medium|wide|numa\d|large|huge|max|min)-[\w-]+)")
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "tests").rglob("*.py")]
    names = {m for f in files if f.is_file() for m in pattern.findall(f.read_text())}
    assert names
    unknown = sorted(n for n in names if n not in PRESETS and n not in EXTRA_NAMES)
    assert not unknown


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_apic_ids_unique_and_within_kvm(name: str) -> None:
    topo = PRESETS[name]
    ids = [p.apic_id for p in topo.places]
    assert len(set(ids)) == topo.nr_cpus and ids[0] == 0
    assert max(ids) == topo.max_apic_id
    # KVM_MAX_VCPU_IDS is 1023 on the oldest kernels that report it, 4 x 1024 on newer.
    assert topo.kvm_limits_error(max_vcpus=288, max_vcpu_id=1023) is None
    assert topo.nr_cpus <= MAX_VCPUS


def test_largest_preset_apic_ids() -> None:
    topo = PRESETS["max-cpu"]  # 1n14l9c2t: 9 cores need 4 bits, SMT 1 bit: LLC stride 32
    assert topo.llc_shift == 5 and topo.max_apic_id == 13 << 5 | 8 << 1 | 1 == 433
    assert sum(p.apic_id > 254 for p in topo.places) == 6 * 18  # LLCs 8..13 (base 256+)
    assert PRESETS["huge-15llc"].max_apic_id == 239  # 240 vCPUs still fit xAPIC


def test_kvm_limits() -> None:
    topo = PRESETS["max-cpu"]
    err = topo.kvm_limits_error(max_vcpus=240, max_vcpu_id=4096)
    assert err and "KVM_CAP_MAX_VCPUS" in err and "252" in err
    err = topo.kvm_limits_error(max_vcpus=288, max_vcpu_id=288)
    assert err and "KVM_CAP_MAX_VCPU_ID" in err and "433" in err
    # No KVM_CAP_MAX_VCPU_ID: ids are limited by the vCPU count.
    assert topo.kvm_limits_error(max_vcpus=288, max_vcpu_id=0) is not None
    assert topo.kvm_limits_error(max_vcpus=1024, max_vcpu_id=0) is None
    assert PRESETS["huge-15llc"].kvm_limits_error(max_vcpus=240, max_vcpu_id=240) is None


def test_default_memory() -> None:
    assert Topology.parse("tiny-1llc").default_memory_mb(None) == 256
    assert Topology.parse("tiny-1llc").default_memory_mb(1024) == 1024
    assert PRESETS["large-8llc"].default_memory_mb(None) == 64 * 64
    assert PRESETS["large-8llc"].default_memory_mb(512) == 4096
    assert PRESETS["large-8llc"].default_memory_mb(8192) == 8192
    assert PRESETS["max-cpu"].default_memory_mb(None) == 252 * 64 == 16128
    # Rounded to a multiple of the node count, so node_memory_mb accepts it.
    three = Topology(3, 3, 1, 1)
    assert three.default_memory_mb(None) == 258
    three.node_memory_mb(three.default_memory_mb(None))


@given(
    nodes=st.integers(1, 4),
    llcs=st.integers(1, 4),
    cores=st.integers(1, 8),
    threads=st.integers(1, 2),
    requested=st.one_of(st.none(), st.integers(1, 1 << 20)),
)
def test_default_memory_is_the_max(
    nodes: int, llcs: int, cores: int, threads: int, requested: int | None
) -> None:
    topo = Topology(nodes, nodes * llcs, cores, threads)
    got = topo.default_memory_mb(requested)
    floor = max(64 * topo.nr_cpus, 256, requested or 0)
    assert floor <= got < floor + nodes and got % nodes == 0
    topo.node_memory_mb(got)


def test_boot_budget_scales_with_vcpus() -> None:
    budgets = [boot_budget_s(p.topology) for p in PRESET_TABLE]
    assert budgets == sorted(budgets)
    assert boot_budget_s(PRESETS["tiny-1llc"]) == 60.0  # small guests keep the old 60 s
    assert boot_budget_s(PRESETS["wide-1llc"]) == 60.0
    assert boot_budget_s(PRESETS["large-8llc"]) == 84.0
    assert boot_budget_s(PRESETS["large-128cpu"]) == 116.0
    assert boot_budget_s(PRESETS["max-cpu"]) == 178.0
    assert run_timeout_s(PRESETS["max-cpu"], 10.0) == 198.0
    assert run_timeout_s(PRESETS["tiny-1llc"], 5.0) == 70.0


def test_too_many_vcpus() -> None:
    with pytest.raises(KtstrError, match="exceeds the maximum"):
        Topology(1, 17, 16, 1)
