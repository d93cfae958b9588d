"""What the run itself and the host took from the workers while a scenario ran.

Two readings bracket the scenario: the harness process's own CPU time (the guest
runtime samples, spawns and stops the workers) and each CPU's steal time from
``/proc/stat`` (time a vCPU had work but the host ran something else). Both are
explanations, not scheduler behaviour: a worker that shared its CPU with the
harness, or sat on a vCPU the host starved, is off-CPU through no choice of the
scheduler under test.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ktstr.telemetry import Overhead

_PROC_STAT = "/proc/stat"
_STEAL = 7  # field after "cpuN": user nice system idle iowait irq softirq steal ...


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """Per-CPU (steal, total) ticks from ``/proc/stat`` text."""
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        try:
            ticks = [int(v) for v in rest.split()[:8]]
        except ValueError:
            continue
        if len(ticks) > _STEAL:
            out[int(name[3:])] = (ticks[_STEAL], sum(ticks))
    return out


def steal_pct(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
              ) -> dict[int, float]:
    """Each CPU's share of its elapsed ticks that was stolen, in percent."""
    out: dict[int, float] = {}
    for cpu, (steal1, total1) in after.items():
        steal0, total0 = before.get(cpu, (steal1, total1))
        elapsed = total1 - total0
        if elapsed > 0:
            out[cpu] = round(max(0, steal1 - steal0) * 100.0 / elapsed, 1)
    return out


def _read_proc_stat() -> dict[int, tuple[int, int]]:
    try:
        with open(_PROC_STAT) as f:
            return parse_proc_stat(f.read())
    except OSError:
        return {}


@dataclass
class OverheadMeter:
    """Started with the scenario; :meth:`read` gives the overhead so far."""

    cpu_ns: int = field(default_factory=time.process_time_ns)
    wall_ns: int = field(default_factory=time.monotonic_ns)
    stat: dict[int, tuple[int, int]] = field(default_factory=_read_proc_stat)

    def read(self) -> Overhead:
        wall = max(1, time.monotonic_ns() - self.wall_ns)
        harness = time.process_time_ns() - self.cpu_ns
        return Overhead(
            harness_cpu_ms=round(harness / 1e6, 1),
            harness_cpu_pct=round(harness * 100.0 / wall, 1),
            steal_pct=steal_pct(self.stat, _read_proc_stat()),
            harness_pid=os.getpid(),
        )
