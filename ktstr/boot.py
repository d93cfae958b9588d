"""`ktstr boot`: boot a kernel on a declared topology and report what the guest saw.

The built-in init is a busybox shell script: it mounts proc/sys/dev, marks
boot completion on the boot port, prints a marker line on the console, writes a
probe line to COM2 (the serial IRQ path), reports the CPU topology and clock
devices it sees as JSON lines through /dev/kmsg and powers off.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktstr import initramfs, reap
from ktstr.cliargs import add_vm_arguments, console_stream, start_vm_command
from ktstr.cpulist import parse_cpu_list
from ktstr.errors import KtstrError
from ktstr.topology import Topology
from ktstr.vmm import layout

INIT_MARKER = "KTSTR-INIT-REACHED"
"""The built-in init prints this on the console first thing (benchmarks time it)."""
REPORT_TAG = "KTSTR-REPORT"
COM2_PROBE = "KTSTR-COM2"
"""The init writes this line to /dev/ttyS1: it arrives only if the UART's IRQ works."""
EXIT_SITES_SHOWN = 16
"""How many of the most frequent exit sites (port/address) the report lists."""

INIT_SCRIPT = initramfs.BUSYBOX_INIT_PREAMBLE + r"""
printf '\%(magic)03o' | dd of=/dev/port bs=1 seek=%(boot_port)d count=1 2>/dev/null
# Report lines go through /dev/kmsg: printk reaches the console by polling, so they do
# not depend on serial interrupts. <2> keeps them visible under `quiet`.
k() { echo "<2>$*" > /dev/kmsg; }
k %(marker)s
echo %(com2)s > /dev/ttyS1 2>/dev/null
r() { tr -d '\n' < "$1" 2>/dev/null; }
j="{\"kernel\":\"$(uname -r)\",\"online\":\"$(r /sys/devices/system/cpu/online)\""
j="$j,\"sched_ext\":\"$([ -d /sys/kernel/sched_ext ] && echo yes || echo no)\""
j="$j,\"clockevent\":\"$(r /sys/devices/system/clockevents/clockevent0/current_device)\""
j="$j,\"clocksource\":\"$(r /sys/devices/system/clocksource/clocksource0/current_clocksource)\"}"
k "%(report)s $j"
for d in /sys/devices/system/cpu/cpu[0-9]*; do
  [ -d "$d/topology" ] || continue
  llc=; lvl=0
  for c in "$d"/cache/index*; do
    [ -f "$c/level" ] || continue
    l=$(r "$c/level")
    if [ "$l" -ge "$lvl" ]; then lvl=$l; llc=$(r "$c/shared_cpu_list"); fi
  done
  n=${d##*/cpu}
  apic=$(grep -A20 "^processor.*: $n\$" /proc/cpuinfo | grep -m1 '^apicid' | tr -dc 0-9)
  j="{\"cpu\":\"$n\",\"package\":\"$(r $d/topology/physical_package_id)\""
  j="$j,\"die\":\"$(r $d/topology/die_id)\",\"core\":\"$(r $d/topology/core_id)\""
  j="$j,\"siblings\":\"$(r $d/topology/thread_siblings_list)\""
  j="$j,\"llc\":\"$llc\",\"llc_level\":\"$lvl\",\"apic\":\"$apic\"}"
  k "%(report)s-CPU $j"
done
for d in /sys/devices/system/node/node[0-9]*; do
  [ -d "$d" ] || continue
  k "%(report)s-NODE {\"node\":\"${d##*/node}\",\"cpus\":\"$(r $d/cpulist)\"}"
done
k %(report)s-END
sync
printf '\000' | dd of=/dev/port bs=1 seek=%(exit_port)d count=1 2>/dev/null
if [ -d /sys/firmware/acpi/tables ]; then poweroff -f; fi
reboot -f
"""


