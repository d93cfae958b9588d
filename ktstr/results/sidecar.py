"""JSON sidecars: one file per VM test, grouped by run under ``ktstr-results/<run-id>/``.

A sidecar is a plain dict (schema below) so that other tools can read it
without importing ktstr. This module holds the schema, the builder
(:func:`sidecar_record`, :func:`repeated_record`), the writer and the readers. Keys:

``schema``, ``run_id``, ``test`` (pytest node id), ``kernel`` {spec, bzimage, id,
version, key, sched_ext}, ``scheduler`` {name, profile, flags, args, binary,
watchdog_timeout_s, attach_attempts}, ``topology`` (label), ``nr_cpus``,
``memory_mb`` (what the guest booted with), ``duration_s``, ``expect_err``,
``verdict`` (pass | fail | error | skip), ``reason``, ``failure_kind``, ``checks``
[{name, passed, value, threshold, detail, worker}], ``metrics`` {cgroups: {name:
{...}}, workers: [{cgroup, worker, ...}]}, ``summary`` {metric: number} (what
``stats compare`` diffs), ``timeline`` (optional samples for the report),
``scheduler_exit``, ``dilation`` {per_vcpu, mean, max} (host time each vCPU thread waited
runnable, as a share of the run), ``performance`` (performance mode: what the host gave,
``PerformanceApplied.to_record``), ``console_tail`` (on failure), ``timings`` {started, finished,
wall_s, boot_ms, vm_s, disks_s, prep_s, vm_run_s, resolve_s, guest_s {hello, sched_attached,
scenario_start, scenario_end, end}: host seconds since VM start, guest_steps_s {mounts,
channel, request, attach, disks, import, setup}: the guest's start-up steps}, ``host`` {cpu_model,
nr_cpus, loadavg, kernel_release, ktstr_version, sandbox} (where it ran).

A test run N > 1 times (``--ktstr-repeat``) adds ``repeats`` [{repeat, verdict,
reason, failure_kind, summary, timings}] (every run's numbers), ``repeat_summary``
{metric: {n, mean, stddev, min, max}} over the registry metrics, and
``repeat_shown`` (which repeat the top-level telemetry, checks and console are
from: the first that failed, else the last). The top level keeps the one-run
shape, so readers that predate repeats see one real run; ``verdict`` fails if
any repeat failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from ktstr.errors import KtstrError
from ktstr.runid import UNSAFE, run_id
from ktstr.vmm.threadtime import mean_dilation

if TYPE_CHECKING:
    from ktstr.checks import CheckResult
    from ktstr.runner import GuestRun
    from ktstr.testing.run import Attempt, RunPlan, Verdict

SCHEMA_VERSION = 1
RESULTS_DIR_ENV = "KTSTR_RESULTS_DIR"
DEFAULT_RESULTS_DIR = "ktstr-results"

Record = dict[str, Any]


# Telemetry field names by what "worse" means; used to pick how to aggregate.
LOWER_IS_BETTER = ("gap", "latency", "lat_", "_lat", "stall", "starv", "spread", "off_cpu",
                   "wait", "delay", "imbalance", "cv", "violation")
HIGHER_IS_BETTER = ("work", "iterations", "ops", "rate", "throughput", "loops", "progress")


def results_root() -> Path:
    """``$KTSTR_RESULTS_DIR``, else ``./ktstr-results``."""
    return Path(os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR).expanduser()


def check_results_root(root: Path | None = None) -> Path:
    """``root`` (default `results_root`) or its nearest existing ancestor is a writable
    directory; else a `KtstrError` saying where results can go. Run before any VM boots,
    so that a run is never lost at its first sidecar."""
    root = (root or results_root()).absolute()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "not a directory" if not existing.is_dir() else "not writable"
        raise KtstrError(
            f"results directory {root}: {existing} is {reason}; set {RESULTS_DIR_ENV} to a "
            "writable directory (inside `ktstr sandbox run` only the checkout and the "
            "cache are writable)")
    return root


def sidecar_name(test: str, scheduler: str = "", profile: str = "", topology: str = "") -> str:
    """A readable file name, distinct for every (test, scheduler, profile, topology).

    Sanitizing maps many ids to one text (``t[a/b]`` and ``t[a b]`` both read
    ``t_a_b_``), so a short hash of the exact identity follows it. Readers
    take identity from the content, so older names without it still load.
    """
    readable = "__".join(p for p in (test, scheduler, profile, topology) if p)
    readable = UNSAFE.sub("_", readable).strip("_").lstrip(".")[:180] or "result"
    ident = json.dumps([test, scheduler, profile, topology]).encode()
    return f"{readable}-{hashlib.sha256(ident).hexdigest()[:12]}.json"


def artifact_dir(test: str, scheduler: str = "", profile: str = "", topology: str = "",
                 run: str | None = None, root: Path | None = None) -> Path:
    """A fresh directory beside the sidecar of (test, scheduler, profile, topology) for
    its files (failure dump, trace): ``<stem>.files``, then ``<stem>.files-2``, ... per run."""
    stem = sidecar_name(test, scheduler, profile, topology).removesuffix(".json")
    parent = (root or results_root()) / (run or run_id())
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = parent / (f"{stem}.files" if n == 1 else f"{stem}.files-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise KtstrError(f"too many file directories of {test} in {parent}")


def result_key(record: Mapping[str, Any]) -> str:
    """Identity of a result across runs: test, scheduler@profile, topology."""
    sched = record.get("scheduler") or {}
    return (
        f"{record.get('test', '?')} [{sched.get('name', '?')}@{sched.get('profile', 'default')}"
        f" {record.get('topology', '?')}]"
    )


def write_sidecar(record: Record, run: str | None = None, root: Path | None = None) -> Path:
    """Write ``record`` atomically into the run directory; returns its path."""
    run = run or record.get("run_id") or run_id()
    record = {"schema": SCHEMA_VERSION, "run_id": run, **record}
    directory = (root or results_root()) / run
    directory.mkdir(parents=True, exist_ok=True)
    sched = record.get("scheduler") or {}
    name = sidecar_name(
        str(record.get("test", "unnamed")),
        str(sched.get("name", "")),
        str(sched.get("profile", "")),
        str(record.get("topology", "")),
    )
    fd, tmp = tempfile.mkstemp(prefix=".sidecar-", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=1, sort_keys=True, default=_json_default)
            fh.write("\n")
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / name


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return str(value)


def file_digest(path: Path) -> str | None:
    """sha256 of a file (the test module a sidecar came from), None if unreadable."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def sidecar_record(plan: RunPlan, verdict: Verdict, run: GuestRun, started: float,
                   finished: float) -> Record:
    """The sidecar of one run of ``plan`` (before :func:`write_sidecar` adds the schema)."""
    from ktstr.console import tail_lines
    from ktstr.telemetry import telemetry_of

    telemetry = telemetry_of(run.result)
    workers = telemetry.get("workers") or []
    cgroups = telemetry.get("cgroups") or []
    spec = plan.scheduler_spec
    kernel = plan.kernel
    return {
        "test": plan.test_id,
        "test_file": {"path": str(plan.test_file), "sha256": file_digest(plan.test_file)},
        "kernel": {
            "spec": plan.kernel_spec, "bzimage": str(kernel.bzimage),
            **({"id": kernel.entry.id, "version": kernel.entry.version, "key": kernel.entry.key,
                "sched_ext": kernel.entry.sched_ext} if kernel.entry is not None else {}),
        },
        "scheduler": {
            "name": plan.scheduler.name,
            "profile": plan.profile.name,
            "flags": list(plan.profile.flags),
            "args": plan.scheduler.command_args(plan.profile),
            "binary": str(plan.scheduler_binary) if plan.scheduler_binary else None,
            "watchdog_timeout_s": spec.watchdog_timeout_ms / 1000
            if spec is not None and spec.watchdog_timeout_ms else None,
            "attach_attempts": run.attach_attempts,
        },
        "topology": plan.topology.label,
        "nr_cpus": plan.topology.nr_cpus,
        "memory_mb": run.memory_mb,
        "reservation": run.reservation or None,
        "duration_s": plan.spec.duration,
        "expect_err": plan.spec.expect_err,
        "verdict": verdict.status,
        "reason": verdict.reason,
        "failure_kind": run.failure,
        "checks": [check_row(c) for c in verdict.checks],
        "metrics": {
            "cgroups": {str(c.get("name", i)): c for i, c in enumerate(cgroups)
                        if isinstance(c, Mapping)},
            "workers": workers,
        },
        "summary": summarize_workers(w for w in workers if isinstance(w, Mapping)),
        **payload_sections(telemetry.get("payloads")),
        "phases": [p for p in telemetry.get("phases") or [] if isinstance(p, Mapping)] or None,
        "notes": [str(n) for n in telemetry.get("notes") or []][:200] or None,
        "timeline": telemetry.get("timeline"),
        "overhead": overhead if isinstance(overhead := telemetry.get("overhead"), Mapping)
        else None,
        "scheduler_exit": run.sched_exit,
        "observer": run.observation.to_record() if run.observation is not None else None,
        "trace": run.trace.record() if run.trace is not None else None,
        "dilation": dilation_record(run.vm.vcpu_dilation),
        "performance": run.vm.performance,
        "console_tail": tail_lines(run.vm.console)
        if not verdict.passed or plan.spec.expect_err else None,
        "timings": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
            "wall_s": round(finished - started, 3),
            "boot_ms": run.timings.get("boot_ms"),
            "vm_s": run.vm.duration_s,
            **{k: round(run.timings[k], 3) for k in ("disks_s", "prep_s", "vm_run_s", "dump_s")
               if k in run.timings},
            "guest_s": {k: round(run.timings[k], 3) for k in GUEST_MARKS if k in run.timings}
            or None,
            "guest_steps_s": {k: round(v, 3) for k, v in run.startup_steps.items()} or None,
            **plan.phases,
        },
        "host": host_context(),
    }


