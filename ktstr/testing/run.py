"""One VM test, host side: boot, run the scenario in the guest, judge, write the sidecar.

Kept apart from the pytest plugin so the flow (resolve -> boot -> checks ->
verdict -> sidecar) reads top to bottom and the verdict logic is a pure
function of the guest outcome.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktstr.hostfault import HostFault
from ktstr.results.metrics import repeat_summary
from ktstr.results.sidecar import host_context, summarize_workers, write_sidecar
from ktstr.scheduler import FlagProfile, Scheduler
from ktstr.testing.decorator import KtstrTestSpec
from ktstr.topology import Topology

CONSOLE_TAIL_LINES = 40
CONSOLE_TAIL_MARK = "\nconsole tail:"
"""Where ktstr.runner appends the console to a failure message (timeouts, crashes)."""


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    value: Any = None
    threshold: Any = None
    detail: str = ""
    worker: str | None = None

    def line(self) -> str:
        who = f" {self.worker}:" if self.worker else ""
        nums = ""
        if self.value is not None or self.threshold is not None:
            nums = f" value {self.value} (threshold {self.threshold})"
        return f"check {self.name}{who}{nums} {self.detail}".rstrip()


@dataclass
class GuestOutcome:
    """What came back from the guest, normalised from the runtime's result object."""

    ok: bool
    """The guest ran the scenario to completion (no crash, timeout or scheduler failure)."""
    failure_kind: str | None = None
    failure_message: str = ""
    result: Any = None
    reports: list[Any] = field(default_factory=list)
    sched_exit: Any = None
    console: str = ""
    boot_ms: float | None = None
    vm_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    """Host seconds: ``disks_s`` (per-test disks), ``prep_s`` (initramfs, VM set-up),
    ``vm_run_s`` (vm.run(), of which ``vm_s`` is the guest running)."""
    attach_attempts: list[dict[str, Any]] = field(default_factory=list)
    """Failed scheduler attach attempts before the one that attached (or the last)."""


@dataclass
class Verdict:
    passed: bool
    status: str  # pass | fail | error
    reason: str
    checks: list[CheckOutcome] = field(default_factory=list)


def console_tail(console: str | bytes, lines: int = CONSOLE_TAIL_LINES) -> str:
    text = console.decode(errors="replace") if isinstance(console, bytes) else console
    return "\n".join(text.rstrip().splitlines()[-lines:])


def telemetry_of(result: Any) -> dict[str, Any]:
    """The scenario telemetry inside a guest result (a ScenarioResult dict or a wrapper)."""
    if not isinstance(result, Mapping):
        return {}
    for key in ("telemetry", "scenario", "result"):
        inner = result.get(key)
        if isinstance(inner, Mapping) and ("workers" in inner or "cgroups" in inner):
            return dict(inner)
    return dict(result) if ("workers" in result or "cgroups" in result) else {}


def checks_from_result(result: Any) -> list[CheckOutcome] | None:
    """Check outcomes the guest already evaluated (an AssertResult dict), if any."""
    if not isinstance(result, Mapping):
        return None
    raw = result.get("checks")
    if raw is None and result.get("kind") == "assert_result":
        raw = result.get("results") or []
        if not raw and not result.get("passed", True):
            raw = [str(d) for d in result.get("details") or ["the scenario reported failure"]]
    if not isinstance(raw, list):
        if "passed" in result and isinstance(result.get("passed"), bool):
            return [CheckOutcome("scenario", bool(result["passed"]),
                                 detail=str(result.get("message") or result.get("reason") or ""))]
        return None
    out: list[CheckOutcome] = []
    for item in raw:
        if isinstance(item, Mapping):
            out.append(CheckOutcome(
                name=str(item.get("name") or item.get("check") or "check"),
                passed=bool(item.get("passed", False)),
                value=item.get("value"),
                threshold=item.get("threshold"),
                detail=str(item.get("detail") or item.get("message") or ""),
                worker=item.get("worker"),
            ))
        elif isinstance(item, str):
            out.append(CheckOutcome("check", False, detail=item))
    return out


