"""Performance mode: what the VMM does so a guest's timing follows its scheduler, not the host.

:class:`Performance` asks for it: each vCPU thread pinned to one host CPU (the run's
LLC-aligned reservation), guest RAM on 2 MB pages, optionally SCHED_FIFO vCPU threads,
and HLT/PAUSE exits disabled (with the KVM_HINTS_REALTIME CPUID bit, which tells the
guest its vCPUs are never preempted). Every part is best effort: :class:`PerformanceApplied`
records what the host gave and, one line each, what it could not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ktstr.errors import KtstrError

FIFO_PRIORITY = 1
"""The vCPU threads' SCHED_FIFO priority: above every normal thread, below the kernel's own."""


@dataclass(frozen=True)
class Performance:
    """What performance mode asks of one VM."""

    cpus: tuple[int, ...]
    """Host CPUs for the vCPUs: vCPU ``i`` runs on ``cpus[i]`` (one each)."""
    hugepages: bool = True
    fifo: bool = False
    disable_exits: bool = True

    def __post_init__(self) -> None:
        if not self.cpus or len(set(self.cpus)) != len(self.cpus) or min(self.cpus) < 0:
            raise KtstrError(f"performance mode needs distinct host CPUs, got {self.cpus}")

    def check_fits(self, vcpus: int) -> None:
        """Refuse, before a VM starts, more vCPUs than host CPUs to pin them to."""
        if vcpus > len(self.cpus):
            raise KtstrError(f"performance mode: {vcpus} vCPUs cannot be pinned one per host "
                             f"CPU on the {len(self.cpus)} given ({list(self.cpus)})")


@dataclass
class PerformanceApplied:
    """What performance mode got from the host (the sidecar's ``performance``)."""

    pinned: list[int | None] = field(default_factory=list)
    """Per vCPU, the host CPU its thread is pinned to (None: pinning failed)."""
    memory: str = "4k"
    """Guest RAM's backing: ``hugetlbfs`` (reserved 2 MB pages), ``thp`` (MADV_HUGEPAGE)
    or ``4k``."""
    huge_kb: int | None = None
    """Guest RAM on huge pages at the end of the run, in kB (smaps AnonHugePages, or the
    hugetlbfs mapping's size)."""
    fifo: list[bool] = field(default_factory=list)
    disabled_exits: list[str] = field(default_factory=list)
    """Exits KVM_CAP_X86_DISABLE_EXITS turned off: ``hlt``, ``pause``."""
    hints_realtime: bool = False
    missing: list[str] = field(default_factory=list)
    """What was asked and not given, one line each, with the host's reason."""

    def lack(self, line: str) -> None:
        if line not in self.missing:
            self.missing.append(line)

    def to_record(self) -> dict[str, Any]:
        return {"pinned": self.pinned, "memory": self.memory, "huge_kb": self.huge_kb,
                "fifo": self.fifo, "disabled_exits": self.disabled_exits,
                "hints_realtime": self.hints_realtime, "missing": self.missing}
