"""Boot-to-init time: the in-tree VMM against QEMU ``-M microvm,accel=kvm``.

Both boot the same kernel, initramfs (the ``ktstr boot`` report init), vCPUs,
memory and command line, alternately, N times each. Both are timed the same
way: host wall clock from just before the VMM is created (QEMU: spawned) to
the moment the init's marker line appears on the console. Also reported: the
guest's own uptime when it printed the marker (``printk.time=1``; excludes VMM
start-up and kernel decompression) and the in-tree VMM's ``boot_ms`` (VM start
-> boot-port write). The load average is printed with every run: the machines
are shared, and every figure moves with the load.

Needs a usable KVM; where there is none, run it inside the sandbox::

    python -m ktstr sandbox run -- python3 benchmarks/boot.py --kernel BZIMAGE
"""

from __future__ import annotations

import argparse
import collections
import difflib
import itertools
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr import initramfs
from ktstr.boot import INIT_MARKER, build_initramfs
from ktstr.topology import Topology
from ktstr.vmm import layout
from ktstr.vmm.vm import DEFAULT_CMDLINE, EXIT_FRUGAL_CMDLINE, QUIET_CMDLINE, Vm

EXTRA_CMDLINE = "printk.time=1"
QEMU_CMDLINE = f"{DEFAULT_CMDLINE} {EXIT_FRUGAL_CMDLINE} {QUIET_CMDLINE} {EXTRA_CMDLINE}"
"""What our VMM gives a quiet boot with EXTRA_CMDLINE, spelled out for QEMU."""
UPTIME_RE = re.compile(rb"\[\s*(\d+\.\d+)\] " + INIT_MARKER.encode())


def guest_uptime_ms(console: bytes) -> float | None:
    """The guest's printk timestamp on the marker line, in ms."""
    m = UPTIME_RE.search(console)
    return float(m.group(1)) * 1000 if m else None


LOG_LINE_RE = re.compile(rb"^\[\s*(\d+\.\d+)\] (.*?)\r?$", re.M)


def log_lines(console: bytes) -> list[tuple[float, str]]:
    """The console's printk lines as (seconds since boot, message)."""
    return [(float(t), m.decode("utf-8", "replace")) for t, m in LOG_LINE_RE.findall(console)]


def log_key(message: str) -> str:
    """A message with its numbers and addresses blanked, to pair lines of two boots."""
    return re.sub(r"0x[0-9a-f]+|\d+", "#", message)


def log_gaps(ours: list[tuple[float, str]], qemu: list[tuple[float, str]]
             ) -> dict[tuple[str, int], tuple[float, float, str]]:
    """Per line both boots printed (its key and which occurrence of that key): the time since
    the previous shared line under each (ours, qemu, in ms) and the message."""
    matcher = difflib.SequenceMatcher(a=[log_key(m) for _, m in ours],
                                      b=[log_key(m) for _, m in qemu], autojunk=False)
    pairs = [(ours[i + k], qemu[j + k]) for i, j, n in matcher.get_matching_blocks()
             for k in range(n)]
    seen: collections.Counter[str] = collections.Counter()
    gaps: dict[tuple[str, int], tuple[float, float, str]] = {}
    for (po, pq), (o, q) in itertools.pairwise(pairs):
        key = log_key(o[1])
        seen[key] += 1
        gaps[key, seen[key]] = ((o[0] - po[0]) * 1000, (q[0] - pq[0]) * 1000, o[1])
    return gaps


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def boot_ours(kernel: Path, initrd: Path, topo: Topology, memory_mb: int, timeout: float,
              quiet: bool = True) -> tuple[float, float | None, float | None, dict[str, int],
                                           dict[str, int], bytes]:
    seen: list[float] = []
    buf = bytearray()

    marker = INIT_MARKER.encode()

    def on_console(data: bytes) -> None:
        # Called per byte on a vCPU thread: search only the tail that can hold a new match.
        buf.extend(data)
        if not seen and buf.find(marker, max(0, len(buf) - len(marker) - len(data))) >= 0:
            seen.append(time.monotonic())

    start = time.monotonic()
    result = Vm(kernel, initrd, topo, memory_mb=memory_mb, timeout=timeout, quiet=quiet,
                cmdline_extra=EXTRA_CMDLINE, on_console=on_console).run()
    if not seen:
        raise RuntimeError(f"our VMM: no init marker ({result.reason}: {result.error})\n"
                           + result.console_tail)
    return ((seen[0] - start) * 1000, result.boot_ms, guest_uptime_ms(bytes(buf)),
            result.total_exits, result.exit_sites, bytes(buf))