def judge(
    outcome: GuestOutcome, checks: Sequence[CheckOutcome], expect_err: bool | str
) -> Verdict:
    """Pass/fail from the guest outcome and the check results; ``expect_err`` inverts it."""
    failed = [c for c in checks if not c.passed]
    if not outcome.ok:
        kind = outcome.failure_kind or "error"
        reason = f"{kind}: {outcome.failure_message}".rstrip(": ")
    elif failed:
        reason = "; ".join(c.line() for c in failed)
    else:
        reason = ""
    run_failed = bool(reason)
    if expect_err:
        if run_failed and isinstance(expect_err, str):
            # Match what failed the run, and only that: the guest's classified failure
            # with the scheduler's exit report, or (if the guest run itself was fine)
            # the failed checks. A console full of unrelated noise (the tail a timeout
            # or a crash carries) must not satisfy the expectation.
            if not outcome.ok:
                message = outcome.failure_message.split(CONSOLE_TAIL_MARK, 1)[0]
                text = f"{outcome.failure_kind or ''}\n{message}"
            else:
                text = "\n".join(c.line() for c in failed)
            if not re.search(expect_err, text, re.IGNORECASE):
                return Verdict(
                    False, "fail",
                    f"failed, but not as expected (wanted /{expect_err}/): {reason}",
                    list(checks),
                )
        if run_failed:
            return Verdict(True, "pass", f"failed as expected ({reason})", list(checks))
        return Verdict(
            False, "fail",
            "expect_err=True but the run succeeded: no scheduler error, stall or failed check",
            list(checks),
        )
    if run_failed:
        return Verdict(False, "fail" if outcome.ok or failed else "error", reason, list(checks))
    return Verdict(True, "pass", "", list(checks))


def format_failure(
    title: str, verdict: Verdict, outcome: GuestOutcome, sidecar: Path | None
) -> str:
    lines = [f"{title}: {verdict.reason}"]
    for check in verdict.checks:
        if not check.passed:
            lines.append(f"  {check.line()}")
    if outcome.sched_exit:
        lines.append(f"  scheduler exit: {_one_line(outcome.sched_exit)}")
    for attempt in outcome.attach_attempts:
        lines.append(f"  attach attempt {attempt.get('attempt')}: {attempt.get('kind')}: "
                     f"{attempt.get('message')}")
    if outcome.console:
        lines.append(f"--- console tail (last {CONSOLE_TAIL_LINES} lines) ---")
        lines.append(console_tail(outcome.console))
    if sidecar is not None:
        lines.append(f"(result: {sidecar})")
    return "\n".join(lines)


def _one_line(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, "", [], {}))
    return str(value).replace("\n", " | ")


@dataclass
class RunPlan:
    """A fully resolved VM test: what to boot and with what."""

    test_id: str
    spec: KtstrTestSpec
    test_file: Path
    kernel_path: Path
    kernel_info: dict[str, Any]
    kernel_entry: Any
    scheduler: Scheduler
    profile: FlagProfile
    scheduler_binary: Path | None
    topology: Topology
    extra_args: Sequence[str] = ()
    test_files: Sequence[Path] = ()
    """More modules for the shared base initramfs (the session's VM test files)."""
    binaries: Sequence[Path] = ()
    """More executables for the shared base initramfs (the kernel's schedulers)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Host seconds spent before boot (``resolve_s``: KVM check, kernel, scheduler)."""

    @property
    def watchdog_timeout(self) -> float | None:
        if not self.scheduler.sched_ext:
            return None
        return self.spec.watchdog_timeout or self.scheduler.watchdog_timeout


