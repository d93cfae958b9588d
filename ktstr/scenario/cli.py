"""`ktstr list` and `ktstr run`: the scenario catalog and host mode."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ktstr.errors import KtstrError
from ktstr.scenario import catalog
from ktstr.scenario.host import DEFAULT_DURATION_S


def register(sub: Any) -> None:
    p = sub.add_parser("list", help="list the scenario catalog")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "run",
        help="run catalog scenarios on this host (host mode, the active scheduler)",
        description="Runs scenarios in a temporary cgroup subtree ktstr-<pid> that is "
        "always removed. Exit 0 if every verdict passes, 1 if one fails, 2 on bad input. A "
        "scenario that needs a cgroup control this host lacks is skipped, saying which; one "
        "that is expected to fail (not in the default run) passes when it fails.",
    )
    p.add_argument("--all", action="store_true",
                   help="every scenario of the catalog, the expected failures too")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="scenarios to run (default: every scenario in the default run)")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, metavar="S",
                   help=f"seconds per scenario (default {DEFAULT_DURATION_S:g})")
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

    if args.all and args.names:
        raise KtstrError("give scenario names or --all, not both")
    for name in args.names:
        catalog.get(name)  # fail fast, before any cgroup is created
    names = list(catalog.CATALOG) if args.all else args.names
    results = run_host(names, duration=args.duration, workers=args.workers,
                       cpuset=args.cpuset)
    outcomes = [outcome(r) for r in results]
    passed = all(o in ("PASS", "XFAIL", "SKIP") for o in outcomes)
    if args.json:
        print(json.dumps({"passed": passed, "scenarios": [
            {**r.to_dict(), "outcome": o} for r, o in zip(results, outcomes, strict=True)]},
            indent=2))
    else:
        for r, o in zip(results, outcomes, strict=True):
            _print_human(r, o)
        counts = {o: outcomes.count(o) for o in dict.fromkeys(outcomes)}
        print(f"{'PASS' if passed else 'FAIL'}: " + ", ".join(
            f"{n} {o.lower()}" for o, n in counts.items()) + f" of {len(results)} scenarios")
    sys.stdout.flush()
    return 0 if passed else 1


def outcome(r: Any) -> str:
    """PASS, FAIL, SKIP (needs what this host lacks), XFAIL (an expected failure came)
    or XPASS (an expected failure did not)."""
    if r.passed is None:
        return "SKIP"
    if catalog.get(r.name).in_default_run:
        return "PASS" if r.passed else "FAIL"
    return "XPASS" if r.passed else "XFAIL"


def _print_human(r: Any, verdict: str) -> None:
    print(f"{verdict} {r.name} ({r.topology}, {r.duration_s:.1f} s)")
    for note in r.notes:
        if note.startswith("skipped: "):
            print(f"  {note}")
    for c in r.cgroups:
        p99 = f", wake p99 {c.wake_p99_us:.0f} us" if c.wake_p99_us is not None else ""
        print(f"  cgroup {c.name}: {c.workers} workers, {c.work_units} units, off-CPU "
              f"{c.off_cpu_pct_min:.1f}-{c.off_cpu_pct_max:.1f}%, max gap {c.max_gap_ms:.0f} ms"
              f"{p99}")
    for chk in r.checks:
        if not chk["passed"]:
            print(f"  FAIL {chk['name']}: {chk['message']}")
