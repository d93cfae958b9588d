"""``ktstr stats``: list runs, show one, compare two, list the metrics, explain a result,
draw a report."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ktstr.errors import KtstrError
from ktstr.results.compare import (
    DEFAULT_ALPHA,
    Gates,
    check_comparable,
    compare_runs,
    comparison_json,
    context_lines,
    format_comparison,
)
from ktstr.results.metrics import (
    REGISTRY,
    check_status,
    get_metric,
    payload_metrics,
    repeats_of,
    significance_note,
    why_missing,
)
from ktstr.results.sidecar import (
    Record,
    list_runs,
    load_run,
    resolve_run,
    result_key,
    results_root,
)


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
        "compare", help="compare two runs metric by metric (Welch's t-test over the repeats, "
        "behind each metric's gates); exit 1 on regressions"
    )
    p.add_argument("run_a", help="baseline run (id, path, 'previous')")
    p.add_argument("run_b", help="candidate run (id, path, 'latest')")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help="significance level of the t-test (default %(default)s)")
    p.add_argument(
        "--fail-threshold", type=int, default=1, metavar="K",
        help="exit 1 when K or more metrics regressed significantly (default %(default)s)",
    )
    p.add_argument(
        "--must-not-regress", default="", metavar="METRIC,...",
        help="exit 1 if any of these metrics regressed, whatever --fail-threshold says",
    )
    p.add_argument(
        "--threshold", type=float, default=None, metavar="PCT",
        help="relative gate for every metric, in percent (default: each metric's own, "
        "see `ktstr stats metrics`)",
    )
    p.add_argument(
        "--abs", action="append", default=[], metavar="METRIC=VALUE",
        help="absolute gate for metrics whose name contains METRIC (repeatable)",
    )
    p.add_argument("--force", action="store_true",
                   help="compare the shared tests of runs whose tests or topologies differ")
    p.add_argument("--all", action="store_true", help="print unchanged metrics too")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_compare)

    p = ssub.add_parser("metrics", help="list the metrics compare gates, with units and gates")
    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    p.set_defaults(func=cmd_metrics)

    p = ssub.add_parser("explain", help="say why metrics or checks are missing from a result")
    p.add_argument("run", help="run id, path, 'latest' or 'previous'")
    p.add_argument("test", help="test id (or a part of it that names one result)")
    p.set_defaults(func=cmd_explain)

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
        timings = r.get("timings") or {}
        runs = len(repeats_of(r))
        # A repeated test's wall time is all its runs' (timings.wall_s is the one shown).
        wall = float(timings.get("total_wall_s" if runs > 1 else "wall_s")
                     or timings.get("wall_s") or 0.0)
        total += wall
        kernel = (r.get("kernel") or {}).get("version") or (r.get("kernel") or {}).get("id", "?")
        times = f"  x{runs}" if runs > 1 else ""
        print(f"  {r.get('verdict') or '?':<6} {wall:7.1f}s  {result_key(r)}  kernel "
              f"{kernel}{times}")
        if r.get("verdict") not in ("pass", "skip") and r.get("reason"):
            print(f"         {str(r['reason']).splitlines()[0][:160]}")
        for check in r.get("checks") or []:
            if not check.get("passed", True):
                print(
                    f"         check {check.get('name')}: value {check.get('value')} "
                    f"threshold {check.get('threshold')} {check.get('detail') or ''}".rstrip()
                )
        for line in (monitor_line(r.get("observer")), host_line(r)):
            if line:
                print(f"         {line}")
        values = _mapping(r.get("payload_metrics"))
        if values:
            print("         payloads: " + ", ".join(f"{k} {v:g}" for k, v in sorted(values.items())
                                                    if isinstance(v, int | float)))
    print(f"total wall time {total:.1f}s")
    return 0


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def host_line(record: Record) -> str:
    """What the host gave the run: vCPU dilation, and performance mode's pinning and pages."""
    parts = []
    dilation = _mapping(record.get("dilation"))
    if isinstance(dilation.get("mean"), int | float):
        parts.append(f"vCPU dilation {dilation['mean'] * 100:.1f}% mean, "
                     f"{float(dilation.get('max') or 0) * 100:.1f}% max")
    perf = _mapping(record.get("performance"))
    if perf:
        pinned = [c for c in perf.get("pinned") or [] if isinstance(c, int)]
        parts.append(f"performance mode: pinned to CPUs {pinned or 'none'}, RAM "
                     f"{perf.get('memory')}, exits off {perf.get('disabled_exits') or 'none'}"
                     + (f"; not given: {'; '.join(map(str, perf['missing']))}"
                        if perf.get("missing") else ""))
    overhead = _mapping(record.get("overhead"))
    steal = [float(v) for v in _mapping(overhead.get("steal_pct")).values()
             if isinstance(v, int | float)]
    if steal:
        parts.append(f"guest steal {min(steal):.0f}-{max(steal):.0f}% per CPU")
    if isinstance(overhead.get("harness_cpu_pct"), int | float):
        parts.append(f"harness {overhead['harness_cpu_pct']:.0f}% of one CPU")
    return "host: " + "; ".join(parts) if parts else ""


