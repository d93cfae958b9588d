"""Sandbox start overhead: `ktstr sandbox run` start -> the command running inside.

Each run starts `python -m ktstr sandbox run -- sh -c 'echo ready'` and takes
the host time at which "ready" arrives on its stdout (the guest clock comes
from a 1 s resolution RTC, so the host clock measures). Also reports the
whole run (boot + command + poweroff + teardown) and, separately, a Python
command (interpreter start-up over 9p).

    python benchmarks/sandbox.py [--runs 5] [--memory-mb N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

TARGET_S = 10.0


def one_run(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ktstr", "sandbox", "run", "--", *command],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ready = time.monotonic() - start
    _, err = proc.communicate()
    total = time.monotonic() - start
    if line != "ready\n" or proc.returncode != 0:
        raise SystemExit(f"sandbox run failed (status {proc.returncode}): {line!r} {err}")
    return ready, total


def series(name: str, command: list[str], runs: int, env: dict[str, str]) -> float:
    readies, totals = [], []
    for i in range(runs):
        ready, total = one_run(command, env)
        readies.append(ready)
        totals.append(total)
        print(f"  {name} run {i + 1}: command running after {ready:.2f} s, "
              f"whole run {total:.2f} s", flush=True)
    med = statistics.median(readies)
    print(f"{name}: median start overhead {med:.2f} s (min {min(readies):.2f}, "
          f"max {max(readies):.2f}); median whole run {statistics.median(totals):.2f} s")
    return med


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory-mb", type=int, default=None,
                        help="sandbox RAM (default: the sandbox default)")
    args = parser.parse_args()
    env = dict(os.environ)
    env.pop("KTSTR_IN_SANDBOX", None)
    if args.memory_mb:
        env["KTSTR_SANDBOX_MEMORY_MB"] = str(args.memory_mb)
    shell = series("sh", ["sh", "-c", "echo ready"], args.runs, env)
    series("python", [sys.executable, "-c", "print('ready')"], args.runs, env)
    verdict = "within" if shell <= TARGET_S else "OVER"
    print(f"start overhead {shell:.2f} s: {verdict} the {TARGET_S:.0f} s target")
    return 0 if shell <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
