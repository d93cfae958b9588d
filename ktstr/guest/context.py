"""The object a scenario function receives inside the guest."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktstr.cpulist import parse_cpu_list
from ktstr.guest.channel import Channel
from ktstr.guest.sched import SchedulerControl, scx_state
from ktstr.topology import Topology


def online_cpus() -> list[int]:
    """CPUs listed in /sys/devices/system/cpu/online ("0-3,6")."""
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    return parse_cpu_list(text)


@dataclass
class Context:
    """What a scenario sees: the machine, its budget, where to work, how to report.

    ``report(dict)`` sends a message to the host immediately (it arrives in
    ``GuestRun.reports`` in order); the scenario's return value (a dict, or None)
    becomes ``GuestRun.result``.
    """

    channel: Channel
    topology: Topology | None
    cpus: list[int]
    duration_s: float
    cgroup_root: Path
    scratch: Path
    disks: dict[str, Path] = field(default_factory=dict)
    """Mountpoint by device path, for the disks the host asked to mount."""
    args: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    """The attached sched_ext scheduler's ops name, or None (kernel scheduler)."""
    scheduler_control: SchedulerControl | None = None
    """What the scenario's scheduler lifecycle ops (DetachScheduler, ...) drive."""

    def report(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise TypeError(f"report() takes a dict, not {type(data).__name__}")
        json.dumps(data)  # fail here, in the scenario, if it is not JSON-able
        self.channel.send({"type": "report", "data": data})

    def log(self, text: str) -> None:
        self.channel.send({"type": "log", "text": str(text)})

    def sched_state(self) -> dict[str, Any]:
        return scx_state()

    def cgroup(self, name: str, cpus: list[int] | None = None) -> Path:
        """Create (or reuse) a child cgroup under ``cgroup_root``; optionally set its cpuset."""
        path = self.cgroup_root / name
        path.mkdir(parents=True, exist_ok=True)
        if cpus is not None:
            (path / "cpuset.cpus").write_text(",".join(map(str, cpus)))
        return path