GUEST_MARKS = ("hello", "sched_attached", "scenario_start", "scenario_end", "end")
"""Guest messages whose arrival (host seconds since VM start) ``timings.guest_s`` keeps: the
run's phases inside the VM (init running, scheduler attached, scenario, shutdown)."""


def dilation_record(per_vcpu: Sequence[float | None]) -> dict[str, Any] | None:
    """``dilation`` {per_vcpu, mean, max}: the share of the run each vCPU's host thread was
    runnable but not running (None where the host could not say)."""
    mean = mean_dilation(list(per_vcpu))
    if mean is None:
        return None
    return {"per_vcpu": [None if d is None else round(d, 4) for d in per_vcpu],
            "mean": round(mean, 4), "max": round(max(d for d in per_vcpu if d is not None), 4)}


def check_row(check: CheckResult) -> dict[str, Any]:
    """A check as the sidecar keeps it (``detail`` is the check's message)."""
    return {"name": check.name, "passed": check.passed, "value": check.value,
            "threshold": check.threshold, "detail": check.message, "worker": check.worker}


def combined_record(plan: RunPlan, attempts: Sequence[Attempt], verdict: Verdict,
                    shown: int) -> Record:
    """The sidecar of a test run ``len(attempts)`` times: one run's shape at the top
    level (the representative repeat ``shown``), every run's numbers under ``repeats``;
    ``verdict`` is the combined one (``testing.run.combined_verdict``)."""
    # Imported here: metrics reads sidecars and testing.run writes them (both import this).
    from ktstr.results.metrics import repeat_summary

    records = [sidecar_record(plan, a.verdict, a.run, a.started, a.finished) for a in attempts]
    if len(records) == 1:
        return records[0]
    record = dict(records[shown])
    record.update(
        verdict=verdict.status,
        reason=verdict.reason,
        repeat_shown=shown + 1,
        repeats=[
            {"repeat": i, "verdict": r["verdict"], "reason": r["reason"],
             "failure_kind": r["failure_kind"], "summary": r["summary"], "timings": r["timings"],
             **({"payload_metrics": r["payload_metrics"]} if "payload_metrics" in r else {})}
            for i, r in enumerate(records, 1)
        ],
        repeat_summary=repeat_summary(records),
    )
    record["timings"] = {
        **record["timings"],
        "total_wall_s": round(sum(a.finished - a.started for a in attempts), 3),
    }
    return record