def init_script() -> str:
    return INIT_SCRIPT % {
        "magic": layout.BOOT_MAGIC,
        "boot_port": layout.BOOT_PORT,
        "exit_port": layout.EXIT_PORT,
        "marker": INIT_MARKER,
        "report": REPORT_TAG,
        "com2": COM2_PROBE,
    }


def build_initramfs(path: Path, busybox: Path | None = None) -> Path:
    """The built-in report init: busybox plus the script above as /init."""
    return initramfs.write_busybox_initramfs(path, init_script(), busybox=busybox,
                                             why="the ktstr boot report init is a busybox script")


# --- what the guest saw ------------------------------------------------------------------------


def parse_report(output: bytes | str) -> dict[str, Any] | None:
    """The init's report from the console (``KTSTR-REPORT`` lines), ``None`` if incomplete."""
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    report: dict[str, Any] | None = None
    cpus: list[dict[str, Any]] = []
    nodes: dict[str, str] = {}
    complete = False
    for line in text.replace("\r", "").splitlines():
        _tag, found, rest = line.partition(REPORT_TAG)
        if not found:
            continue
        kind, _, payload = rest.partition(" ")
        try:
            obj = json.loads(payload) if payload.strip() else None
        except json.JSONDecodeError:
            continue
        if kind == "" and isinstance(obj, dict):
            report = obj
        elif kind == "-CPU" and isinstance(obj, dict):
            cpus.append(obj)
        elif kind == "-NODE" and isinstance(obj, dict):
            nodes[str(obj.get("node"))] = str(obj.get("cpus", ""))
        elif kind == "-END":
            complete = True
    if report is None or not complete:
        return None
    report["cpus"] = cpus
    report["nodes"] = nodes
    return report


@dataclass
class TopologySeen:
    cpus: int
    siblings: list[list[int]]
    llcs: list[list[int]]
    nodes: list[list[int]]
    packages: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "siblings": self.siblings,
            "llcs": self.llcs,
            "nodes": self.nodes,
            "packages": self.packages,
        }


def topology_seen(report: dict[str, Any]) -> TopologySeen:
    cpus = report.get("cpus", [])
    sib = sorted({tuple(parse_cpu_list(c.get("siblings", ""))) for c in cpus})
    llc = sorted({tuple(parse_cpu_list(c.get("llc", ""))) for c in cpus})
    nodes = [
        parse_cpu_list(v)
        for _, v in sorted(report.get("nodes", {}).items(), key=lambda kv: int(kv[0]))
    ]
    return TopologySeen(
        cpus=len(parse_cpu_list(report.get("online", ""))),
        siblings=[list(s) for s in sib if s],
        llcs=[list(s) for s in llc if s],
        nodes=[n for n in nodes if n],
        packages=len({c.get("package") for c in cpus}),
    )


def topology_expected(topology: Topology) -> TopologySeen:
    return TopologySeen(
        cpus=topology.nr_cpus,
        siblings=[
            list(s) for s in sorted({tuple(topology.siblings(c)) for c in range(topology.nr_cpus)})
        ],
        llcs=[topology.cpus_in_llc(i) for i in range(topology.llcs)],
        nodes=[topology.cpus_in_node(i) for i in range(topology.numa_nodes)],
        packages=1,
    )


def topology_mismatches(seen: TopologySeen, topology: Topology) -> list[str]:
    want = topology_expected(topology)
    out = []
    for name in ("cpus", "siblings", "llcs", "nodes"):
        if getattr(seen, name) != getattr(want, name):
            out.append(f"{name}: guest saw {getattr(seen, name)}, expected {getattr(want, name)}")
    return out


# --- the command ------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "boot",
        help="boot a kernel in the in-tree VMM and report the topology the guest sees",
        description="Boot KERNEL on a declared topology with a built-in busybox init that "
        "reports the CPUs, SMT siblings, LLCs and NUMA nodes it sees, then powers off.",
    )
    add_vm_arguments(p)
    p.add_argument("--timeout", type=float, default=60.0, help="hard timeout in seconds")
    p.add_argument("--initramfs", type=Path, default=None, help="use this initramfs instead")
    p.add_argument("--cmdline", default="", help="extra kernel command line")
    p.add_argument("--quiet-kernel", action="store_true", help="boot with `quiet`")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_boot)