def sidecar_record(
    plan: RunPlan, verdict: Verdict, outcome: GuestOutcome, started: float, finished: float
) -> dict[str, Any]:
    telemetry = telemetry_of(outcome.result)
    workers = telemetry.get("workers") or []
    cgroups = telemetry.get("cgroups") or []
    return {
        "test": plan.test_id,
        "kernel": plan.kernel_info,
        "scheduler": {
            "name": plan.scheduler.name,
            "profile": plan.profile.name,
            "flags": list(plan.profile.flags),
            "args": plan.scheduler.command_args(plan.profile),
            "binary": str(plan.scheduler_binary) if plan.scheduler_binary else None,
            "watchdog_timeout_s": plan.watchdog_timeout,
            "attach_attempts": outcome.attach_attempts,
        },
        "topology": plan.topology.label,
        "nr_cpus": plan.topology.nr_cpus,
        "memory_mb": plan.spec.memory_mb,
        "duration_s": plan.spec.duration,
        "expect_err": plan.spec.expect_err,
        "verdict": verdict.status,
        "reason": verdict.reason,
        "failure_kind": outcome.failure_kind,
        "checks": [vars(c) for c in verdict.checks],
        "metrics": {
            "cgroups": {str(c.get("name", i)): c for i, c in enumerate(cgroups)
                        if isinstance(c, Mapping)},
            "workers": workers,
        },
        "summary": summarize_workers(w for w in workers if isinstance(w, Mapping)),
        "timeline": telemetry.get("timeline"),
        "scheduler_exit": outcome.sched_exit,
        "console_tail": console_tail(outcome.console) if not verdict.passed
        or plan.spec.expect_err else None,
        "timings": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
            "wall_s": round(finished - started, 3),
            "boot_ms": outcome.boot_ms,
            "vm_s": outcome.vm_s,
            **outcome.phases,
            **plan.phases,
        },
        "host": host_context(),
    }


def write_result(
    plan: RunPlan, verdict: Verdict, outcome: GuestOutcome, started: float, finished: float
) -> Path:
    return write_sidecar(sidecar_record(plan, verdict, outcome, started, finished))


@dataclass
class Attempt:
    """One run of a repeated test: its own VM, verdict and times."""

    verdict: Verdict
    outcome: GuestOutcome
    started: float
    finished: float


MAX_REASONS = 5
"""Failed repeats whose reasons a combined verdict spells out (the rest are counted)."""


def combined_verdict(attempts: Sequence[Attempt]) -> tuple[Verdict, int]:
    """The verdict of all repeats (failed if any failed, naming them) and the index of
    the repeat that stands for them: the first failed one, else the last."""
    if not attempts:
        raise ValueError("no attempts")
    if len(attempts) == 1:
        return attempts[0].verdict, 0
    failed = [i for i, a in enumerate(attempts) if not a.verdict.passed]
    if not failed:
        return Verdict(True, "pass", "", attempts[-1].verdict.checks), len(attempts) - 1
    which = ", ".join(str(i + 1) for i in failed)
    reasons = "; ".join(
        f"repeat {i + 1}: {attempts[i].verdict.reason.splitlines()[0][:200]}"
        for i in failed[:MAX_REASONS]
    )
    more = f"; {len(failed) - MAX_REASONS} more" if len(failed) > MAX_REASONS else ""
    status = "error" if any(attempts[i].verdict.status == "error" for i in failed) else "fail"
    reason = f"repeat(s) {which} of {len(attempts)} failed: {reasons}{more}"
    return Verdict(False, status, reason, attempts[failed[0]].verdict.checks), failed[0]


def repeated_record(plan: RunPlan, attempts: Sequence[Attempt]) -> dict[str, Any]:
    """The sidecar of a test run ``len(attempts)`` times: one run's shape at the top
    level (the representative repeat), every run's numbers under ``repeats``."""
    records = [sidecar_record(plan, a.verdict, a.outcome, a.started, a.finished)
               for a in attempts]
    if len(records) == 1:
        return records[0]
    verdict, shown = combined_verdict(attempts)
    record = dict(records[shown])
    record.update(
        verdict=verdict.status,
        reason=verdict.reason,
        repeat_shown=shown + 1,
        repeats=[
            {"repeat": i, "verdict": r["verdict"], "reason": r["reason"],
             "failure_kind": r["failure_kind"], "summary": r["summary"], "timings": r["timings"]}
            for i, r in enumerate(records, 1)
        ],
        repeat_summary=repeat_summary(records),
    )
    record["timings"] = {
        **record["timings"],
        "total_wall_s": round(sum(a.finished - a.started for a in attempts), 3),
    }
    return record


def write_results(plan: RunPlan, attempts: Sequence[Attempt],
                  host_faults: Sequence[HostFault] = ()) -> tuple[Verdict, int, Path]:
    """Write the one sidecar of all ``attempts``; (combined verdict, shown repeat, path).

    ``host_faults`` are the runs thrown away and rerun because the emulated host lost
    them (:mod:`ktstr.hostfault`): the sidecar keeps each one's kind and detail."""
    verdict, shown = combined_verdict(attempts)
    record = repeated_record(plan, attempts)
    record["host_faults"] = [{"kind": f.kind, "detail": f.detail} for f in host_faults]
    return verdict, shown, write_sidecar(record)


