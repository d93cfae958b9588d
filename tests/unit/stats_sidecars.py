"""Real sidecars for the stats tests, written by the project's own writer.

Each run goes through what a VM test does after its guest returns: telemetry
(``WorkerStats`` as the guest serialises them) -> ``evaluate_checks`` ->
``judge`` -> ``repeated_record`` -> ``write_sidecar``. Only the guest itself
is replaced, by seeded random telemetry. Imported by test modules in this
directory (pytest puts it on sys.path).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktstr.initramfs import BaseArchive
from ktstr.kernel.cache import KernelEntry
from ktstr.kernel.pipeline import ResolvedKernel
from ktstr.results.sidecar import write_sidecar
from ktstr.runner import GuestRun
from ktstr.scheduler import BUILTIN
from ktstr.telemetry import LatencySummary, WorkerStats
from ktstr.testing import ktstr_test, spec_of
from ktstr.testing.run import Attempt, RunPlan, evaluate_checks, judge, repeated_record
from ktstr.topology import Topology
from ktstr.vmm.vm import VmResult

WALL_NS = 2_000_000_000
BASE = BaseArchive(Path("/nonexistent"), "k", 0, True, 0.0, 0, "/py", ())


@ktstr_test(topology="1n2l2c1t", duration=2.0)
def scenario_under_test(ctx: object) -> dict[str, Any]:
    """Stands for a VM test's scenario; never booted here."""
    return {}


@dataclass(frozen=True)
class Dist:
    """Per-worker telemetry distribution of one run (normal, seeded by the caller)."""

    work_rate: float = 1000.0
    """Mean work units per second."""
    work_sd: float = 0.15
    """Relative standard deviation of a run's work rate (VM noise)."""
    gap_ms: float = 60.0
    wake_us: float | None = 80.0
    """Mean p99 wake latency; None: the work never sleeps, so no wake latency."""


def plan(test: str = "tests/vm/test_x.py::test_a", topology: str | None = None,
         scheduler: str = "eevdf", key: str = "k1") -> RunPlan:
    spec = spec_of(scenario_under_test)
    assert spec is not None
    sched = BUILTIN[scheduler]
    tree = Path("/nonexistent")
    entry = KernelEntry(id="6.12", flavour="test", key=key, version="6.12.117", path=tree,
                        bzimage=tree / "bzImage", vmlinux=tree / "vmlinux",
                        config=tree / ".config", system_map=tree / "System.map")
    return RunPlan(
        test_id=test, spec=spec, test_file=Path(__file__),
        kernel=ResolvedKernel(entry.bzimage, entry), kernel_spec="6.12",
        scheduler=sched, profile=sched.profile(""), scheduler_binary=None,
        topology=Topology.parse(topology) if topology else spec.topology,
    )


def workers(rng: random.Random, dist: Dist, n: int = 4) -> list[dict[str, Any]]:
    # One factor for the whole run (VM noise moves every worker), a little per worker.
    run_factor = max(0.05, rng.gauss(1.0, dist.work_sd))
    out = []
    for i in range(n):
        rate = dist.work_rate * run_factor * rng.gauss(1.0, 0.02)
        wake = None
        if dist.wake_us is not None:
            p99 = max(1.0, rng.gauss(dist.wake_us, dist.wake_us * 0.1))
            wake = LatencySummary(count=500, p50_us=p99 / 4, p99_us=p99, max_us=p99 * 2)
        out.append(WorkerStats(
            cgroup="cg0", index=i, pid=100 + i, work="spin",
            work_units=int(rate * WALL_NS / 1e9), wall_ns=WALL_NS,
            cpu_ns=int(WALL_NS * 0.9), run_delay_ns=int(rng.uniform(1e6, 3e6)),
            migrations=rng.randint(2, 6), max_gap_ms=max(1.0, rng.gauss(dist.gap_ms, 5.0)),
            off_cpu_pct=max(0.0, rng.gauss(10.0, 1.0)), wake_latency=wake,
        ).to_dict())
    return out


def outcome(rows: list[dict[str, Any]] | None, *, ok: bool = True,
            failure_kind: str | None = None, failure_message: str = "", console: str = "",
            boot_ms: float | None = 900.0) -> GuestRun:
    """What the guest sent back: a ScenarioResult dict (``rows`` None: no result at all)."""
    result = None if rows is None else {"name": "s", "topology": "1n2l2c1t",
                                        "duration_s": 2.0, "workers": rows, "cgroups": []}
    vm = VmResult(exit_code=0 if ok else None, console=console, channel2=b"", timed_out=False,
                  panicked=False, boot_ms=boot_ms, exit_counts=[], duration_s=3.0,
                  reason="poweroff")
    return GuestRun(vm, BASE, failure=None if ok else failure_kind or "error",
                    message=failure_message, result=result,
                    timings={} if boot_ms is None else {"boot_ms": boot_ms})


def attempt(p: RunPlan, out: GuestRun, started: float = 1000.0,
            wall_s: float = 5.0) -> Attempt:
    verdict = judge(out, evaluate_checks(p, out), p.spec.expect_err)
    return Attempt(verdict, out, started, started + wall_s)


def record(p: RunPlan, rng: random.Random, dist: Dist, repeats: int) -> dict[str, Any]:
    attempts = [attempt(p, outcome(workers(rng, dist)), 1000.0 + 10 * i,
                        rng.gauss(5.0, 0.2)) for i in range(repeats)]
    return repeated_record(p, attempts)


def write_run(root: Path, run: str, records: list[dict[str, Any]]) -> Path:
    for rec in records:
        write_sidecar(rec, run=run, root=root)
    return root / run
