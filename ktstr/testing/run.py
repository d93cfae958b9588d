"""One VM test, host side, one type per stage:

``KtstrTestSpec`` (what the test declared) -> :class:`RunPlan` (with the session's kernel
and scheduler) -> :class:`ktstr.runner.GuestRequest` (its scheduler the wire
``SchedulerSpec``) -> :class:`ktstr.runner.GuestRun` -> :class:`Verdict` (over
``ktstr.checks.CheckResult``\\ s from :func:`ktstr.checks.run_checks`) -> the sidecar
(:mod:`ktstr.results.sidecar`).

Kept apart from the pytest plugin so the flow reads top to bottom and the verdict is a
pure function of the guest run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ktstr.checks import CheckResult, Checks, run_checks
from ktstr.console import TAIL_LINES, tail_lines
from ktstr.hostfault import HostFault
from ktstr.reserve import reserve
from ktstr.results.sidecar import combined_record, write_sidecar
from ktstr.runner import GuestRequest, GuestRun
from ktstr.scheduler import FlagProfile, Scheduler
from ktstr.telemetry import telemetry_of
from ktstr.testing.decorator import DEFAULT_TOPOLOGY, KtstrTestSpec
from ktstr.testing.repro import ProbeTargets, Repro, probe_targets
from ktstr.topology import Topology
from ktstr.wire.request import MountSpec, SchedulerSpec, TraceSpec

if TYPE_CHECKING:
    from ktstr.kernel.pipeline import ResolvedKernel
    from ktstr.observe.program import KernelFiles

OBSERVE_ENV = "KTSTR_OBSERVE"
"""``0`` turns the host-side observer off (drgn sampling, failure dumps)."""

DEFAULT_MEMORY_MB = Topology.parse(DEFAULT_TOPOLOGY).default_memory_mb()
"""What a test of the default topology boots with (``ktstr doctor`` says it); the rule
itself is :meth:`ktstr.topology.Topology.default_memory_mb`."""

@dataclass
class Verdict:
    passed: bool
    status: str  # pass | fail | error | inconclusive | known_issue
    """``inconclusive``: the run produced no signal to judge the scheduler by
    (:func:`no_signal`); never a pass, whatever ``expect_err`` says. ``known_issue``: it
    failed as one of the scheduler's documented bugs (:func:`as_known_issue`)."""
    reason: str
    checks: list[CheckResult] = field(default_factory=list)


@dataclass
class RunPlan:
    """A fully resolved VM test: what to boot and with what."""

    test_id: str
    spec: KtstrTestSpec
    test_file: Path
    kernel: ResolvedKernel
    kernel_spec: str
    """What the session asked for (``--ktstr-kernel``): a catalog id or a path."""
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
    trace: TraceSpec | None = None
    """Trace the scenario (``@ktstr_test(trace=True)``, ``--ktstr-trace``, repro runs)."""
    performance: bool = False
    """Performance mode (``@ktstr_test(performance_mode=True)``, ``--ktstr-perf-mode``)."""
    fifo_vcpus: bool = False

    @property
    def checks(self) -> Checks:
        """Defaults, then the scheduler's overrides, then the test's."""
        return Checks.resolve(self.scheduler.checks, self.spec.checks)

    @property
    def scheduler_spec(self) -> SchedulerSpec | None:
        """What the guest starts; None for the kernel's own scheduler."""
        if self.scheduler_binary is None:
            return None
        return self.scheduler.guest_spec(self.scheduler_binary, self.profile,
                                         extra_args=self.extra_args,
                                         watchdog_timeout=self.spec.watchdog_timeout)

    @property
    def kernel_label(self) -> str:
        entry = self.kernel.entry
        return (entry.version or entry.id) if entry is not None else self.kernel_spec

    def request(self) -> GuestRequest:
        """The guest run this plan asks for (disks are added by :func:`boot`)."""
        return GuestRequest(
            kernel=self.kernel.bzimage,
            scenario=self.spec.target,
            test_file=self.test_file,
            test_files=tuple(self.test_files),
            binaries=tuple(self.binaries),
            args={"checks": self.checks.to_dict()},
            topology=self.topology,
            memory_mb=self.spec.memory_mb,
            timeout=self.spec.timeout,
            duration_s=self.spec.duration,
            scheduler=self.scheduler_spec,
            sysctls=dict(self.scheduler.sysctls),
            cmdline_extra=" ".join(self.scheduler.kargs),
            observe=self.observe_files,
            watch_maps=self.spec.watch_bpf_maps,
            keep_guest_ram=self.observe_files is not None,
            trace=self.trace,
        )

    @property
    def observe_files(self) -> KernelFiles | None:
        """The cached kernel's debug files for the host-side observer (:mod:`ktstr.observe`);
        None for a kernel outside the cache or with ``KTSTR_OBSERVE=0``."""
        from ktstr.observe.program import KernelFiles

        entry = self.kernel.entry
        if entry is None or os.environ.get(OBSERVE_ENV, "1") == "0":
            return None
        return KernelFiles.of_entry(entry.path)


