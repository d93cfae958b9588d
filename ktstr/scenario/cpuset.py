"""Resolve cpuset specs and affinities against a topology.

Pure functions: topology CPU numbers in, topology CPU numbers out. The
runner maps them to real CPU ids (identity in a guest; the host's usable
CPUs in host mode). An impossible request raises KtstrError naming the
spec, the topology and what would fit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from ktstr.cpulist import format_cpu_list
from ktstr.errors import KtstrError
from ktstr.scenario.model import (
    Affinity,
    AffinityKind,
    CpusetKind,
    CpusetSpec,
)
from ktstr.topology import Topology

_EPS = 1e-9


def resolve_cpuset(
    spec: CpusetSpec, topology: Topology, parent: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The CPUs ``spec`` selects inside ``parent`` (default: every topology CPU)."""
    base = tuple(sorted(parent)) if parent is not None else tuple(range(topology.nr_cpus))
    where = f"cpuset {spec.describe()} on {topology.label}"
    if not base:
        raise KtstrError(f"{where}: the parent cgroup has no CPUs")
    n = len(base)
    kind = spec.kind
    if kind is CpusetKind.ALL:
        return base
    if kind in (CpusetKind.LLC, CpusetKind.NUMA):
        count = topology.llcs if kind is CpusetKind.LLC else topology.numa_nodes
        what = "LLC" if kind is CpusetKind.LLC else "NUMA node"
        if not 0 <= spec.index < count:
            raise KtstrError(
                f"{where}: no {what} {spec.index} (the topology has {count}; use 0-{count - 1})"
            )
        cpus = (
            topology.cpus_in_llc(spec.index)
            if kind is CpusetKind.LLC
            else topology.cpus_in_node(spec.index)
        )
        return _inside(where, cpus, base)
    if kind is CpusetKind.RANGE:
        if not 0.0 <= spec.start < spec.end <= 1.0:
            raise KtstrError(
                f"{where}: empty or invalid range; need 0 <= start < end <= 1 "
                f"(fractions of the parent's {n} CPUs)"
            )
        lo = math.floor(spec.start * n + _EPS)
        hi = min(n, math.ceil(spec.end * n - _EPS))
        if hi <= lo:
            raise KtstrError(f"{where}: the range selects no CPU of the parent's {n}")
        return base[lo:hi]
    if kind in (CpusetKind.DISJOINT, CpusetKind.OVERLAP):
        if spec.count < 1 or not 0 <= spec.index < spec.count:
            raise KtstrError(f"{where}: need 0 <= index < count")
        if kind is CpusetKind.DISJOINT:
            if spec.count > n:
                raise KtstrError(
                    f"{where}: cannot split {n} CPUs into {spec.count} disjoint sets "
                    f"(at most {n})"
                )
            return base[spec.index * n // spec.count : (spec.index + 1) * n // spec.count]
        if spec.overlap_frac < 0:
            raise KtstrError(f"{where}: overlap fraction must be >= 0")
        width = n / spec.count
        lo = max(0, math.floor(spec.index * width - spec.overlap_frac * width + _EPS))
        hi = min(n, math.ceil((spec.index + 1) * width + spec.overlap_frac * width - _EPS))
        if hi <= lo:
            raise KtstrError(f"{where}: selects no CPU")
        return base[lo:hi]
    # EXACT
    if not spec.cpus:
        raise KtstrError(f"{where}: exact cpuset needs at least one CPU")
    bad = [c for c in spec.cpus if not 0 <= c < topology.nr_cpus]
    if bad:
        raise KtstrError(
            f"{where}: CPU {bad[0]} does not exist (the topology has CPUs "
            f"0-{topology.nr_cpus - 1})"
        )
    return _inside(where, spec.cpus, base)


def _inside(where: str, cpus: Sequence[int], base: Sequence[int]) -> tuple[int, ...]:
    allowed = set(base)
    outside = [c for c in cpus if c not in allowed]
    if outside:
        raise KtstrError(
            f"{where}: CPUs {format_cpu_list(outside)} are outside the parent's cpuset "
            f"{format_cpu_list(base)}"
        )
    return tuple(sorted(cpus))


def resolve_affinity(
    affinity: Affinity,
    topology: Topology,
    cpuset: Sequence[int],
    worker_index: int,
    rng: random.Random,
) -> tuple[int, ...] | None:
    """The affinity mask of worker ``worker_index``; None = inherit the cpuset."""
    kind = affinity.kind
    cpus = tuple(sorted(cpuset))
    where = f"affinity {affinity.describe()} in cpuset {format_cpu_list(cpus)}"
    if kind is AffinityKind.INHERIT:
        return None
    if not cpus:
        raise KtstrError(f"{where}: the cgroup has no CPUs")
    if kind is AffinityKind.RANDOM:
        if affinity.count > len(cpus):
            raise KtstrError(
                f"{where}: cannot pick {affinity.count} CPUs from {len(cpus)} "
                f"(use at most {len(cpus)})"
            )
        return tuple(sorted(rng.sample(cpus, affinity.count)))
    if kind is AffinityKind.LLC_ALIGNED:
        llcs = sorted({topology.place(c).llc for c in cpus})
        llc = llcs[worker_index % len(llcs)]
        return tuple(c for c in cpus if topology.place(c).llc == llc)
    if kind is AffinityKind.SINGLE:
        if affinity.cpu is None:
            return (cpus[worker_index % len(cpus)],)
        if affinity.cpu not in cpus:
            raise KtstrError(f"{where}: CPU {affinity.cpu} is not in the cpuset")
        return (affinity.cpu,)
    outside = [c for c in affinity.cpus if c not in cpus]
    if not affinity.cpus or outside:
        raise KtstrError(
            f"{where}: exact affinity must be a non-empty subset of the cpuset"
            + (f" (CPUs {format_cpu_list(outside)} are outside)" if outside else "")
        )
    return affinity.cpus
