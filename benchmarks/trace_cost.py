"""What tracing costs a VM test, and what the trace holds.

Runs the steady scenario (four workers in two cgroups, ``--duration`` seconds) on a
4-CPU guest, alternating traced and untraced runs in fresh VMs, ``--runs`` times each.
Prints per traced run the trace's size, its events, the sched_switch count per CPU
and any buffer overruns; then the workers' total work units traced as a ratio of
untraced, with a bootstrap 95 % interval and the Mann-Whitney p-value. Needs usable
KVM: run it inside the sandbox.

    python -m ktstr sandbox run -- python benchmarks/trace_cost.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ratio import mean_ratio
from ktstr.kernel import ensure_kernel
from ktstr.runner import GuestRequest, run_guest
from ktstr.telemetry import telemetry_of
from ktstr.topology import Topology
from ktstr.tracing import parse_trace
from ktstr.wire.request import TraceSpec

TEST_FILE = Path(__file__).resolve().parent.parent / "tests" / "vm" / "test_scheduling.py"


def one(kernel: Path, topo: Topology, duration: float, traced: bool) -> dict:
    run = run_guest(GuestRequest(kernel=kernel, scenario="test_scheduling:test_steady",
                                 test_file=TEST_FILE, topology=topo, duration_s=duration,
                                 trace=TraceSpec() if traced else None))
    if not run.ok:
        return {"ok": False, "traced": traced, "note": run.summary()[:300]}
    workers = telemetry_of(run.result).get("workers") or []
    out: dict = {"ok": True, "traced": traced,
                 "work": sum(int(w.get("work_units", 0)) for w in workers)}
    if traced and run.trace is not None:
        timeline = parse_trace(run.trace.text.decode(errors="replace"))
        out.update(bytes=len(run.trace.text), events=timeline.events,
                   switches_per_cpu=timeline.switches_per_cpu(),
                   overruns=run.trace.info.get("overruns"), problem=run.trace.problem,
                   missing=run.trace.info.get("missing"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--topology", default="1n2l2c1t")
    ap.add_argument("--kernel", default="6.12")
    args = ap.parse_args()
    entry = ensure_kernel(args.kernel, flavour="test")
    topo = Topology.parse(args.topology)
    results = []
    for i in range(args.runs):
        for traced in ((True, False) if i % 2 == 0 else (False, True)):
            r = one(entry.bzimage, topo, args.duration, traced)
            results.append(r)
            print(json.dumps(r), flush=True)
    on = [r["work"] for r in results if r["ok"] and r["traced"]]
    off = [r["work"] for r in results if r["ok"] and not r["traced"]]
    traced = [r for r in results if r["ok"] and r["traced"]]
    print(json.dumps({
        "topology": topo.label, "vcpus": topo.nr_cpus, "runs": args.runs,
        "trace_bytes_median": statistics.median(r["bytes"] for r in traced) if traced else None,
        "events_median": statistics.median(r["events"] for r in traced) if traced else None,
        "every_cpu_switched": all(len(r["switches_per_cpu"]) == topo.nr_cpus for r in traced),
        "work_traced_over_untraced": mean_ratio(on, off),
        "untraced_spread": [min(off), max(off)] if off else None,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