def monitor_line(observer: object) -> str:
    """One line of what the host-side monitor sampled (``observer`` of a sidecar)."""
    if not isinstance(observer, dict):
        return ""
    samples = _mapping(observer.get("samples"))
    cpus = _mapping(samples.get("cpus"))
    times = samples.get("t") if isinstance(samples.get("t"), list) else []
    if not times:
        problems = observer.get("problems") or []
        return f"monitor: no samples ({problems[0]})" if problems else ""

    def peak(field: str) -> int:
        return max((v for col in cpus.values() if isinstance(col, dict)
                    for v in col.get(field) or [] if isinstance(v, int)), default=0)

    cost = _mapping(observer.get("sample_cost"))
    stalls = [s for s in observer.get("stalls") or [] if isinstance(s, dict)]
    worst = (f"; longest runnable wait {stalls[0].get('comm')}[{stalls[0].get('pid')}] "
             f"{float(stalls[0].get('runnable_age_ms') or 0):.0f} ms on CPU "
             f"{stalls[0].get('cpu')}") if stalls else ""
    share = _mapping(observer.get("cost")).get("cpu_pct_of_vcpus")
    took = f", observer CPU {share:.2f}% of the vCPUs'" if isinstance(share, float) else ""
    return (f"monitor: {len(times)} samples over {len(cpus)} CPUs, peak nr_running "
            f"{peak('nr_running')}, peak local DSQ {peak('local_dsq_nr')}, sample "
            f"{cost.get('median_ms', '?')} ms median{took}{worst}")


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
    if args.threshold is not None and not 0 <= args.threshold < math.inf:  # NaN flags nothing
        raise KtstrError(f"--threshold {args.threshold}: use a percentage >= 0")
    if not 0 < args.alpha < 1:
        raise KtstrError(f"--alpha {args.alpha}: use a significance level between 0 and 1")
    if args.fail_threshold < 1:
        raise KtstrError(f"--fail-threshold {args.fail_threshold}: use a count >= 1")
    gates = Gates(None if args.threshold is None else args.threshold / 100.0,
                  _parse_abs(args.abs))
    run_a = resolve_run(args.run_a, args.root)
    run_b = resolve_run(args.run_b, args.root)
    records_a, records_b = load_run(run_a), load_run(run_b)
    extra = payload_metrics([*records_a, *records_b])
    must = [get_metric(n.strip(), extra).name for n in args.must_not_regress.split(",")
            if n.strip()]
    cmp = compare_runs(records_a, records_b, args.alpha, gates)
    check_comparable(cmp, args.force)
    failures = cmp.failures(args.fail_threshold, must)
    if args.json:
        print(json.dumps({**comparison_json(cmp), "failures": failures}, indent=1))
        return 1 if failures else 0
    gate = "registry gates" if args.threshold is None else f"relative gate {args.threshold:g}%"
    print(f"A = {run_a.name}  B = {run_b.name}  alpha {args.alpha:g}, {gate}")
    for line in [*context_lines(records_a, records_b), *format_comparison(cmp, args.all)]:
        print(line)
    for why in failures:
        print(f"FAIL: {why}")
    return 1 if failures else 0


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([m.to_dict() for m in REGISTRY], indent=1))
        return 0
    print(f"{'metric':<24} {'unit':<8} {'direction':<17} {'abs gate':>9} {'rel gate':>8}  "
          "source / meaning")
    for m in REGISTRY:
        print(f"{m.name:<24} {m.unit:<8} {m.direction.text:<17} {m.abs_gate:>9g} "
              f"{m.rel_gate * 100:>7g}%  {m.source}: {m.description}")
    return 0


def _find_result(records: list[Record], test: str, run: Path) -> Record:
    exact = [r for r in records if test in (r.get("test"), result_key(r))]
    found = exact or [r for r in records if test in result_key(r)]
    if len(found) == 1:
        return found[0]
    names = ", ".join(result_key(r) for r in (found or records)[:5]) or "none"
    if found:
        raise KtstrError(f"{test!r} names {len(found)} results in {run.name}: {names}; "
                         "give more of the test id")
    raise KtstrError(f"no result for {test!r} in {run.name} (results: {names})")


def cmd_explain(args: argparse.Namespace) -> int:
    run = resolve_run(args.run, args.root)
    record = _find_result(load_run(run), args.test, run)
    n = len(repeats_of(record))
    print(f"{result_key(record)}: verdict {record.get('verdict', '?')}, {n} run(s)")
    if note := significance_note(record):
        print(f"  note: {note}")
    print("metrics:")
    for metric in REGISTRY:
        why = why_missing(metric, record)
        values = metric.samples(record)
        if why is None:
            shown = ", ".join(f"{v:.4g}" for v in values[:5]) + (", ..." if n > 5 else "")
            print(f"  {metric.name:<24} present: {shown} {metric.unit}")
        else:
            print(f"  {metric.name:<24} missing: {why}")
    print("checks:")
    for name, what in check_status(record):
        print(f"  {name:<24} {what}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ktstr.results.report import write_report

    run = resolve_run(args.run, args.root)
    path = write_report(run, args.output)
    print(f"report: {path}")
    return 0
