"""What the host-side observer costs a VM test: sample time and the workers' work.

Runs one steady scenario (four workers in two cgroups, ``--duration`` seconds) on each
``--topology``, alternating the observer on and off, ``--runs`` times each, in fresh
VMs. Prints per topology the median host time of one monitor sample (and p99), the time
drgn took to open the guest, and the workers' total work units with the observer on as
a ratio of off (same topology, same run). Needs usable KVM: run it inside the sandbox.

    python -m ktstr sandbox run -- python benchmarks/observer_cost.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.kernel import ensure_kernel
from ktstr.observe.program import KernelFiles
from ktstr.runner import GuestRequest, run_guest
from ktstr.telemetry import telemetry_of
from ktstr.topology import Topology

TEST_FILE = Path(__file__).resolve().parent.parent / "tests" / "vm" / "test_scheduling.py"


@dataclass
class Result:
    ok: bool
    work: int = 0
    median_ms: float | None = None
    p99_ms: float | None = None
    open_s: float | None = None
    interval_s: float | None = None
    note: str = ""


def one(kernel: Path, files: KernelFiles | None, topo: Topology, duration: float) -> Result:
    run = run_guest(GuestRequest(kernel=kernel, scenario="test_scheduling:test_steady",
                                 test_file=TEST_FILE, topology=topo, duration_s=duration,
                                 observe=files))
    if not run.ok:
        return Result(False, note=run.summary()[:300])
    workers = telemetry_of(run.result).get("workers") or []
    out = Result(True, work=sum(int(w.get("work_units", 0)) for w in workers))
    if run.observation is not None:
        cost = run.observation.cost_summary()
        out.median_ms, out.p99_ms = cost.get("median_ms"), cost.get("p99_ms")
        out.open_s = run.observation.open_s
        out.interval_s = run.observation.interval_s
        out.note = "; ".join(run.observation.problems)
    return out


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--topology", action="append", default=None,
                    help="topology labels (default 1n2l2c1t and 1n2l4c1t)")
    ap.add_argument("--kernel", default="6.12")
    args = ap.parse_args()
    entry = ensure_kernel(args.kernel, flavour="test")
    files = KernelFiles.of_entry(entry.path)
    summary = {}
    for label in args.topology or ["1n2l2c1t", "1n2l4c1t"]:
        topo = Topology.parse(label)
        on: list[Result] = []
        off: list[Result] = []
        for i in range(args.runs):
            for observed in ((True, False) if i % 2 == 0 else (False, True)):
                r = one(entry.bzimage, files if observed else None, topo, args.duration)
                (on if observed else off).append(r)
                print(label, "on " if observed else "off", json.dumps(asdict(r)), flush=True)
        good_on = [r for r in on if r.ok]
        good_off = [r for r in off if r.ok]
        work_on = statistics.mean(r.work for r in good_on) if good_on else 0.0
        work_off = statistics.mean(r.work for r in good_off) if good_off else 0.0
        summary[label] = {
            "vcpus": topo.nr_cpus, "runs": args.runs, "ok_on": len(good_on),
            "ok_off": len(good_off),
            "sample_median_ms": _median([r.median_ms for r in good_on]),
            "sample_p99_ms": max((r.p99_ms for r in good_on if r.p99_ms is not None),
                                 default=None),
            "open_s": _median([r.open_s for r in good_on]),
            "interval_s": _median([r.interval_s for r in good_on]),
            "work_on_over_off": round(work_on / work_off, 4) if work_off else None,
        }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