def boot(plan: RunPlan) -> GuestRun:
    """Boot the VM and run the scenario in it (:func:`ktstr.runner.run_guest`)."""
    from ktstr.runner import run_guest

    request = plan.request()
    # Host CPUs for the vCPUs first (ktstr.reserve): concurrent runs never overcommit;
    # performance mode holds whole LLCs and pins the vCPUs to them.
    with reserve(plan.topology.nr_cpus, test=plan.test_id,
                 llc_aligned=plan.performance) as held:
        if plan.performance:
            request = replace(request, pin_cpus=held.cpus[:plan.topology.nr_cpus],
                              fifo_vcpus=plan.fifo_vcpus)
        if plan.spec.disks:
            from ktstr.disks.clones import per_test_disks

            t = time.monotonic()
            with per_test_disks(list(plan.spec.disks), kernel=plan.kernel.bzimage) as prepared:
                disks_s = time.monotonic() - t
                run = run_guest(replace(request, devices=prepared.devices,
                                        mounts=[MountSpec(**m) for m in prepared.mounts]))
        else:
            disks_s = 0.0
            run = run_guest(request)
    run.timings["disks_s"] = disks_s
    run.timings["reserve_wait_s"] = round(held.waited_s, 3)
    run.reservation = dict(held.to_record())
    return run


def evaluate_checks(plan: RunPlan, run: GuestRun) -> list[CheckResult]:
    """Every check of this run (:func:`ktstr.checks.run_checks`): what the scenario
    returned, judged where it ran, plus scheduler health from the console, plus the
    test's ``host_check``."""
    results = guest_checks(plan, run)
    if plan.spec.host_check is not None:
        results.append(host_check(plan.spec.host_check, run))
    return results


def guest_checks(plan: RunPlan, run: GuestRun) -> list[CheckResult]:
    """What the scenario returned and the console say, and the host-side monitor's
    sustained-window checks over guest memory (:mod:`ktstr.observe.health`)."""
    from ktstr.observe.health import monitor_checks

    return [*run_checks(run.result, plan.checks, run.vm.console, run.retried_ejections),
            *monitor_checks(run.observation, plan.checks)]


def host_check(check: Callable[[GuestRun], None], run: GuestRun) -> CheckResult:
    """The test's own host-side assertion as a check (``@ktstr_test(host_check=)``)."""
    try:
        check(run)
    except AssertionError as err:
        return CheckResult("host_check", False, message=str(err) or "assertion failed")
    except Exception as err:  # the check's own bug: a failed check that says so
        return CheckResult("host_check", False, message=f"{type(err).__name__}: {err}")
    return CheckResult("host_check", True)


NO_SIGNAL_KINDS = frozenset({"timeout", "hung", "triple_fault", "vm_error", "channel",
                             "no_end_marker"})
"""Failure kinds of the VM or the harness, not the scheduler: before the scenario started
they leave nothing to judge."""


