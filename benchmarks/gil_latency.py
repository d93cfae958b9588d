"""How long a vCPU exit waits for the GIL while another VMM thread computes.

Every vCPU exit we handle runs Python, so it needs the GIL. A thread doing Python work
(the host-side observer's drgn reads, say) holds it until it blocks or until Python's
switch interval (5 ms by default) makes it hand over. Console output costs two exits per
byte (the 8250 LSR poll and the THR write), often with the guest's interrupts off, so
while such a thread runs the guest's console — and whatever waits on the console lock —
slows by up to the switch interval per exit.

The script boots the ``ktstr boot`` report init with a verbose console (every printk
line reaches the serial port) in three ways: the VMM alone; the VMM beside a thread
that computes in Python the whole time, at the default switch interval; and the same at
the switch interval the VMM sets for its runs (:data:`ktstr.vmm.vm.SWITCH_INTERVAL_S`).
It prints each one's median boot wall time and console throughput, and their ratios to
the VMM alone. Needs a usable KVM; here, inside the sandbox::

    python -m ktstr sandbox run -- python3 benchmarks/gil_latency.py --kernel BZIMAGE
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.boot import build_initramfs
from ktstr.topology import Topology
from ktstr.vmm import vm as vmm


def spin(stop: threading.Event) -> None:
    """Pure-Python work that never blocks: it gives up the GIL only when asked to."""
    n = 0
    while not stop.is_set():
        for i in range(1000):
            n += i * i


def boot(kernel: Path, initrd: Path, topology: Topology, *, busy: bool,
         switch_s: float | None) -> tuple[float, int, bool]:
    """(wall seconds, console bytes, powered off cleanly) of one verbose boot."""
    stop = threading.Event()
    worker = threading.Thread(target=spin, args=(stop,), daemon=True) if busy else None
    if worker is not None:
        worker.start()
    try:
        machine = vmm.Vm(kernel, initrd, topology, memory_mb=512, timeout=300, quiet=False)
        if switch_s is not None:
            machine.switch_interval_s = switch_s
        t = time.monotonic()
        result = machine.run()
        return time.monotonic() - t, len(result.console), result.ok
    finally:
        stop.set()
        if worker is not None:
            worker.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--topology", default="1n1l2c1t")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    topology = Topology.parse(args.topology)
    default = sys.getswitchinterval()
    configs = {
        "vmm alone": (False, None),
        f"busy thread, switch {default * 1000:g} ms": (True, default),
        f"busy thread, switch {vmm.SWITCH_INTERVAL_S * 1000:g} ms (ours)":
            (True, vmm.SWITCH_INTERVAL_S),
    }
    with tempfile.TemporaryDirectory(prefix="ktstr-bench-") as tmp:
        initrd = build_initramfs(Path(tmp) / "init.cpio")
        times: dict[str, list[float]] = {name: [] for name in configs}
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for i in range(args.runs):  # interleaved, so a drifting host hits every config
            for name, (busy, switch_s) in configs.items():
                wall, nbytes, ok = boot(args.kernel, initrd, topology, busy=busy,
                                        switch_s=switch_s)
                print(f"run {i + 1} {name}: {wall:.2f} s, {nbytes} console bytes"
                      + ("" if ok else " (did not power off cleanly)"), flush=True)
                times[name].append(wall)
                rates[name].append(nbytes / wall)
    base = statistics.median(times["vmm alone"])
    print(f"\n{'configuration':45s} {'boot s':>8s} {'x alone':>8s} {'console B/s':>12s}")
    for name in configs:
        med = statistics.median(times[name])
        print(f"{name:45s} {med:8.2f} {med / base:8.2f} {statistics.median(rates[name]):12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
