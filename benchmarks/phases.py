"""Where one VM test's wall time goes, phase by phase.

Runs one VM test (default ``test_steady``: 1n2l2c1t, 2 s scenario) through pytest and
the plugin, ``--runs`` times in one session (``--ktstr-repeat``), and splits each run's
wall time from its sidecar (``timings``; guest marks are host seconds since VM start):

- host prep: resolving the kernel, packing the initramfs, VM set-up (``prep_s``);
- VM start -> init: kernel decompression and boot, initramfs unpack, the guest init's
  Python start (``boot_ms``, the init's boot-port write);
- init -> hello: mounts and the host channel;
- hello -> scenario start: the run request, sysctls, the scheduler's attach, importing
  the test module, the samplers (the guest's own split of both is printed under the
  table: ``timings.guest_steps_s``);
- scenario (its declared duration and the work's own start and stop);
- scenario end -> end: samples, the scheduler's stop, the result;
- end -> VM gone: poweroff and teardown;
- host judging: checks, the sidecar, the report (the rest of ``wall_s``).

The first run of a session also builds the base archive (a cached step: reported, not
in the medians). Needs usable KVM: run it inside the sandbox::

    python -m ktstr sandbox run -- python benchmarks/phases.py [--runs 5]
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("host prep", "VM start -> init", "init -> hello", "hello -> scenario start",
          "scenario", "scenario end -> end", "end -> VM gone", "host judging", "wall")


def phases(t: Mapping[str, Any]) -> dict[str, float] | None:
    """One run's phases in seconds from its sidecar ``timings``, None if a mark is missing."""
    g = t.get("guest_s") or {}
    need = ("hello", "scenario_start", "scenario_end", "end")
    if any(k not in g for k in need) or t.get("boot_ms") is None:
        return None
    boot = t["boot_ms"] / 1000
    vm_run, prep, wall = t["vm_run_s"], t["prep_s"], t["wall_s"]
    return {
        "host prep": prep,
        "VM start -> init": boot,
        "init -> hello": g["hello"] - boot,
        "hello -> scenario start": g["scenario_start"] - g["hello"],
        "scenario": g["scenario_end"] - g["scenario_start"],
        "scenario end -> end": g["end"] - g["scenario_end"],
        "end -> VM gone": vm_run - g["end"],
        "host judging": wall - prep - vm_run,
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--test", default="tests/vm/test_scheduling.py::test_steady")
    parser.add_argument("--json", type=Path, help="also write the per-run phases here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    results = Path(tempfile.mkdtemp(prefix="ktstr-phases-", dir=ROOT / "build"))
    try:
        env = {**os.environ, "KTSTR_RESULTS_DIR": str(results), "KTSTR_RUN_ID": "phases"}
        cmd = [sys.executable, "-m", "pytest", args.test, "-q", "-p", "no:cacheprovider",
               f"--ktstr-repeat={args.runs}", "--ktstr-repro=never"]
        rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        sidecars = sorted((results / "phases").glob("*.json"))
        if not sidecars:
            print(f"no sidecar written (pytest exit {rc})", file=sys.stderr)
            return 1
        record = json.loads(sidecars[0].read_text())
        runs = [r.get("timings") or {} for r in record.get("repeats") or []] \
            or [record.get("timings") or {}]
    finally:
        shutil.rmtree(results, ignore_errors=True)
    kept = [(t, p) for t in runs if (p := phases(t)) is not None]
    rows = [p for _, p in kept]
    if not rows:
        print("no run has every phase mark", file=sys.stderr)
        return 1
    first, rest = rows[0], rows[1:] or rows
    print(f"{record['test']} under {record.get('scheduler', {}).get('name') or 'eevdf'}, "
          f"{len(rows)} runs (pytest exit {rc}); medians over runs 2..{len(rows)}"
          if len(rows) > 1 else f"{record['test']}, 1 run (pytest exit {rc})")
    print(f"{'phase':<26}{'median s':>9}{'min s':>8}{'max s':>8}{'run 1 s':>9}")
    for name in PHASES:
        values = [r[name] for r in rest]
        print(f"{name:<26}{statistics.median(values):9.2f}{min(values):8.2f}"
              f"{max(values):8.2f}{first[name]:9.2f}")
    steps = [t.get("guest_steps_s") or {} for t, _ in kept[1:] or kept]
    names = list(dict.fromkeys(k for st in steps for k in st))
    if names:
        print("guest start-up steps (median s): " + ", ".join(
            f"{n} {statistics.median(st.get(n, 0.0) for st in steps):.2f}" for n in names))
    if args.json:
        args.json.write_text(json.dumps({"phases": rows, "steps": steps}, indent=1))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
