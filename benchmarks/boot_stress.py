"""Boot the same kernel many times and count how each boot ended.

Every boot runs the ``ktstr boot`` report init (busybox, prints the topology it
sees, powers off). A boot *completes* when the guest powers off with exit code 0
and its report matches the declared topology. Everything else is counted by how
it ended: ``hung`` (the VMM's stall detector: no exits, no console output and no
guest clock progress), ``timeout``, ``reboot`` (including triple faults, counted
apart), ``crash``/``panic``, ``error``, ``mismatch`` (booted, wrong topology).
For every failed boot the script prints the VM's detail (vCPU registers, last
exit sites) and the console tail, so a rare hang can be read from one run.

Needs a usable KVM; where there is none, run it inside the sandbox::

    python -m ktstr sandbox run -- python3 benchmarks/boot_stress.py \\
        --kernel BZIMAGE --runs 100 --topology 1n1l2c1t --topology 1n3l3c1t
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.topology import Topology
from ktstr.vmm.cli import build_initramfs, parse_report, topology_mismatches, topology_seen
from ktstr.vmm.vm import Vm, VmResult

TRIPLE_FAULT = "triple fault"


def classify(result: VmResult, topology: Topology) -> str:
    """One word for how a boot ended (see the module docstring)."""
    if result.ok:
        report = parse_report(result.console)
        if report is None:
            return "no_report"
        if topology_mismatches(topology_seen(report), topology):
            return "mismatch"
        return "completed"
    if result.reason == "reboot" and TRIPLE_FAULT in result.detail:
        return "triple_fault"
    if result.panicked:
        return "panic"
    return result.reason or "error"


def own_tasks() -> str:
    """This process's threads by state (R running, D uninterruptible, S sleeping): a VM that
    leaves a thread behind shows up here, and as a load average that keeps growing."""
    states: Counter[str] = Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        states[stat.rsplit(")", 1)[1].split()[0]] += 1
    return " ".join(f"{k}{v}" for k, v in sorted(states.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--topology", action="append", default=[],
                        help="label or preset; repeat for several (default 1n1l2c1t)")
    parser.add_argument("--runs", type=int, default=20, help="boots per topology and mode")
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--mode", choices=("quiet", "verbose", "both"), default="both")
    parser.add_argument("--json", type=Path, help="write every boot's outcome here")
    args = parser.parse_args()
    topologies = [Topology.parse(t) for t in (args.topology or ["1n1l2c1t"])]
    modes = [True, False] if args.mode == "both" else [args.mode == "quiet"]

    outcomes: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="ktstr-stress-") as tmp:
        initrd = build_initramfs(Path(tmp) / "init.cpio")
        for topo in topologies:
            for quiet in modes:
                for i in range(args.runs):
                    t0 = time.monotonic()
                    result = Vm(args.kernel, initrd, topo, memory_mb=args.memory_mb,
                                timeout=args.timeout, quiet=quiet).run()
                    wall = time.monotonic() - t0
                    kind = classify(result, topo)
                    mode = "quiet" if quiet else "verbose"
                    outcomes.append({"topology": topo.label, "mode": mode, "run": i,
                                     "outcome": kind, "wall_s": round(wall, 2),
                                     "boot_ms": result.boot_ms, "reason": result.reason,
                                     "detail": result.detail, "error": result.error})
                    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
                    print(f"{topo.label} {mode} #{i}: {kind} in {wall:.1f} s "
                          f"(boot_ms {result.boot_ms or 0:.0f}, load {load}, "
                          f"threads {own_tasks()})",
                          flush=True)
                    if kind != "completed":
                        print(f"  reason={result.reason} error={result.error}")
                        print("  detail:\n    " + result.detail.replace("\n", "\n    "))
                        print("  console tail:\n    "
                              + result.console_tail[-1500:].replace("\n", "\n    "), flush=True)

    print("\nsummary")
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for o in outcomes:
        groups.setdefault((str(o["topology"]), str(o["mode"])), []).append(o)
    for (label, mode), rows in groups.items():
        counts = Counter(str(r["outcome"]) for r in rows)
        walls = [float(r["wall_s"]) for r in rows if r["outcome"] == "completed"]  # type: ignore[arg-type]
        med = f", median {statistics.median(walls):.1f} s" if walls else ""
        print(f"  {label} {mode}: {len(rows)} boots: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + med)
    total = Counter(str(o["outcome"]) for o in outcomes)
    print("  all: " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    if args.json:
        args.json.write_text(json.dumps(outcomes, indent=1))
    return 0 if total.get("completed", 0) == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
