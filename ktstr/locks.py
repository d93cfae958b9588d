"""`ktstr locks`: the host CPU reservations held now, by any ktstr process on this machine."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

from ktstr.cpulist import format_cpu_list
from ktstr.reserve import held_reservations

NONE_HELD = "no reservations held"


def show(*, as_json: bool = False, lock_dir: Path | None = None,
         out: TextIO | None = None) -> int:
    """Print the held reservations (one row each, by first CPU); exit code 0."""
    out = out if out is not None else sys.stdout
    now = time.time()
    held = held_reservations(lock_dir)
    if as_json:
        entries = [h.to_json(now) for h in held]
        print(json.dumps(entries), file=out)
        return 0
    if not held:
        print(NONE_HELD, file=out)
        return 0
    rows = [("CPUS", "PID", "MODE", "HELD_S", "TEST")]
    for h in held:
        held_s = h.held_s(now)
        rows.append((format_cpu_list(h.cpus), str(h.pid), h.mode.value if h.mode else "?",
                     "?" if held_s is None else f"{held_s:.1f}", h.test))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[4],
              file=out)
    return 0


def _cmd(args: argparse.Namespace) -> int:
    return show(as_json=args.json)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("locks", help="list the host CPU reservations of running VMs",
                       description="List the host CPUs reserved by running ktstr VMs on this "
                                   "machine (any process): CPUs, pid, mode (budget or "
                                   "llc-aligned), seconds held, test.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd)
