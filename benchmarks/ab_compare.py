"""Does `ktstr stats compare` find a real difference, and stay quiet when there is none?

Runs one VM test through pytest with ``--ktstr-repeat``, as a user would: ``--pool``
runs under scheduler A (one run directory) and ``--repeats`` runs under scheduler B
(another). Then:

- **A/B**: ``ktstr stats compare --all`` of A's run directory (the whole pool) against
  B's, exactly as a user runs it, printed with its exit code;
- **A/A**: ``--aa-tries`` comparisons of two disjoint, randomly drawn (seeded)
  ``--repeats``-run halves of A's pool. A try that reports any significant
  regression is a false alarm. The tries share one pool, so they are not
  independent samples of the false-alarm rate; the seeded unit tests
  (``tests/unit/test_stats_compare.py``) measure it over independent synthetic pairs.

Needs usable KVM: run it inside the sandbox.

    python -m ktstr sandbox run -- python3 benchmarks/ab_compare.py \
        [--a scx_simple] [--b eevdf] [--repeats 5] [--pool 10] [--aa-tries 10] [--json]
    # payload metrics of two schedulers, no A/A:
    ... ab_compare.py --test tests/vm/test_payloads.py --a eevdf --b scx_simple \
        --repeats 2 --pool 2 --aa-tries 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.results.compare import Status, compare_runs
from ktstr.results.metrics import repeats_of
from ktstr.results.sidecar import RESULTS_DIR_ENV, Record, load_run
from ktstr.runid import RUN_ID_ENV

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEST = "tests/vm/test_scheduling.py::test_steady"


def run_repeated(test: str, kernel: str, scheduler: str, repeats: int, root: Path,
                 run: str) -> tuple[list[Record], float]:
    """One pytest run of ``test`` with ``--ktstr-repeat``: its records and wall time."""
    env = {**os.environ, RESULTS_DIR_ENV: str(root), RUN_ID_ENV: run}
    argv = [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider",
            "--ktstr-kernel", kernel, "--ktstr-scheduler", scheduler,
            "--ktstr-repeat", str(repeats), "--ktstr-repro", "never"]
    print(f"$ {' '.join(argv[1:])}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, check=False)
    wall = time.monotonic() - t0
    records = load_run(root / run) if (root / run).is_dir() else []
    if proc.returncode != 0 or not records:
        raise SystemExit(f"{scheduler}: pytest exited {proc.returncode} with "
                         f"{len(records)} result(s); see the output above")
    return records, wall


def with_runs(records: list[Record], picks: list[int]) -> list[Record]:
    """``records`` keeping only the repeats at ``picks`` (indices into each's repeats)."""
    out = []
    for record in records:
        runs = repeats_of(record)
        out.append({**record, "repeats": [runs[i] for i in picks if i < len(runs)]})
    return out


def compare_cli(root: Path, a: str, b: str, *options: str) -> tuple[int, str]:
    """``ktstr stats compare`` as a user runs it: its exit code and output."""
    proc = subprocess.run([sys.executable, "-m", "ktstr", "stats", "--root", str(root),
                           "compare", a, b, *options], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", default=DEFAULT_TEST)
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--a", default="scx_simple", help="baseline scheduler (the A/A pool)")
    ap.add_argument("--b", default="eevdf", help="candidate scheduler")
    ap.add_argument("--repeats", type=int, default=5, help="runs per side of a comparison")
    ap.add_argument("--pool", type=int, default=10, help="runs under A (>= 2 x --repeats)")
    ap.add_argument("--aa-tries", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "ktstr-results" / "ab-compare",
                    help="results root; each benchmark run adds two run directories")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.repeats < 1 or args.pool < args.repeats * (2 if args.aa_tries else 1):
        ap.error("need --repeats >= 1 and --pool >= --repeats (2 x --repeats for A/A tries: "
                 "two disjoint halves of the pool)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_a, run_b = f"{stamp}-A-{args.a}", f"{stamp}-B-{args.b}"
    pool, wall_a = run_repeated(args.test, args.kernel, args.a, args.pool, args.out, run_a)
    _, wall_b = run_repeated(args.test, args.kernel, args.b, args.repeats, args.out, run_b)

    rc, cli_text = compare_cli(args.out, run_a, run_b, "--json" if args.json else "--all")

    rng = random.Random(args.seed)
    tries = []
    for i in range(args.aa_tries):
        picks = rng.sample(range(args.pool), 2 * args.repeats)
        left, right = sorted(picks[:args.repeats]), sorted(picks[args.repeats:])
        cmp = compare_runs(with_runs(pool, left), with_runs(pool, right))
        tries.append({"try": i + 1, "a": left, "b": right,
                      "regressions": [r.metric.name for r in cmp.regressions],
                      "improvements": [r.metric.name for r in cmp.results
                                       if r.status is Status.IMPROVED],
                      "metrics": len(cmp.results)})
    alarms = sum(bool(t["regressions"]) for t in tries)
    summary = {
        "test": args.test, "a": args.a, "b": args.b, "repeats": args.repeats,
        "pool": args.pool, "wall_s": {"a": round(wall_a, 1), "b": round(wall_b, 1)},
        "ab": {"cli_exit": rc, "output": cli_text},
        "aa": {"tries": tries, "false_alarms": alarms,
               "metric_false_alarms": sum(len(t["regressions"]) for t in tries),
               "metrics_compared": sum(t["metrics"] for t in tries)},
        "runs": [str(args.out / run_a), str(args.out / run_b)],
    }
    if args.json:
        with contextlib.suppress(ValueError):  # a refusal is one line of text, not JSON
            summary["ab"]["output"] = json.loads(cli_text)
        print(json.dumps(summary, indent=1))
        return 0
    print(f"\n== A/B: {args.a} ({args.pool} runs) vs {args.b} ({args.repeats}); "
          f"`ktstr stats compare --all` exited {rc}")
    print(cli_text.rstrip())
    if not tries:
        return 0
    print(f"\n== A/A: {args.aa_tries} tries of {args.repeats} vs {args.repeats} disjoint runs "
          f"of {args.a}'s pool of {args.pool} (seed {args.seed})")
    for t in tries:
        flag = f"FALSE ALARM: {', '.join(t['regressions'])}" if t["regressions"] else "quiet"
        print(f"  try {t['try']:2}: {t['metrics']} metrics, {flag}")
    print(f"false alarms: {alarms}/{args.aa_tries} tries, "
          f"{summary['aa']['metric_false_alarms']}/{summary['aa']['metrics_compared']} metric "
          f"comparisons; pytest wall {wall_a:.0f} s ({args.pool} runs) + {wall_b:.0f} s "
          f"({args.repeats} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