def no_signal(run: GuestRun) -> str | None:
    """Why ``run`` says nothing about the scheduler, or None: the guest was lost before
    its scenario started, or the scenario ran and no worker ever made progress."""
    if not run.ok:
        if run.failure in NO_SIGNAL_KINDS and "scenario_start" not in run.timings:
            first = run.message.splitlines()[0] if run.message else ""
            return f"the guest was lost before the scenario started ({run.failure}: {first})"
        return None
    workers = telemetry_of(run.result).get("workers")
    if isinstance(workers, list) and workers and all(
            isinstance(w, Mapping) and not w.get("work_units") for w in workers):
        return f"none of the {len(workers)} workers made any progress"
    return None


KNOWN_ISSUE = "known_issue"


def failure_text(run: GuestRun, failed: Sequence[CheckResult]) -> str:
    """What failed the run, and only that: the guest's classified failure with the
    scheduler's exit report, or (if the guest run itself was fine) the failed checks. The
    console (``GuestRun.console_tail``) is not part of it: unrelated noise there must not
    match an expectation."""
    if not run.ok:
        return f"{run.failure}\n{run.message}"
    return "\n".join(c.reason() for c in failed)


def judge(run: GuestRun, checks: Sequence[CheckResult], expect_err: bool | str) -> Verdict:
    """Pass/fail from the guest run and the check results; ``expect_err`` inverts it
    (but never a failed ``host_check``: the test's own assertion stands as written)."""
    if (why := no_signal(run)) is not None:
        return Verdict(False, "inconclusive", f"inconclusive: {why}", list(checks))
    host = [c for c in checks if c.name == "host_check" and not c.passed]
    if host:
        return Verdict(False, "fail", f"host_check: {host[0].message}", list(checks))
    failed = [c for c in checks if not c.passed]
    if not run.ok:
        reason = f"{run.failure}: {run.message}".rstrip(": ")
    elif failed:
        reason = "; ".join(c.reason() for c in failed)
    else:
        reason = ""
    run_failed = bool(reason)
    if expect_err:
        if (run_failed and isinstance(expect_err, str)
                and not re.search(expect_err, failure_text(run, failed), re.IGNORECASE)):
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
        return Verdict(False, "fail" if run.ok or failed else "error", reason, list(checks))
    return Verdict(True, "pass", "", list(checks))


def as_known_issue(verdict: Verdict, run: GuestRun, scheduler: Scheduler,
                   test_name: str) -> Verdict:
    """``verdict`` as a ``known_issue`` when its failure is one the scheduler documents
    (:class:`ktstr.scheduler.KnownIssue`); any other verdict as it is."""
    if verdict.status not in ("fail", "error"):
        return verdict
    failed = [c for c in verdict.checks if not c.passed]
    issue = scheduler.known_issue(test_name, failure_text(run, failed))
    if issue is None:
        return verdict
    first = verdict.reason.strip().splitlines()[0][:300] if verdict.reason.strip() else ""
    return Verdict(False, KNOWN_ISSUE, f"known issue of {scheduler.name}: {issue.reason} "
                   f"(this run: {first})", verdict.checks)


def format_failure(title: str, verdict: Verdict, run: GuestRun, sidecar: Path | None) -> str:
    if verdict.status == "inconclusive":  # the message starts with the word, as CI greps it
        lines = [f"{verdict.reason} [{title}]"]
    else:
        lines = [f"{title}: {verdict.reason}"]
    for check in verdict.checks:
        if not check.passed:
            lines.append(f"  {check.reason()}")
    if run.sched_exit:
        lines.append(f"  scheduler exit: {_one_line(run.sched_exit)}")
    if run.observation is not None:
        from ktstr.observe.dump import findings

        lines.extend(f"  {line}" for line in findings(run.observation))
        for name, path in run.observation.dump_paths.items():
            lines.append(f"  failure dump ({name}): {path}")
    for attempt in run.attach_attempts:
        lines.append(f"  attach attempt {attempt.get('attempt')}: {attempt.get('kind')}: "
                     f"{attempt.get('message')}")
    if run.vm.console:
        lines.append(f"--- console tail (last {TAIL_LINES} lines) ---")
        lines.append(tail_lines(run.vm.console))
    if sidecar is not None:
        lines.append(f"(result: {sidecar})")
    return "\n".join(lines)


