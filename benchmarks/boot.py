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

from ktstr.boot import INIT_MARKER, build_initramfs
from ktstr.topology import Topology
from ktstr.vmm.vm import DEFAULT_CMDLINE, EXIT_FRUGAL_CMDLINE, QUIET_CMDLINE, Vm

EXTRA_CMDLINE = "printk.time=1"
UPTIME_RE = re.compile(rb"\[\s*(\d+\.\d+)\] " + INIT_MARKER.encode())


def guest_uptime_ms(console: bytes) -> float | None:
    """The guest's printk timestamp on the marker line, in ms."""
    m = UPTIME_RE.search(console)
    return float(m.group(1)) * 1000 if m else None


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def boot_ours(kernel: Path, initrd: Path, topo: Topology, memory_mb: int, timeout: float
              ) -> tuple[float, float | None, float | None, dict[str, int], dict[str, int]]:
    seen: list[float] = []
    buf = bytearray()

    marker = INIT_MARKER.encode()

    def on_console(data: bytes) -> None:
        # Called per byte on a vCPU thread: search only the tail that can hold a new match.
        buf.extend(data)
        if not seen and buf.find(marker, max(0, len(buf) - len(marker) - len(data))) >= 0:
            seen.append(time.monotonic())

    start = time.monotonic()
    result = Vm(kernel, initrd, topo, memory_mb=memory_mb, timeout=timeout, quiet=True,
                cmdline_extra=EXTRA_CMDLINE, on_console=on_console).run()
    if not seen:
        raise RuntimeError(f"our VMM: no init marker ({result.reason}: {result.error})\n"
                           + result.console_tail)
    return ((seen[0] - start) * 1000, result.boot_ms, guest_uptime_ms(bytes(buf)),
            result.total_exits, result.exit_sites)


def boot_qemu(qemu: str, kernel: Path, initrd: Path, topo: Topology, memory_mb: int,
              cmdline: str, timeout: float) -> tuple[float, float | None]:
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
            if marker_at is not None and b"\n" in buf[buf.find(INIT_MARKER.encode()):]:
                break
    finally:
        proc.kill()
        proc.wait()
    if marker_at is None:
        raise RuntimeError("QEMU: no init marker\n" + buf[-2000:].decode("utf-8", "replace"))
    return (marker_at - start) * 1000, guest_uptime_ms(buf)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--topology", default="1n1l2c1t")
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "")
    args = parser.parse_args()
    topo = Topology.parse(args.topology)
    cmdline = f"{DEFAULT_CMDLINE} {EXIT_FRUGAL_CMDLINE} {QUIET_CMDLINE} {EXTRA_CMDLINE}"
    tmp = Path(tempfile.mkdtemp(prefix="ktstr-bench-"))
    try:
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
            ms, port_ms, up, exits, sites = boot_ours(
                args.kernel, initrd, topo, args.memory_mb, args.timeout)
            ours.append(ms)
            if port_ms is not None:
                ours_port.append(port_ms)
            if up is not None:
                ours_up.append(up)
            line = (f"run {i + 1}: ktstr {ms:.0f} ms (boot port {port_ms or 0:.0f} ms, "
                    f"guest uptime {up or 0:.0f} ms)")
            if args.qemu:
                qms, qup = boot_qemu(args.qemu, args.kernel, initrd, topo, args.memory_mb,
                                     cmdline, args.timeout)
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