def boot_qemu(qemu: str, kernel: Path, initrd: Path, topo: Topology, memory_mb: int,
              cmdline: str, timeout: float, until: bytes = INIT_MARKER.encode()
              ) -> tuple[float, float | None, bytes]:
    argv = [
        qemu, "-M", "microvm,accel=kvm", "-cpu", "host", "-smp", str(topo.nr_cpus),
        "-m", str(memory_mb), "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", cmdline, "-nographic", "-nodefaults", "-no-reboot",
        "-serial", "stdio",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    buf = b""
    marker_at: float | None = None
    fd = proc.stdout.fileno()
    try:
        while time.monotonic() - start < timeout:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            if marker_at is None and INIT_MARKER.encode() in buf:
                marker_at = time.monotonic()
            end = buf.find(until)
            if marker_at is not None and end >= 0 and b"\n" in buf[end:]:
                break
    finally:
        proc.kill()
        proc.wait()
    if marker_at is None:
        raise RuntimeError("QEMU: no init marker\n" + buf[-2000:].decode("utf-8", "replace"))
    return (marker_at - start) * 1000, guest_uptime_ms(buf), buf


DMESG_BEGIN, DMESG_END = b"KTSTR-DMESG-BEGIN", b"KTSTR-DMESG-END"
DMESG_INIT = initramfs.BUSYBOX_INIT_PREAMBLE + f"""
echo "<2>{INIT_MARKER}" > /dev/kmsg
echo {DMESG_BEGIN.decode()}; dmesg; echo {DMESG_END.decode()}
printf '\\000' | dd of=/dev/port bs=1 seek={layout.EXIT_PORT} count=1 2>/dev/null
poweroff -f
"""
"""A quiet boot's whole log, timestamps and all, printed by its init after the boot: the
console's own writes do not slow the boot being measured."""


def dmesg_of(console: bytes) -> bytes:
    begin, end = console.rfind(DMESG_BEGIN), console.rfind(DMESG_END)
    if begin < 0 or end < begin:
        raise RuntimeError("the init's dmesg did not reach the console\n"
                           + console[-2000:].decode("utf-8", "replace"))
    return console[begin:end]


def compare_logs(args: argparse.Namespace, topo: Topology, tmp: Path) -> None:
    """``--runs`` quiet boots each, alternating, whose init prints dmesg; the log lines where
    ours spent the most extra time, as medians over the boots (a line's time is the time
    since the previous line both boots printed)."""
    initrd = initramfs.write_busybox_initramfs(tmp / "dmesg.cpio", DMESG_INIT,
                                               why="the dmesg init is a busybox script")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    per_line: dict[tuple[str, int], list[tuple[float, float, str]]] = {}
    ends: list[tuple[float, float]] = []
    for i in range(args.runs):
        *_, ours_log = boot_ours(args.kernel, initrd, topo, args.memory_mb, args.timeout)
        _, _, qemu_log = boot_qemu(args.qemu, args.kernel, initrd, topo, args.memory_mb,
                                   QEMU_CMDLINE, args.timeout, until=DMESG_END)
        (args.log_dir / f"ours-{i + 1}.log").write_bytes(ours_log)
        (args.log_dir / f"qemu-{i + 1}.log").write_bytes(qemu_log)
        ours, qemu = log_lines(dmesg_of(ours_log)), log_lines(dmesg_of(qemu_log))
        ends.append((ours[-1][0], qemu[-1][0]))
        print(f"boot {i + 1}: init at {ours[-1][0]:.3f} s under ours, {qemu[-1][0]:.3f} s "
              f"under QEMU; {load()}", flush=True)
        for key, gap in log_gaps(ours, qemu).items():
            per_line.setdefault(key, []).append(gap)
    med = statistics.median
    rows = sorted(((med(o for o, _, _ in g), med(q for _, q, _ in g), g[-1][2])
                   for g in per_line.values() if len(g) == args.runs),
                  key=lambda r: r[1] - r[0])
    o_end, q_end = med(e[0] for e in ends), med(e[1] for e in ends)
    print(f"guest uptime at init, median of {args.runs}: ours {o_end:.3f} s, QEMU {q_end:.3f} s "
          f"(ratio {o_end / q_end:.2f}); {len(rows)} lines every boot printed")
    print(f"{'ours ms':>9} {'qemu ms':>9} {'excess':>8}  line (median time before it)")
    for o, q, message in rows[:args.compare_log]:
        print(f"{o:9.1f} {q:9.1f} {o - q:+8.1f}  {message[:100]}")
    print(f"sum of median excess: {sum(o - q for o, q, _ in rows):+.1f} ms", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--topology", default="1n1l2c1t")
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "")
    parser.add_argument("--compare-log", type=int, metavar="N", default=0,
                        help="instead: boot each VMM --runs times (quiet) with an init that "
                        "prints dmesg, and print the N log lines that took longest under ours "
                        "against QEMU (medians)")
    parser.add_argument("--log-dir", type=Path, default=Path("build/boot-logs"),
                        help="where --compare-log keeps both boot logs")
    args = parser.parse_args()
    topo = Topology.parse(args.topology)
    tmp = Path(tempfile.mkdtemp(prefix="ktstr-bench-"))
    try:
        if args.compare_log and args.qemu:
            compare_logs(args, topo, tmp)
            return 0
        initrd = build_initramfs(tmp / "init.cpio")
        ours: list[float] = []
        ours_port: list[float] = []
        ours_up: list[float] = []
        qemu: list[float] = []
        qemu_up: list[float] = []
        exits: dict[str, int] = {}
        sites: dict[str, int] = {}
        print(f"topology {topo.label}, {args.memory_mb} MB, {args.runs} runs each, {load()}",
              flush=True)
        for i in range(args.runs):
            ms, port_ms, up, exits, sites, _ = boot_ours(
                args.kernel, initrd, topo, args.memory_mb, args.timeout)
            ours.append(ms)
            if port_ms is not None:
                ours_port.append(port_ms)
            if up is not None:
                ours_up.append(up)
            line = (f"run {i + 1}: ktstr {ms:.0f} ms (boot port {port_ms or 0:.0f} ms, "
                    f"guest uptime {up or 0:.0f} ms)")
            if args.qemu:
                qms, qup, _ = boot_qemu(args.qemu, args.kernel, initrd, topo, args.memory_mb,
                                     QEMU_CMDLINE, args.timeout)
                qemu.append(qms)
                if qup is not None:
                    qemu_up.append(qup)
                line += f", qemu microvm {qms:.0f} ms (guest uptime {qup or 0:.0f} ms)"
            print(f"{line}; {load()}", flush=True)
        med = statistics.median
        print(f"ktstr VMM     median boot-to-init {med(ours):.0f} ms"
              + (f" (boot port {med(ours_port):.0f} ms)" if ours_port else "")
              + (f", guest uptime at init {med(ours_up):.0f} ms" if ours_up else ""))
        print("ktstr VMM exits (last run): "
              + ", ".join(f"{k}={v}" for k, v in sorted(exits.items())))
        print("ktstr VMM exit sites (last run): "
              + ", ".join(f"{k}: {v}" for k, v in list(sites.items())[:12]))
        if qemu:
            q = med(qemu)
            print(f"QEMU microvm  median boot-to-init {q:.0f} ms"
                  + (f", guest uptime at init {med(qemu_up):.0f} ms" if qemu_up else ""))
            print(f"ratio ktstr/qemu: {med(ours) / q:.2f}"
                  + (f" (guest uptime ratio {med(ours_up) / med(qemu_up):.2f})"
                     if ours_up and qemu_up else ""))
        print(load())
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
