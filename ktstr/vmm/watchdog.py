"""Is the guest still doing anything? A stall detector that never touches a vCPU thread.

It watches, from the thread that waits for the VM, the vCPUs' KVM stats
(:data:`~ktstr.vmm.stats.PROGRESS_COUNTERS`: port/MMIO accesses, hypercalls,
interrupts delivered, wake-ups) plus the console's byte count. A Linux guest
that is alive delivers timer interrupts on some CPU many times a second, even
when every task is spinning; when none of these moves for ``stall_s`` seconds on
*any* vCPU, the guest is hung (spinning with interrupts off, or halted with
nothing left to wake it) and the run ends as ``hung`` instead of waiting for its
timeout. A vCPU whose thread is stuck inside ``KVM_RUN`` is still readable here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ktstr.vmm.stats import PROGRESS_COUNTERS, STATE_COUNTERS, VcpuStats

POLL_S = 0.5
"""How often the waiting thread looks (also the granularity of the timeout)."""


class ProgressWatch:
    """Tracks a progress signature; :meth:`stalled` says how long it has stood still."""

    def __init__(self, stats: Sequence[VcpuStats | None], stall_s: float,
                 extra: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = list(stats)
        self.stall_s = stall_s
        self.extra = extra
        self.clock = clock
        self.enabled = stall_s > 0 and any(s is not None for s in self.stats)
        self._last: tuple[int, ...] | None = None
        self._since = clock()

    def signature(self) -> tuple[int, ...]:
        parts: list[int] = []
        for s in self.stats:
            if s is None:
                continue
            try:
                parts.append(sum(s.read(PROGRESS_COUNTERS).values()))
            except OSError:
                parts.append(-1)
        if self.extra is not None:
            parts.append(self.extra())
        return tuple(parts)

    def stalled(self) -> float:
        """Seconds without progress so far (0 when something moved since the last call)."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        sig = self.signature()
        if sig != self._last:
            self._last, self._since = sig, now
            return 0.0
        return now - self._since

    def hung(self) -> bool:
        return self.enabled and self.stalled() >= self.stall_s

    def describe(self) -> list[str]:
        """One line per vCPU with the counters that tell what it was doing."""
        lines = []
        for i, s in enumerate(self.stats):
            if s is None:
                lines.append(f"vcpu {i}: no KVM stats")
                continue
            try:
                values = s.read((*PROGRESS_COUNTERS, *STATE_COUNTERS))
            except OSError as err:
                lines.append(f"vcpu {i}: stats unreadable: {err}")
                continue
            lines.append(f"vcpu {i}: " + " ".join(f"{k}={v}" for k, v in values.items()))
        return lines
