"""``ktstr stats``: list runs, show one, compare two, draw a report."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ktstr.errors import KtstrError
from ktstr.results.compare import DEFAULT_REL_THRESHOLD, compare_runs, format_comparison
from ktstr.results.sidecar import list_runs, load_run, resolve_run, result_key, results_root


def register(sub: Any) -> None:
    stats = sub.add_parser("stats", help="inspect and compare VM test results")
    stats.add_argument(
        "--root", type=Path, default=None, help="results directory (default: $KTSTR_RESULTS_DIR "
        "or ./ktstr-results)"
    )
    ssub = stats.add_subparsers(dest="stats_command", metavar="STATS_COMMAND")
    ssub.required = True

    p = ssub.add_parser("list", help="list runs")
    p.set_defaults(func=cmd_list)

    p = ssub.add_parser("show", help="show the results of one run")
    p.add_argument("run", help="run id, path, 'latest' or 'previous'")
    p.add_argument("--json", action="store_true", help="print the sidecars as JSON")
    p.set_defaults(func=cmd_show)

    p = ssub.add_parser(
        "compare", help="compare two runs metric by metric; exit 1 on a regression"
    )
    p.add_argument("run_a", help="baseline run (id, path, 'previous')")
    p.add_argument("run_b", help="candidate run (id, path, 'latest')")
    p.add_argument(
        "--threshold", type=float, default=DEFAULT_REL_THRESHOLD * 100, metavar="PCT",
        help="relative change in the worse direction that counts as a regression "
        "(percent, default %(default)s)",
    )
    p.add_argument(
        "--abs", action="append", default=[], metavar="METRIC=VALUE",
        help="absolute gate for metrics whose name contains METRIC (repeatable)",
    )
    p.add_argument("--all", action="store_true", help="print unchanged metrics too")
    p.set_defaults(func=cmd_compare)

    p = ssub.add_parser("report", help="HTML report with per-CPU and per-worker timelines")
    p.add_argument("run", help="run id, path, 'latest' or 'previous'")
    p.add_argument("-o", "--output", type=Path, default=None, help="output .html or .png path")
    p.set_defaults(func=cmd_report)


def cmd_list(args: argparse.Namespace) -> int:
    root = args.root or results_root()
    runs = list_runs(root)
    if not runs:
        print(f"no runs under {root}")
        return 0
    for run in runs:
        try:
            records = load_run(run)
        except KtstrError as err:  # one bad run does not hide the others
            print(f"{run.name:<24} unreadable: {err}")
            continue
        verdicts = Counter(str(r.get("verdict", "?")) for r in records)
        kernels = sorted({str((r.get("kernel") or {}).get("id", "?")) for r in records})
        scheds = sorted({str((r.get("scheduler") or {}).get("name", "?")) for r in records})
        counts = " ".join(f"{v}={n}" for v, n in sorted(verdicts.items()))
        print(
            f"{run.name:<24} {len(records):>4} test(s)  {counts:<20} "
            f"kernel {','.join(kernels) or '-'}  sched {','.join(scheds) or '-'}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    run = resolve_run(args.run, args.root)
    records = load_run(run)
    if args.json:
        print(json.dumps(records, indent=1, sort_keys=True))
        return 0
    print(f"run {run.name}: {len(records)} result(s) in {run}")
    total = 0.0
    for r in records:
        wall = float((r.get("timings") or {}).get("wall_s") or 0.0)
        total += wall
        kernel = (r.get("kernel") or {}).get("version") or (r.get("kernel") or {}).get("id", "?")
        print(f"  {r.get('verdict') or '?':<6} {wall:7.1f}s  {result_key(r)}  kernel {kernel}")
        if r.get("verdict") not in ("pass", "skip") and r.get("reason"):
            print(f"         {str(r['reason']).splitlines()[0][:160]}")
        for check in r.get("checks") or []:
            if not check.get("passed", True):
                print(
                    f"         check {check.get('name')}: value {check.get('value')} "
                    f"threshold {check.get('threshold')} {check.get('detail') or ''}".rstrip()
                )
    print(f"total wall time {total:.1f}s")
    return 0


def _parse_abs(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise KtstrError(f"--abs {item!r}: expected METRIC=NUMBER, e.g. gap_ms=50") from None
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    if not 0 <= args.threshold < math.inf:  # NaN would never flag anything
        raise KtstrError(f"--threshold {args.threshold}: use a percentage >= 0")
    run_a = resolve_run(args.run_a, args.root)
    run_b = resolve_run(args.run_b, args.root)
    cmp = compare_runs(
        load_run(run_a), load_run(run_b), args.threshold / 100.0, _parse_abs(args.abs)
    )
    print(f"A = {run_a.name}  B = {run_b.name}  threshold {args.threshold:g}%")
    for line in format_comparison(cmp, show_all=args.all):
        print(line)
    if not cmp.deltas and not cmp.verdict_changes:
        print("warning: no common results to compare")
    return 1 if cmp.regressed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from ktstr.results.report import write_report

    run = resolve_run(args.run, args.root)
    path = write_report(run, args.output)
    print(f"report: {path}")
    return 0
