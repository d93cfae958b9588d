"""False-positive rate of the default checks on this host's scheduler.

Runs the steady scenarios (which a correct scheduler must pass) many times
in host mode, as ``ktstr run`` does (3 s each unless ``--duration``), and prints how
often a check failed anyway, with the failing check's message.

    python benchmarks/false_positive.py [--runs 50] [--duration 3] [--json]
    python benchmarks/false_positive.py --catalog --repeats 3   # every default-run entry

A scenario needing a cgroup control this host lacks is counted as skipped, not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.scenario.host import DEFAULT_DURATION_S, run_host

STEADY = ("steady", "steady_llc", "oversubscribed", "nested_steady")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                    help=f"seconds per run (default {DEFAULT_DURATION_S:g}, as ktstr run)")
    ap.add_argument("--scenarios", default=",".join(STEADY))
    ap.add_argument("--catalog", action="store_true",
                    help="every scenario of the default run, --repeats times each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = [n for n in args.scenarios.split(",") if n]
    if args.catalog:
        from ktstr.scenario import catalog

        names = catalog.default_names()
        args.runs = args.repeats * len(names)
    skipped: list[str] = []
    failures: list[dict[str, object]] = []
    by_check: Counter[str] = Counter()
    start = time.monotonic()
    for i in range(args.runs):
        name = names[i % len(names)]
        (res,) = run_host([name], duration=args.duration)
        if res.passed is None:
            skipped.append(name)
            continue
        if not res.passed:
            bad = [c for c in res.checks if not c["passed"]]
            by_check.update(str(c["name"]) for c in bad)
            failures.append({"run": i, "scenario": name,
                             "failed": [f"{c['name']}: {c['message']}" for c in bad]})
    ran = args.runs - len(skipped)
    rate = len(failures) / ran if ran else 0.0
    summary = {
        "runs": ran, "skipped": sorted(set(skipped)), "duration_s": args.duration,
        "scenarios": names,
        "false_positives": len(failures), "rate": rate, "by_check": dict(by_check),
        "failures": failures, "wall_s": round(time.monotonic() - start, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for f in failures:
            print(f"run {f['run']} {f['scenario']}: {'; '.join(map(str, f['failed']))}")
        print(f"false positives: {len(failures)}/{ran} = {rate:.1%} "
              f"({len(names)} scenarios; {args.duration:g} s each; {summary['wall_s']} s wall; "
              f"skipped: {', '.join(sorted(set(skipped))) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
