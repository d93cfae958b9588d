"""Boot the same kernel many times and count how each boot ended.

Every boot runs the ``ktstr boot`` report init (busybox, prints the topology it
sees, powers off). A boot *completes* when the guest powers off with exit code 0
and its report matches the declared topology. Everything else is counted by how
it ended: ``hung`` (the VMM's stall detector: no exits, no console output and no
guest clock progress), ``timeout``, ``reboot`` (including triple faults, counted
apart), ``crash``/``panic``, ``error``, ``mismatch`` (booted, wrong topology).
For every failed boot the script prints the VM's detail (vCPU registers, last
exit sites) and the console tail, so a rare hang can be read from one run.

``--vmm qemu`` boots the same kernel and init under QEMU's microvm (KVM, ``-cpu host``,
the same command line) instead, and ``--vmm both`` alternates the two boot by boot, so a
failure rate can be told apart from the host's: QEMU boots count as completed when the
report is complete, ``reboot`` when QEMU exits without it, ``timeout`` otherwise.

Needs a usable KVM; where there is none, run it inside the sandbox::

    python -m ktstr sandbox run -- python3 benchmarks/boot_stress.py \\
        --kernel BZIMAGE --runs 100 --topology 1n1l2c1t --topology 1n3l3c1t
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.boot import build_initramfs, parse_report, topology_mismatches, topology_seen
from ktstr.topology import Topology
from ktstr.vmm.vcpu import TRIPLE_FAULT
from ktstr.vmm.vm import DEFAULT_CMDLINE, EXIT_FRUGAL_CMDLINE, QUIET_CMDLINE, Vm, VmResult


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


def qemu_boot(kernel: Path, initrd: Path, topology: Topology, memory_mb: int,
              timeout: float, quiet: bool, extra: str = "") -> tuple[str, str, float]:
    """One QEMU microvm boot of the same image: (outcome, console tail, wall seconds)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    t = topology
    cmdline = (f"{DEFAULT_CMDLINE} {EXIT_FRUGAL_CMDLINE}" + (f" {QUIET_CMDLINE}" if quiet else "")
               + f" {extra}")
    smp = (f"{t.nr_cpus},sockets={t.numa_nodes},cores={t.llcs * t.cores_per_llc // t.numa_nodes}"
           f",threads={t.threads_per_core}")
    argv = [qemu, "-M", "microvm,accel=kvm", "-cpu", "host", "-smp", smp,
            "-m", str(memory_mb), "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", cmdline, "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        return "timeout", out.decode("utf-8", "replace")[-1500:], time.monotonic() - t0
    console = proc.stdout.decode("utf-8", "replace")
    kind = "completed" if parse_report(console) is not None and proc.returncode == 0 else "reboot"
    return kind, (console + proc.stderr.decode("utf-8", "replace"))[-1500:], time.monotonic() - t0


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


def boot_once(args: argparse.Namespace, vmm: str, initrd: Path, topo: Topology, quiet: bool,
              i: int) -> dict[str, object]:
    """Boot once with ``vmm``, print one line (and the evidence of a failure), return it."""
    mode = "quiet" if quiet else "verbose"
    t0 = time.monotonic()
    row: dict[str, object] = {"vmm": vmm, "topology": topo.label, "mode": mode, "run": i}
    if vmm == "qemu":
        kind, tail, wall = qemu_boot(args.kernel, initrd, topo, args.memory_mb, args.timeout,
                                     quiet, args.cmdline)
        row.update(outcome=kind, wall_s=round(wall, 2), boot_ms=None)
        detail, error = "", None
    else:
        vm = Vm(args.kernel, initrd, topo, memory_mb=args.memory_mb,
                timeout=args.timeout, quiet=quiet, prefault=args.prefault,
                cmdline_extra=args.cmdline)
        result = vm.run()
        row["prefault_s"] = vm.prefault_s
        wall = time.monotonic() - t0
        kind = classify(result, topo)
        tail, detail, error = result.console_tail[-1500:], result.detail, result.error
        row.update(outcome=kind, wall_s=round(wall, 2), boot_ms=result.boot_ms,
                   reason=result.reason, detail=detail, error=error)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    boot_ms = row["boot_ms"] or 0
    print(f"{vmm} {topo.label} {mode} #{i}: {kind} in {wall:.1f} s "
          f"(boot_ms {boot_ms:.0f}, prefault {row.get('prefault_s')}, load {load}, "
          f"threads {own_tasks()})", flush=True)
    if kind != "completed":
        print(f"  reason={row.get('reason')} error={error}")
        print("  detail:\n    " + detail.replace("\n", "\n    "))
        print("  console tail:\n    " + tail.replace("\n", "\n    "), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--topology", action="append", default=[],
                        help="label or preset; repeat for several (default 1n1l2c1t)")
    parser.add_argument("--runs", type=int, default=20, help="boots per topology and mode")
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--mode", choices=("quiet", "verbose", "both"), default="both")
    parser.add_argument("--vmm", choices=("ktstr", "qemu", "both"), default="ktstr",
                        help="whose VMM boots (both: alternate, boot by boot)")
    parser.add_argument("--prefault", action=argparse.BooleanOptionalAction, default=False,
                        help="map all guest RAM in KVM's stage-2 tables before the boot")
    parser.add_argument("--cmdline", default="", help="more guest kernel options")
    parser.add_argument("--json", type=Path, help="write every boot's outcome here")
    args = parser.parse_args()
    topologies = [Topology.parse(t) for t in (args.topology or ["1n1l2c1t"])]
    modes = [True, False] if args.mode == "both" else [args.mode == "quiet"]

    vmms = ["ktstr", "qemu"] if args.vmm == "both" else [args.vmm]
    outcomes: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="ktstr-stress-") as tmp:
        initrd = build_initramfs(Path(tmp) / "init.cpio")
        for topo in topologies:
            for quiet in modes:
                for i in range(args.runs):
                    for vmm in vmms:
                        outcomes.append(boot_once(args, vmm, initrd, topo, quiet, i))

    print("\nsummary")
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for o in outcomes:
        groups.setdefault((f'{o["vmm"]} {o["topology"]}', str(o["mode"])), []).append(o)
    for (label, mode), rows in groups.items():
        counts = Counter(str(r["outcome"]) for r in rows)
        walls = [float(r["wall_s"]) for r in rows if r["outcome"] == "completed"]  # type: ignore[arg-type]
        med = f", median {statistics.median(walls):.1f} s" if walls else ""
        print(f"  {label} {mode}: {len(rows)} boots: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + med)
    for vmm in vmms:
        total = Counter(str(o["outcome"]) for o in outcomes if o["vmm"] == vmm)
        print(f"  all {vmm}: " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    total = Counter(str(o["outcome"]) for o in outcomes if o["vmm"] == "ktstr")
    if args.json:
        args.json.write_text(json.dumps(outcomes, indent=1))
    ours = [o for o in outcomes if o["vmm"] == "ktstr"]
    return 0 if total.get("completed", 0) == len(ours) else 1


if __name__ == "__main__":
    sys.exit(main())
