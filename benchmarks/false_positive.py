"""False-positive rate of the default checks on this host's scheduler.

Runs the steady scenarios (which a correct scheduler must pass) many times
in host mode with short durations and prints how often a check failed
anyway, with the failing check's message.

    python benchmarks/false_positive.py [--runs 50] [--duration 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.scenario.host import run_host

STEADY = ("steady", "steady_llc", "oversubscribed", "nested_steady")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--scenarios", default=",".join(STEADY))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = [n for n in args.scenarios.split(",") if n]
    failures: list[dict[str, object]] = []
    by_check: Counter[str] = Counter()
    start = time.monotonic()
    for i in range(args.runs):
        name = names[i % len(names)]
        (res,) = run_host([name], duration=args.duration)
        if not res.passed:
            bad = [c for c in res.checks if not c["passed"]]
            by_check.update(str(c["name"]) for c in bad)
            failures.append({"run": i, "scenario": name,
                             "failed": [f"{c['name']}: {c['message']}" for c in bad]})
    rate = len(failures) / args.runs
    summary = {
        "runs": args.runs, "duration_s": args.duration, "scenarios": names,
        "false_positives": len(failures), "rate": rate, "by_check": dict(by_check),
        "failures": failures, "wall_s": round(time.monotonic() - start, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for f in failures:
            print(f"run {f['run']} {f['scenario']}: {'; '.join(map(str, f['failed']))}")
        print(f"false positives: {len(failures)}/{args.runs} = {rate:.1%} "
              f"({', '.join(names)}; {args.duration:g} s each; {summary['wall_s']} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