def _one_line(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, "", [], {}))
    return str(value).replace("\n", " | ")


@dataclass
class Attempt:
    """One run of a repeated test: its own VM, verdict and times."""

    verdict: Verdict
    run: GuestRun
    started: float
    finished: float
    probes: ProbeTargets | None = None
    """Where a repro of this failed run would put kprobes (``ktstr.testing.repro``)."""


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
    statuses = {attempts[i].verdict.status for i in failed}
    status = ("inconclusive" if statuses == {"inconclusive"}
              else KNOWN_ISSUE if statuses == {KNOWN_ISSUE}
              else "error" if "error" in statuses else "fail")
    reason = f"repeat(s) {which} of {len(attempts)} failed: {reasons}{more}"
    return Verdict(False, status, reason, attempts[failed[0]].verdict.checks), failed[0]


def run_once(plan: RunPlan) -> Attempt:
    """Boot, check and judge one repeat; its wall time starts at its boot (resolving the
    kernel and scheduler happens once, ``timings.resolve_s``). A failed one leaves its
    failure dump (:mod:`ktstr.observe.dump`) beside the sidecar, a traced one its trace."""
    started = time.time()
    run = boot(plan)
    files = Artifacts(plan)
    try:
        if run.trace is not None and run.trace.text:
            run.trace.path = str(files.write("trace.txt", run.trace.text).resolve())
        checks = guest_checks(plan, run)
        dumped = False
        if run.observation is not None and (not run.ok or any(not c.passed for c in checks)):
            write_failure_dump(plan, run, files)  # an expected failure too, for host_check
            dumped = True
        if plan.spec.host_check is not None:
            checks.append(host_check(plan.spec.host_check, run))
        verdict = as_known_issue(judge(run, checks, plan.spec.expect_err), run,
                                 plan.scheduler, plan.test_id.rsplit("::", 1)[-1])
        probes = None
        if not verdict.passed:
            if not dumped and run.observation is not None:
                write_failure_dump(plan, run, files)
            # While guest RAM is still open: where a repro should probe.
            probes = probe_targets(run.observation, plan.scheduler.sched_ext)
    finally:
        if run.observation is not None:
            run.observation.close()
    return Attempt(verdict, run, started, time.time(), probes)


class Artifacts:
    """One run's directory beside its sidecar, made when the first file needs it."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self._dir: Path | None = None

    @property
    def directory(self) -> Path:
        if self._dir is None:
            from ktstr.results.sidecar import artifact_dir

            p = self.plan
            self._dir = artifact_dir(p.test_id, p.scheduler.name, p.profile.name,
                                     p.topology.label)
        return self._dir

    def write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        return path


def write_failure_dump(plan: RunPlan, run: GuestRun, files: Artifacts) -> None:
    from ktstr.observe.dump import write_dump

    obs = run.observation
    assert obs is not None
    t = time.monotonic()
    obs.dump_paths = write_dump(obs, files.directory)
    run.timings["dump_s"] = time.monotonic() - t


def repeated_record(plan: RunPlan, attempts: Sequence[Attempt]) -> dict[str, Any]:
    """The sidecar record of ``attempts`` (see :func:`ktstr.results.sidecar.combined_record`)."""
    return combined_record(plan, attempts, *combined_verdict(attempts))


def write_results(plan: RunPlan, attempts: Sequence[Attempt],
                  host_faults: Sequence[HostFault] = (),
                  repro: Repro | None = None) -> tuple[Verdict, int, Path]:
    """Write the one sidecar of all ``attempts``; (combined verdict, shown repeat, path).

    ``host_faults`` are the runs thrown away and rerun because the emulated host lost
    them (:mod:`ktstr.hostfault`): the sidecar keeps each one's kind and detail."""
    verdict, shown = combined_verdict(attempts)
    record = combined_record(plan, attempts, verdict, shown)
    record["host_faults"] = [{"kind": f.kind, "detail": f.detail} for f in host_faults]
    record["repro"] = repro.to_record() if repro is not None else None
    return verdict, shown, write_sidecar(record)
