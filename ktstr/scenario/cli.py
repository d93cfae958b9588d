"""`ktstr list` and `ktstr run`: the scenario catalog and host mode."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ktstr.scenario import catalog


def register(sub: Any) -> None:
    p = sub.add_parser("list", help="list the scenario catalog")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "run",
        help="run catalog scenarios on this host (host mode, the active scheduler)",
        description="Runs scenarios in a temporary cgroup subtree ktstr-<pid> that is "
        "always removed. Exit 0 if every verdict passes, 1 if one fails, 2 on bad input.",
    )
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="scenarios to run (default: every scenario in the default run)")
    p.add_argument("--duration", type=float, default=3.0, metavar="S",
                   help="seconds per scenario (default 3)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="workers per cgroup (default: one per CPU)")
    p.add_argument("--cpuset", default=None, metavar="SPEC",
                   help="confine the run to host CPUs: all, llc:I, numa:I, range:A-B, "
                   "disjoint:I/N, exact:LIST")
    p.add_argument("--json", action="store_true", help="print telemetry and verdicts as JSON")
    p.set_defaults(func=cmd_run)


def cmd_list(args: argparse.Namespace) -> int:
    entries = list(catalog.CATALOG.values())
    if args.json:
        print(json.dumps([
            {"name": s.name, "category": s.category, "description": s.description,
             "default_run": s.in_default_run, "checks": dict(s.checks)}
            for s in entries
        ], indent=2))
        return 0
    width = max(len(s.name) for s in entries)
    for s in entries:
        flag = "" if s.in_default_run else "  [not in the default run]"
        print(f"{s.name:<{width}}  {s.category:<12} {s.description}{flag}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ktstr.scenario.host import run_host

    for name in args.names:
        catalog.get(name)  # fail fast, before any cgroup is created
    results = run_host(args.names, duration=args.duration, workers=args.workers,
                       cpuset=args.cpuset)
    passed = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"passed": passed, "scenarios": [r.to_dict() for r in results]},
                         indent=2))
    else:
        for r in results:
            _print_human(r)
        print(f"{'PASS' if passed else 'FAIL'}: {sum(bool(r.passed) for r in results)}/"
              f"{len(results)} scenarios passed")
    sys.stdout.flush()
    return 0 if passed else 1


def _print_human(r: Any) -> None:
    print(f"{'PASS' if r.passed else 'FAIL'} {r.name} ({r.topology}, {r.duration_s:.1f} s)")
    for c in r.cgroups:
        p99 = f", wake p99 {c.wake_p99_us:.0f} us" if c.wake_p99_us is not None else ""
        print(f"  cgroup {c.name}: {c.workers} workers, {c.work_units} units, off-CPU "
              f"{c.off_cpu_pct_min:.1f}-{c.off_cpu_pct_max:.1f}%, max gap {c.max_gap_ms:.0f} ms"
              f"{p99}")
    for chk in r.checks:
        if not chk["passed"]:
            print(f"  FAIL {chk['name']}: {chk['message']}")