def host_context() -> dict[str, Any]:
    """Where a result was measured, for ``stats compare`` to print what differs."""
    import ktstr
    from ktstr.sandbox.detect import in_sandbox

    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": _cpu_model(),
        "nr_cpus": os.cpu_count(),
        "loadavg": load,
        "kernel_release": os.uname().release,
        "ktstr_version": ktstr.__version__,
        "sandbox": in_sandbox(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return None


def list_runs(root: Path | None = None) -> list[Path]:
    """Run directories, oldest first (run ids are sortable timestamps by default)."""
    base = root or results_root()
    if not base.is_dir():
        if base.exists():
            raise KtstrError(f"results root {base} is not a directory")
        return []
    stamped: list[tuple[float, str, Path]] = []
    for path in base.iterdir():
        try:
            st = path.stat()
        except OSError:  # removed while listing
            continue
        if stat.S_ISDIR(st.st_mode) and not path.name.startswith("."):
            stamped.append((st.st_mtime, path.name, path))
    return [path for *_, path in sorted(stamped)]


def resolve_run(spec: str, root: Path | None = None) -> Path:
    """A run directory from a run id, a path, ``latest`` or ``previous``."""
    base = root or results_root()
    if spec in ("latest", "previous"):
        runs = list_runs(base)
        need = 1 if spec == "latest" else 2
        if len(runs) < need:
            raise KtstrError(
                f"no {spec} run under {base} ({len(runs)} run(s)); run the VM tests first"
            )
        return runs[-need]
    for candidate in (Path(spec).expanduser(), base / spec):
        if candidate.is_dir():
            return candidate
        if candidate.exists():
            raise KtstrError(f"run {spec!r}: {candidate} is not a directory of results")
    known = ", ".join(p.name for p in list_runs(base)[-5:]) or "none"
    raise KtstrError(f"run {spec!r} not found under {base} (recent runs: {known})")


def is_number(value: object) -> TypeGuard[int | float]:
    """A JSON number (bool is an int in Python, not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _objects(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def record_problem(data: object) -> str | None:
    """Why ``data`` is not a sidecar the readers can use, or None.

    The one check of a sidecar's shape: every field that ``stats`` and the
    report read as an object, a list or a number is checked here, so they
    can read it without guarding each access.
    """
    if not isinstance(data, dict) or not isinstance(data.get("test"), str):
        return "not a ktstr sidecar (no 'test' string)"
    for key in ("kernel", "scheduler", "timings", "summary", "metrics", "timeline", "host",
                "repeat_summary", "payload_metrics", "payload_metric_specs", "trace",
                "overhead"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"{key!r} must be an object"
    for key in ("verdict", "reason"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"{key!r} must be a string"
    for key in ("checks", "host_faults", "payloads", "phases"):
        if data.get(key) is not None and not _objects(data[key]):
            return f"{key!r} must be a list of objects"
    repeats = data.get("repeats")
    if repeats is not None:
        if not _objects(repeats):
            return "'repeats' must be a list of objects"
        for i, run in enumerate(repeats, 1):
            for key in ("summary", "timings", "payload_metrics"):
                if run.get(key) is not None and not isinstance(run[key], dict):
                    return f"repeats[{i}].{key} must be an object"
    metrics = data.get("metrics") or {}
    if metrics.get("workers") is not None and not _objects(metrics["workers"]):
        return "metrics.workers must be a list of objects"
    for key in ("wall_s", "total_wall_s"):
        wall = (data.get("timings") or {}).get(key)
        if wall is not None and not (is_number(wall) and math.isfinite(wall)):
            return f"timings.{key} must be a number"
    timeline = data.get("timeline") or {}
    interval = timeline.get("interval_ms")
    if interval is not None and not (is_number(interval) and 0 < interval < math.inf):
        return "timeline.interval_ms must be a number above 0"
    for key in ("workers", "cpus"):
        if timeline.get(key) is not None and not isinstance(timeline[key], dict):
            return f"timeline.{key} must be an object"
    return None


def read_sidecar(path: Path) -> Record:
    """One sidecar file, checked against the schema; KtstrError saying what is wrong."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8
        reason = err.strerror if isinstance(err, OSError) else str(err)[:200]
        raise KtstrError(f"{path}: not a readable sidecar ({reason}); delete or fix it") \
            from None
    if problem := record_problem(data):
        raise KtstrError(f"{path}: {problem}; delete or fix it")
    data.setdefault("_path", str(path))
    return data


def load_run(run_dir: Path) -> list[Record]:
    """Every sidecar in ``run_dir``, sorted by result key."""
    if not run_dir.is_dir():
        raise KtstrError(f"{run_dir} is not a results directory")
    return sorted((read_sidecar(path) for path in sorted(run_dir.glob("*.json"))),
                  key=result_key)


def passed_tests(run_dir: Path) -> set[str]:
    """Test ids with a passing sidecar in ``run_dir`` (none when it does not exist yet);
    unreadable files are skipped: a resumed run must not stop on a half-lost one."""
    passed: set[str] = set()
    for path in sorted(run_dir.glob("*.json")) if run_dir.is_dir() else ():
        with contextlib.suppress(KtstrError):
            if (data := read_sidecar(path)).get("verdict") == "pass":
                passed.add(data["test"])
    return passed


NEUTRAL = frozenset({"workers", "nr_workers", "cpus", "nr_cpus"})


def metric_direction(field: str) -> int:
    """-1 when smaller values are better, +1 when larger are better, 0 when neutral."""
    name = field.lower().split(".")[0]
    if name in NEUTRAL:
        return 0
    if any(tag in name for tag in LOWER_IS_BETTER):
        return -1
    if any(tag in name for tag in HIGHER_IS_BETTER):
        return 1
    return 0


_IDENTITY_FIELDS = frozenset({"pid", "tid", "worker", "index", "cpu", "id", "nice", "priority"})


def _flatten(row: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Nested telemetry (``wake_latency: {p99_us: ..}``) as ``wake_latency_p99_us``."""
    for key, value in row.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}_")
        else:
            yield f"{prefix}{key}", value


def payload_sections(payloads: object) -> dict[str, Any]:
    """``payloads`` (each run: argv, exit, metrics, error) and ``payload_metrics``
    (``LABEL.METRIC``: number, the values ``stats compare`` gates on, with their unit and
    direction in ``payload_metric_specs``); nothing when the scenario ran no payload."""
    runs = [p for p in payloads if isinstance(p, Mapping)] if isinstance(payloads, list) else []
    if not runs:
        return {}
    values: dict[str, float] = {}
    specs: dict[str, dict[str, Any]] = {}
    for run in runs:
        metrics = run.get("metrics")
        if not isinstance(metrics, Mapping):
            continue
        units = run.get("units")
        units = units if isinstance(units, Mapping) else {}
        better = run.get("higher_is_better")
        better = better if isinstance(better, Mapping) else {}
        for name, value in metrics.items():
            if is_number(value):
                key = f"{run.get('label')}.{name}"
                values[key] = float(value)
                specs[key] = {"unit": str(units.get(name, "")),
                              "higher_is_better": bool(better.get(name, False))}
    return {"payloads": runs, "payload_metrics": values, "payload_metric_specs": specs}


def summarize_workers(workers: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Aggregate per-worker telemetry into the run-comparable summary.

    Lower-is-better fields (gaps, latencies) keep their worst value (``.max``);
    higher-is-better fields (work) keep the total and the weakest worker
    (``.sum``, ``.min``), since starvation shows in the minimum; others sum.
    """
    columns: dict[str, list[float]] = {}
    count = 0
    for worker in workers:
        count += 1
        for key, value in _flatten(worker):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in _IDENTITY_FIELDS:
                continue
            columns.setdefault(key, []).append(float(value))
    summary: dict[str, float] = {"workers": float(count)} if count else {}
    for key, values in sorted(columns.items()):
        direction = metric_direction(key)
        if direction < 0:
            summary[f"{key}.max"] = max(values)
        elif direction > 0:
            summary[f"{key}.sum"] = sum(values)
            summary[f"{key}.min"] = min(values)
        else:
            summary[f"{key}.sum"] = sum(values)
    return summary