def _check_boot_args(args: argparse.Namespace) -> None:
    if not args.timeout > 0:
        raise KtstrError(f"--timeout must be positive, got {args.timeout}")
    if args.initramfs is not None and not args.initramfs.is_file():
        raise KtstrError(f"initramfs {args.initramfs} does not exist")


def _cmd_boot(args: argparse.Namespace) -> int:
    start = start_vm_command(args, _check_boot_args)
    if isinstance(start, int):
        return start
    kernel, topology = start.kernel, start.topology

    from ktstr.vmm.vm import Vm

    tmp = reap.mkdtemp("boot")
    try:
        initramfs = args.initramfs or build_initramfs(tmp / "init.cpio")
        vm = Vm(
            kernel,
            initramfs,
            topology,
            memory_mb=args.memory_mb,
            cmdline_extra=args.cmdline,
            timeout=args.timeout,
            quiet=args.quiet_kernel,
            on_console=console_stream(args.console),
        )
        result = vm.run()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report = parse_report(result.console)
    seen = topology_seen(report) if report else None
    mismatches = topology_mismatches(seen, topology) if seen else ["no report from the guest"]
    summary: dict[str, Any] = {
        "kernel": str(kernel),
        "guest_kernel": report.get("kernel") if report else None,
        "topology": topology.label,
        "exit_code": result.exit_code,
        "reason": result.reason,
        "boot_ms": round(result.boot_ms, 1) if result.boot_ms is not None else None,
        "duration_s": round(result.duration_s, 3),
        "cpus": seen.cpus if seen else None,
        "topology_seen": seen.as_dict() if seen else None,
        "topology_matches": not mismatches,
        "mismatches": mismatches,
        "sched_ext": (report.get("sched_ext") == "yes") if report else None,
        "clockevent": report.get("clockevent") if report else None,
        "clocksource": report.get("clocksource") if report else None,
        "com2": COM2_PROBE.encode() in result.channel2,
        "timed_out": result.timed_out,
        "panicked": result.panicked,
        "error": result.error,
        "exit_counts": result.total_exits,
        "exit_sites": dict(list(result.exit_sites.items())[:EXIT_SITES_SHOWN]),
    }
    ok = result.exit_code == 0 and not mismatches
    if args.json:
        print(json.dumps(summary))
    else:
        _print_human(summary, result)
    return 0 if ok else 1


def _print_human(summary: dict[str, Any], result: Any) -> None:
    print(
        f"kernel {summary['guest_kernel'] or summary['kernel']} on {summary['topology']}: "
        f"{summary['reason']}, exit code {summary['exit_code']}, "
        f"boot {summary['boot_ms']} ms, run {summary['duration_s']} s"
    )
    if summary["topology_seen"]:
        s = summary["topology_seen"]
        print(
            f"guest saw {s['cpus']} CPUs; SMT siblings {s['siblings']}; LLCs {s['llcs']}; "
            f"NUMA nodes {s['nodes']}"
        )
    if summary["clockevent"] is not None:
        print(
            f"clock event device {summary['clockevent']}, clocksource {summary['clocksource']}, "
            f"COM2 {'works' if summary['com2'] else 'silent'}"
        )
    for line in summary["mismatches"]:
        print(f"mismatch: {line}")
    print("exits: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["exit_counts"].items())))
    if summary["exit_sites"]:
        print("exit sites: " + ", ".join(f"{k}: {v}" for k, v in summary["exit_sites"].items()))
    if result.error:
        print(f"error: {result.error}")
    if result.error or summary["mismatches"]:
        print("console tail:\n" + result.console_tail)