DEFAULT_MEMORY_MB = 1024
BOOT_ALLOWANCE_S = 60.0
"""Seconds allowed beyond the scenario's duration for boot, attach and teardown."""


def resolved_checks(plan: RunPlan) -> Any:
    """Defaults, then the scheduler's overrides, then the test's (``ktstr.checks.Checks``)."""
    from ktstr.checks import Checks

    return Checks.resolve(plan.scheduler.checks, plan.spec.checks)


def boot(plan: RunPlan) -> GuestOutcome:
    """Boot the VM and run the scenario in it (:func:`ktstr.runner.run_guest`)."""
    from ktstr.runner import Scheduler as GuestScheduler
    from ktstr.runner import run_guest

    sched = None
    if plan.scheduler_binary is not None:
        wd = plan.watchdog_timeout
        sched = GuestScheduler(
            binary=plan.scheduler_binary,
            args=(*plan.scheduler.command_args(plan.profile), *plan.extra_args),
            watchdog_timeout_ms=int(wd * 1000) if wd else None,
            attach_retries=plan.scheduler.attach.retries,
            attach_transient=plan.scheduler.attach.transient,
        )
    timeout = plan.spec.timeout or plan.spec.duration * 2 + BOOT_ALLOWANCE_S
    kwargs: dict[str, Any] = dict(
        scenario=plan.spec.target,
        test_file=plan.test_file,
        test_files=tuple(plan.test_files),
        binaries=tuple(plan.binaries),
        args={"checks": resolved_checks(plan).to_dict()},
        topology=plan.topology,
        memory_mb=plan.spec.memory_mb or DEFAULT_MEMORY_MB,
        timeout=timeout,
        duration_s=plan.spec.duration,
        scheduler=sched,
        sysctls=dict(plan.scheduler.sysctls),
        cmdline_extra=" ".join(plan.scheduler.kargs),
    )
    if plan.spec.disks:
        from ktstr.disks.clones import per_test_disks
        from ktstr.wire.request import MountSpec

        t = time.monotonic()
        with per_test_disks(list(plan.spec.disks), kernel=plan.kernel_path) as prepared:
            disks_s = time.monotonic() - t
            mounts = [MountSpec(**m) for m in prepared.mounts]
            run = run_guest(plan.kernel_path, devices=prepared.devices, mounts=mounts, **kwargs)
    else:
        disks_s = 0.0
        run = run_guest(plan.kernel_path, **kwargs)
    vm = run.vm
    phases: dict[str, float] = {"disks_s": disks_s}
    phases.update((k, run.timings[k]) for k in ("prep_s", "vm_run_s") if k in run.timings)
    return GuestOutcome(
        ok=run.ok,
        failure_kind=run.failure,
        failure_message=run.message,
        result=run.result,
        reports=list(run.reports),
        sched_exit=run.sched_exit,
        console=str(getattr(vm, "console", "") or ""),
        boot_ms=run.timings.get("boot_ms"),
        vm_s=getattr(vm, "duration_s", None),
        phases={k: round(v, 3) for k, v in phases.items()},
        attach_attempts=run.attach_attempts,
    )


def evaluate_checks(plan: RunPlan, outcome: GuestOutcome) -> list[CheckOutcome]:
    """The test's thresholds over the returned telemetry, plus scheduler health from the log.

    A scenario that returned an AssertResult (not telemetry) keeps its own
    verdict; health checks from the console apply either way.
    """
    from ktstr.checks import evaluate, scheduler_health

    checks = resolved_checks(plan)
    telemetry = telemetry_of(outcome.result)
    out: list[CheckOutcome] = []
    if telemetry:
        raw = evaluate(telemetry, checks, log_text=outcome.console if checks.health else None)
    else:
        out.extend(checks_from_result(outcome.result) or [])
        raw = scheduler_health(outcome.console) if checks.health and outcome.console else []
    for r in raw:
        out.append(CheckOutcome(name=r.name, passed=r.passed, value=r.value,
                                threshold=r.threshold, detail=r.message, worker=r.worker))
    return out
