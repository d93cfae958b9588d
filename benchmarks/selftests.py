"""The sched_ext selftests: QEMU microvm + busybox against ``ktstr selftests``.

One run, same kernel, runner, vCPUs and memory:

1. QEMU ``-M microvm,accel=kvm -cpu host`` with a busybox initramfs (the
   runner and its shared-library closure packed at their host paths) whose
   init runs the whole ``runner`` once (all tests, one process, the stock
   way) and powers off; wall time from spawning QEMU to its exit;
2. ``python -m ktstr selftests --json`` through the in-tree VMM (one runner
   process per test, timeouts, state checks, packing the Python runtime);
   wall time of the whole command.

Prints both wall times, their ratio and each test's status in both. Needs a
usable KVM; where there is none, run it inside the sandbox, after building the
runner on the host (the build is slow under emulation)::

    python -m ktstr selftests --kernel 6.12 --list
    python -m ktstr sandbox run -- python3 benchmarks/selftests.py --kernel 6.12
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr import initramfs
from ktstr.selftests.parse import parse_output
from ktstr.topology import Topology
from ktstr.vmm.vm import DEFAULT_CMDLINE, EXIT_FRUGAL_CMDLINE, QUIET_CMDLINE

BEGIN = "KTSTR-SELFTESTS-BEGIN"
DONE = "KTSTR-SELFTESTS-DONE"

INIT = initramfs.BUSYBOX_INIT_PREAMBLE + r"""
# Kernel messages would interleave with the runner's lines on the console.
dmesg -n 1
echo %(begin)s
start=$(cut -d' ' -f1 /proc/uptime)
# Straight to the console, a tty: line-buffered. Into a file the runner's stdout is
# block-buffered, and the tests that fork children whose exit() flushes that buffer
# again (init_enable_count) repeat it many times over.
%(runner)s 2>&1
end=$(cut -d' ' -f1 /proc/uptime)
echo "%(done)s $start $end"
# Let the serial port drain before the power goes.
sleep 1
if [ -d /sys/firmware/acpi/tables ]; then poweroff -f; fi
reboot -f
"""


def build_initramfs(path: Path, runner: Path, test: str | None = None) -> Path:
    """busybox + the runner and its libraries + an /init that runs it once and powers off."""
    command = f"{runner} -t {test}" if test else str(runner)
    init = INIT % {"runner": command, "begin": BEGIN, "done": DONE}
    return initramfs.write_busybox_initramfs(path, init, [runner])


def run_qemu(qemu: str, kernel: Path, initrd: Path, topo: Topology, memory_mb: int,
             timeout: float) -> tuple[float, str]:
    cmdline = f"{DEFAULT_CMDLINE} {EXIT_FRUGAL_CMDLINE} {QUIET_CMDLINE}"
    argv = [qemu, "-M", "microvm,accel=kvm", "-cpu", "host", "-smp", str(topo.nr_cpus),
            "-m", str(memory_mb), "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", cmdline, "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio"]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode("utf-8", "replace")
        raise RuntimeError(f"QEMU did not finish within {timeout:g} s\n{out[-3000:]}") from None
    return time.monotonic() - start, proc.stdout.decode("utf-8", "replace").replace("\r", "")


def qemu_results(console: str) -> tuple[dict[str, str], float | None, str | None]:
    """Status per test from the runner's output; guest seconds; how the guest was lost,
    if it ended before the runner did (the tests it had finished still count)."""
    begin = console.find(BEGIN)
    if begin < 0:
        return {}, None, "the guest ended before the runner started"
    done = console.find(DONE, begin)
    parsed = parse_output(console[begin + len(BEGIN):done if done >= 0 else len(console)])
    status = {r.name: r.status.value for r in parsed.results}
    if done < 0:
        last = f" during {parsed.unfinished}" if parsed.unfinished else ""
        how = ("it panicked" if "Kernel panic" in console else
               "no panic on its console: a reset (QEMU runs with -no-reboot)")
        return status, None, f"the guest ended{last} before the runner finished; {how}"
    fields = console[done:].split("\n", 1)[0].split()
    try:
        guest_s: float | None = float(fields[2]) - float(fields[1])
    except (IndexError, ValueError):
        guest_s = None
    return status, guest_s, None


def run_ktstr(kernel: str, topology: str, memory_mb: int, results_dir: Path,
              test: str | None = None) -> tuple[float, dict[str, object]]:
    argv = [sys.executable, "-m", "ktstr", "selftests", "--kernel", kernel, "--topology",
            topology, "--memory-mb", str(memory_mb), "--json", "--sandbox", "never",
            *(["-t", test] if test else [])]
    env = {**os.environ, "KTSTR_RESULTS_DIR": str(results_dir)}
    start = time.monotonic()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env, check=False)
    wall = time.monotonic() - start
    try:
        return wall, json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"ktstr selftests exited {proc.returncode} without its JSON:\n"
                           f"{proc.stdout[-3000:]}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="6.12", help="catalog id (default 6.12)")
    parser.add_argument("--topology", default="1n1l2c1t")
    parser.add_argument("--memory-mb", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "")
    parser.add_argument("-t", "--test", help="only this test (the runner's -t: one name)")
    args = parser.parse_args()
    if not args.qemu:
        raise SystemExit("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    from ktstr.kernel import resolve_kernel
    from ktstr.selftests.build import ensure_runner

    resolved = resolve_kernel(args.kernel)
    if resolved.entry is None:
        raise SystemExit(f"--kernel {args.kernel}: give a catalog id")
    build = ensure_runner(resolved.entry)
    topo = Topology.parse(args.topology)
    print(f"kernel {resolved.entry.version}, topology {topo.label}, {args.memory_mb} MB, "
          f"{len(build.tests)} tests, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ktstr-bench-selftests-"))
    try:
        if args.test and args.test not in build.names:
            raise SystemExit(f"-t {args.test}: no such test; tests: {', '.join(build.names)}")
        initrd = build_initramfs(tmp / "init.cpio", build.runner, args.test)
        qemu_wall, console = run_qemu(args.qemu, resolved.bzimage, initrd, topo,
                                      args.memory_mb, args.timeout)
        qemu_status, guest_s, lost = qemu_results(console)
        print(f"QEMU microvm + busybox, one runner: {qemu_wall:.1f} s wall"
              + (f" (runner {guest_s:.1f} s guest time)" if guest_s is not None else "")
              + (f"; LOST: {lost}; its console's tail:\n{console[-1500:]}" if lost else ""),
              flush=True)
        ours_wall, report = run_ktstr(args.kernel, topo.label, args.memory_mb, tmp / "results",
                                      args.test)
        results = report.get("results")
        ours_status = {str(r["name"]): str(r["status"]) for r in results
                       if isinstance(r, dict)} if isinstance(results, list) else {}
        print(f"ktstr selftests (in-tree VMM, one process per test): {ours_wall:.1f} s wall; "
              f"{report.get('summary')}", flush=True)
        print(f"ratio ktstr/qemu: {ours_wall / qemu_wall:.2f}" if not lost else
              "ratio ktstr/qemu: none (QEMU's guest was lost)")
        print(f"{'test':<28} {'qemu':<8} ktstr")
        for name in [args.test] if args.test else build.names:
            mark = "" if qemu_status.get(name) == ours_status.get(name) else "  <- differs"
            print(f"{name:<28} {qemu_status.get(name, '-'):<8} {ours_status.get(name, '-')}"
                  f"{mark}")
        if report.get("failure"):
            print(f"ktstr VM failure: {report.get('failure')} while {report.get('running')}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
