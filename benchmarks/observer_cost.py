"""What the host-side observer costs a VM test: sample time, host CPU, and the workers' work.

Runs one steady scenario (four workers in two cgroups, ``--duration`` seconds) on each
``--topology``, alternating the observer on and off, ``--runs`` times each, in fresh
VMs. Prints per topology:

- one monitor sample's host time (median and p99 over every sample of every run);
- the observer thread's own host CPU as a share of the vCPU threads' host CPU over the
  same window (what it takes from the guest where host CPUs are saturated), and its busy
  time as a share of wall time (the longest it can have held the GIL a vCPU exit needs);
- the workers' total work units, observer on over off, with a bootstrap 95 % interval and
  the Mann-Whitney p-value: how well this host can resolve the direct figure at all.

A run that fails (the emulated host loses some boots, more at 16 vCPUs) is started again,
up to ``--attempts`` times; the losses are counted. Needs usable KVM: run it inside the
sandbox.

    python -m ktstr sandbox run -- python benchmarks/observer_cost.py --runs 4 \\
        --topology 1n1l2c1t --topology 1n2l8c1t
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ratio import mean_ratio
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
    lost: list[str] = field(default_factory=list)
    """The first line of each failed attempt before this one."""
    sample_ms: list[float] = field(default_factory=list)
    cost: dict[str, float | None] = field(default_factory=dict)
    open_s: float | None = None
    interval_s: float | None = None
    note: str = ""


def one(kernel: Path, files: KernelFiles | None, topo: Topology, duration: float,
        attempts: int) -> Result:
    lost: list[str] = []
    for _ in range(attempts):
        run = run_guest(GuestRequest(kernel=kernel, scenario="test_scheduling:test_steady",
                                     test_file=TEST_FILE, topology=topo, duration_s=duration,
                                     observe=files))
        if run.ok:
            break
        lost.append(run.summary().strip().splitlines()[0][:200])
    else:
        return Result(False, lost=lost)
    workers = telemetry_of(run.result).get("workers") or []
    out = Result(True, work=sum(int(w.get("work_units", 0)) for w in workers), lost=lost)
    if run.observation is not None:
        obs = run.observation
        out.sample_ms = [round(c * 1e3, 3) for c in obs.sample_cost_s]
        out.cost = obs.cost.record()
        out.open_s, out.interval_s = obs.open_s, obs.interval_s
        out.note = "; ".join(obs.problems)
    return out


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def summarize(topo: Topology, runs: int, on: list[Result], off: list[Result]) -> dict:
    good_on = [r for r in on if r.ok]
    good_off = [r for r in off if r.ok]
    samples = [ms for r in good_on for ms in r.sample_ms]
    return {
        "vcpus": topo.nr_cpus, "runs": runs, "ok_on": len(good_on), "ok_off": len(good_off),
        "lost_boots": sum(len(r.lost) for r in on + off),
        "samples": len(samples),
        "sample_median_ms": _median(list(samples)),
        "sample_p99_ms": _quantile(samples, 0.99),
        "observer_cpu_pct_of_vcpus": _median([r.cost.get("cpu_pct_of_vcpus")
                                              for r in good_on]),
        "observer_cpu_pct_of_vcpus_max": max(
            (v for r in good_on if (v := r.cost.get("cpu_pct_of_vcpus")) is not None),
            default=None),
        "observer_busy_pct": _median([r.cost.get("busy_pct") for r in good_on]),
        "open_s": _median([r.open_s for r in good_on]),
        "interval_s": _median([r.interval_s for r in good_on]),
        "work_on_over_off": mean_ratio([r.work for r in good_on], [r.work for r in good_off]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--attempts", type=int, default=4,
                    help="starts per run before it counts as failed (lost boots)")
    ap.add_argument("--topology", action="append", default=None,
                    help="topology labels (default 1n1l2c1t and 1n2l8c1t: 2 and 16 vCPUs)")
    ap.add_argument("--kernel", default="6.12")
    args = ap.parse_args()
    if args.runs < 1 or args.attempts < 1 or not args.duration > 0:
        ap.error("--runs and --attempts must be at least 1, --duration positive")
    topologies = [Topology.parse(label) for label in args.topology or ["1n1l2c1t", "1n2l8c1t"]]
    entry = ensure_kernel(args.kernel, flavour="test")
    files = KernelFiles.of_entry(entry.path)
    summary = {}
    for topo in topologies:
        on: list[Result] = []
        off: list[Result] = []
        for i in range(args.runs):
            for observed in ((True, False) if i % 2 == 0 else (False, True)):
                r = one(entry.bzimage, files if observed else None, topo, args.duration,
                        args.attempts)
                (on if observed else off).append(r)
                shown = {k: v for k, v in asdict(r).items() if k != "sample_ms"}
                print(topo.label, "on " if observed else "off", json.dumps(shown), flush=True)
        summary[topo.label] = summarize(topo, args.runs, on, off)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
