"""The run request: what the host asks the guest init to do, as JSON.

The host writes it to ``REQUEST_PATH`` in the per-run initramfs suffix; the
guest reads it at boot. Plain dataclasses with ``to_dict``/``from_dict`` so
both sides agree on one schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

REQUEST_PATH = "/ktstr/request.json"


@dataclass
class SchedulerSpec:
    """The scheduler as the guest starts it: the one scheduler type from host to guest
    (``ktstr.scheduler.Scheduler.guest_spec`` builds it; ``run_guest`` sends it as is)."""

    binary: str
    """Guest path of the scheduler binary (packed at its host path)."""
    args: list[str] = field(default_factory=list)
    ops_name: str | None = None
    """Expected ``/sys/kernel/sched_ext/root/ops``; None accepts any name."""
    attach_timeout_s: float = 20.0
    watchdog_timeout_ms: int | None = None
    stop_timeout_s: float = 5.0
    attach_retries: int = 0
    """Restarts after a failed attach whose output matches ``attach_transient``."""
    attach_transient: list[str] = field(default_factory=list)
    """Regular expressions of attach failures the scheduler is known to hit by chance."""
    attach_init_cpu: int | None = None
    """Where sched_ext's enable helper kthread is pinned before an attempt (its ops.init
    runs there on 6.12)."""


@dataclass
class MountSpec:
    device: str
    mountpoint: str
    fstype: str
    options: str = ""


SCHED_EVENTS = ("sched/sched_switch", "sched/sched_wakeup", "sched/sched_wakeup_new",
                "sched/sched_migrate_task", "sched/sched_process_fork",
                "sched/sched_process_exit")
"""The tracepoints a traced run enables (plus every sched_ext one the kernel has)."""


@dataclass
class TraceSpec:
    """Tracing in the guest: tracefs events, per-CPU buffer size, kprobes."""

    events: list[str] = field(default_factory=lambda: list(SCHED_EVENTS))
    buffer_kb: int = 4096
    """Per-CPU ring buffer (tracefs ``buffer_size_kb``); the oldest events go first."""
    kprobes: list[str] = field(default_factory=list)
    """Kernel functions to probe, each recording its first arguments where it can."""
    sched_ext_events: bool = True


@dataclass
class RunRequest:
    scenario: str | None = None
    """``module:function``; the function receives a :class:`~ktstr.guest.context.Context`."""
    test_file: str | None = None
    """Guest path of the file defining ``module`` (imported by path)."""
    args: dict[str, Any] = field(default_factory=dict)
    shell: str | None = None
    """A ``sh -c`` command instead of a scenario (``ktstr shell --exec``)."""
    interactive: bool = False
    """Run an interactive shell on the console instead of a scenario."""
    topology: str | None = None
    duration_s: float = 10.0
    scheduler: SchedulerSpec | None = None
    sysctls: dict[str, str] = field(default_factory=dict)
    mounts: list[MountSpec] = field(default_factory=list)
    sample_interval_s: float = 0.25
    sys_path: list[str] = field(default_factory=list)
    """Extra import path entries (packed site-packages, the test file's directory)."""
    busybox: str | None = None
    trace: TraceSpec | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRequest:
        data = dict(data)
        sched = data.pop("scheduler", None)
        mounts = data.pop("mounts", [])
        trace = data.pop("trace", None)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"run request: unknown fields {sorted(unknown)}")
        return cls(
            scheduler=SchedulerSpec(**sched) if sched else None,
            mounts=[MountSpec(**m) for m in mounts],
            trace=TraceSpec(**trace) if trace else None,
            **data,
        )

    @classmethod
    def from_json(cls, text: str) -> RunRequest:
        return cls.from_dict(json.loads(text))
