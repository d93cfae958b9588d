"""Performance mode against the default: the steady scenario's work-unit spread over runs.

Runs the steady scenario (``tests/vm/test_scheduling.py::test_steady``) ``--runs`` times
with performance mode and ``--runs`` times without, alternating, each in a fresh VM on
the same ``--topology``, with the host CPUs reserved as a VM test would. Prints, per
mode, the workers' total work units (mean, stddev, coefficient of variation), the mean
vCPU dilation, and what performance mode applied (pinning, pages, exits) and could not.
Needs usable KVM: run it inside the sandbox.

    python -m ktstr sandbox run -- python benchmarks/perf_mode.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.kernel import ensure_kernel
from ktstr.reserve import reserve
from ktstr.runner import GuestRequest, run_guest
from ktstr.telemetry import telemetry_of
from ktstr.topology import Topology

TEST_FILE = Path(__file__).resolve().parent.parent / "tests" / "vm" / "test_scheduling.py"


@dataclass
class Run:
    ok: bool
    work: int = 0
    dilation: float | None = None
    performance: dict[str, Any] | None = None
    note: str = ""


@dataclass
class Mode:
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        work = [r.work for r in self.runs if r.ok]
        dil = [r.dilation for r in self.runs if r.ok and r.dilation is not None]
        mean = statistics.fmean(work) if work else 0.0
        sd = statistics.stdev(work) if len(work) > 1 else 0.0
        return {"ok": len(work), "failed": len(self.runs) - len(work), "work": work,
                "mean": round(mean, 1), "stddev": round(sd, 1),
                "cv": round(sd / mean, 4) if mean else None,
                "dilation_mean": round(statistics.fmean(dil), 4) if dil else None,
                "applied": next((r.performance for r in self.runs if r.performance), None),
                "notes": [r.note for r in self.runs if r.note]}


def one(kernel: Path, topo: Topology, duration: float, performance: bool) -> Run:
    with reserve(topo.nr_cpus, test="benchmarks/perf_mode", llc_aligned=performance) as held:
        run = run_guest(GuestRequest(
            kernel=kernel, scenario="test_scheduling:test_steady", test_file=TEST_FILE,
            topology=topo, duration_s=duration,
            pin_cpus=held.cpus[:topo.nr_cpus] if performance else ()))
    if not run.ok:
        return Run(False, note=run.summary()[:300])
    workers = telemetry_of(run.result).get("workers") or []
    return Run(True, work=sum(int(w.get("work_units", 0)) for w in workers),
               dilation=run.vm.dilation, performance=run.vm.performance)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--topology", default="1n1l2c1t")
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    entry = ensure_kernel(args.kernel, flavour="test")
    topo = Topology.parse(args.topology)
    modes = {"default": Mode(), "performance": Mode()}
    for i in range(args.runs):
        for name, mode in modes.items():
            r = one(entry.bzimage, topo, args.duration, name == "performance")
            mode.runs.append(r)
            print(f"run {i + 1} {name}: {asdict(r)}", file=sys.stderr, flush=True)
    out = {name: mode.summary() for name, mode in modes.items()}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for name, s in out.items():
            print(f"{name:<12} work {s['mean']} ±{s['stddev']} (cv {s['cv']}, n={s['ok']}, "
                  f"failed {s['failed']}), vCPU dilation {s['dilation_mean']}")
        print(f"applied: {out['performance']['applied']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
