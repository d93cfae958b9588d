"""Host side of ``ktstr selftests``: one VM runs the chosen tests; typed results.

:func:`run_selftests` boots the kernel once with the guest runtime, the
runner packed with its shared-library closure and no scheduler under test,
and runs :func:`ktstr.selftests.guest.run` there. The guest's per-test reports
(hostile input: validated and bounded here) become :class:`Outcome`s; tests
the guest never finished are attributed to the VM failure the
:class:`~ktstr.runner.GuestRun` names (the one running then fails, the rest
did not run). A kernel BUG/Oops/WARNING/panic in a test's kernel log fails
that test even when the runner said ok.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ktstr.console import run_failure
from ktstr.kernel.cache import KernelEntry
from ktstr.runner import GuestRun
from ktstr.selftests.build import SUITE, RunnerBuild
from ktstr.selftests.guest import DEFAULT_TIMEOUT_PER_TEST_S, OUTPUT_LIMIT, SETTLE_S, GuestArgs
from ktstr.selftests.parse import Status
from ktstr.topology import Topology

SCENARIO = "ktstr.selftests.guest:run"
GUEST_MODULE = "ktstr.selftests.guest"
BOOT_ALLOWANCE_S = 90.0
"""VM timeout beyond the tests' own budget: boot, packing the runner, power-off."""
PER_TEST_SLACK_S = 5.0
MAX_KERNEL_LINES = 200
LABELS = {Status.OK: "ok", Status.FAIL: "FAIL", Status.SKIP: "SKIP", Status.TIMEOUT: "TIMEOUT",
          Status.NOT_RUN: "NOT RUN"}
VERDICTS = {Status.OK: "pass", Status.FAIL: "fail", Status.SKIP: "skip",
            Status.TIMEOUT: "fail", Status.NOT_RUN: "error"}


@dataclass
class Outcome:
    """One test's result, as the host keeps it."""

    name: str
    status: Status
    reason: str = ""
    duration_s: float | None = None
    exit_code: int | None = None
    output: str = ""
    stderr: str = ""
    kernel: list[str] = field(default_factory=list)

    @classmethod
    def from_report(cls, data: object, limit: int = OUTPUT_LIMIT) -> Outcome | None:
        """A guest ``done`` report's result; None when it is not one (never raises)."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        try:
            status = Status(str(data.get("status")))
        except ValueError:
            status = Status.FAIL
        duration = data.get("duration_s")
        code = data.get("exit_code")
        kernel = data.get("kernel")
        outcome = cls(
            name=data["name"][:200], status=status, reason=_text(data.get("reason"), 1000),
            duration_s=float(duration) if isinstance(duration, int | float)
            and not isinstance(duration, bool) else None,
            exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
            output=_text(data.get("output"), limit), stderr=_text(data.get("stderr"), limit),
            kernel=[_text(line, 300) for line in kernel[-MAX_KERNEL_LINES:]]
            if isinstance(kernel, list) else [],
        )
        if status in (Status.OK, Status.SKIP) and (problem := outcome.kernel_problem()):
            outcome.status, outcome.reason = Status.FAIL, f"kernel: {problem}"
        return outcome

    def kernel_problem(self) -> str | None:
        """The first panic/BUG/Oops/WARNING line in this test's kernel log."""
        problem = run_failure(self.kernel)
        return problem.line if problem is not None else None

    def line(self) -> str:
        took = f"{self.duration_s:6.1f} s" if self.duration_s is not None else " " * 8
        reason = self.reason or ("(the runner gives no reason)" if self.status is Status.SKIP
                                 else "")
        return f"{self.name:<28} {LABELS[self.status]:<8}{took}  {reason}".rstrip()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


def _text(value: object, limit: int) -> str:
    return value[-limit:] if isinstance(value, str) else ""


@dataclass
class SelftestsRun:
    results: list[Outcome]
    failure: str | None
    """The VM-level failure (:attr:`GuestRun.failure`), or None."""
    message: str
    running: str | None
    """The test that was running when the VM failed."""
    wall_s: float
    guest: GuestRun | None = None

    def count(self, *statuses: Status) -> int:
        return sum(1 for r in self.results if r.status in statuses)

    @property
    def passed(self) -> int:
        return self.count(Status.OK)

    @property
    def failed(self) -> int:
        return self.count(Status.FAIL, Status.TIMEOUT, Status.NOT_RUN)

    @property
    def skipped(self) -> int:
        return self.count(Status.SKIP)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.failed == 0

    def summary(self) -> str:
        extra = [f"{n} {what}" for n, what in ((self.count(Status.TIMEOUT), "timed out"),
                                               (self.count(Status.NOT_RUN), "not run")) if n]
        more = f" ({', '.join(extra)})" if extra else ""
        return (f"{self.passed} passed, {self.failed} failed{more}, {self.skipped} skipped "
                f"in {self.wall_s:.1f} s")

    def vm_line(self) -> str | None:
        if self.failure is None:
            return None
        first = (self.message.strip().splitlines() or [""])[0][:300]
        during = f" while {self.running} ran" if self.running else ""
        return f"VM failure {self.failure}{during}: {first}"

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results],
                "summary": {"passed": self.passed, "failed": self.failed,
                            "skipped": self.skipped, "timed_out": self.count(Status.TIMEOUT),
                            "not_run": self.count(Status.NOT_RUN)},
                "failure": self.failure, "message": self.message, "running": self.running,
                "wall_s": round(self.wall_s, 3)}


def collect(names: Sequence[str], reports: Sequence[dict[str, Any]], failure: str | None,
            message: str) -> tuple[list[Outcome], str | None]:
    """Per-test outcomes for ``names`` from the guest's reports; (outcomes, running test)."""
    done: dict[str, Outcome] = {}
    running: str | None = None
    for report in reports:
        kind = report.get("selftest")
        if kind == "start" and isinstance(report.get("name"), str):
            running = report["name"]
        elif kind == "done" and (outcome := Outcome.from_report(report.get("result"))):
            if outcome.name in names and outcome.name not in done:
                done[outcome.name] = outcome
            if outcome.name == running:
                running = None
    why = (message.strip().splitlines() or [""])[0][:300]
    results: list[Outcome] = []
    for name in names:
        outcome = done.get(name)
        if outcome is None:
            if name == running and failure is not None:
                outcome = Outcome(name, Status.FAIL, f"the VM failed ({failure}) during this "
                                  f"test: {why}")
            elif failure is not None:
                outcome = Outcome(name, Status.NOT_RUN,
                                  f"the VM failed ({failure}) before this test")
            else:
                outcome = Outcome(name, Status.NOT_RUN, "the guest sent no result for it")
        results.append(outcome)
    return results, running if failure is not None else None


def vm_timeout(count: int, timeout_per_test: float, settle_s: float = SETTLE_S) -> float:
    return BOOT_ALLOWANCE_S + count * (timeout_per_test + settle_s + PER_TEST_SLACK_S)


def live_printer(out: Callable[[str], None], printed: set[str]
                 ) -> Callable[[dict[str, Any]], None]:
    """A channel handler for ``report`` messages: one line per finished test, as it ends
    (its name goes into ``printed``).

    It runs on a vCPU thread during the doorbell exit: it never raises.
    """
    def handle(message: dict[str, Any]) -> None:
        try:
            data = message.get("data")
            if isinstance(data, dict) and data.get("selftest") == "done":
                outcome = Outcome.from_report(data.get("result"))
                if outcome is not None and outcome.name not in printed:
                    printed.add(outcome.name)
                    out(outcome.line())
        except Exception:  # progress output must not fail the run
            pass
    return handle


def run_selftests(kernel: Path, build: RunnerBuild, names: Sequence[str], *,
                  topology: Topology, memory_mb: int,
                  timeout_per_test: float = DEFAULT_TIMEOUT_PER_TEST_S,
                  on_console: Callable[[bytes], None] | None = None,
                  on_line: Callable[[str], None] | None = None,
                  printed: set[str] | None = None) -> SelftestsRun:
    """Boot ``kernel`` once and run ``names`` (one runner process each) in it.

    With ``on_line``, each test's line is passed to it as the test ends (names in
    ``printed``).
    """
    from ktstr.runner import GuestRequest, run_guest
    from ktstr.vmm.devices.channel import ResultChannel

    args = GuestArgs(runner=str(build.runner.resolve()), tests=tuple(names),
                     timeout_s=timeout_per_test, exact=build.exact)

    def hook(vm: Any) -> None:
        if on_line is None:
            return
        for device in getattr(vm, "devices", ()):
            if isinstance(device, ResultChannel):
                device.handlers["report"] = live_printer(
                    on_line, printed if printed is not None else set())

    start = time.monotonic()
    guest = run_guest(GuestRequest(
        kernel, scenario=SCENARIO, modules=(GUEST_MODULE,), args=args.to_dict(),
        binaries=[build.runner], topology=topology, memory_mb=memory_mb,
        timeout=vm_timeout(len(names), timeout_per_test), scheduler=None,
        quiet=True, on_console=on_console, vm_hook=hook))
    wall = time.monotonic() - start
    results, running = collect(names, guest.reports, guest.failure, guest.message)
    return SelftestsRun(results, guest.failure, guest.message, running, wall, guest)


def sidecar_records(run: SelftestsRun, entry: KernelEntry, topology: Topology, memory_mb: int,
                    started: float) -> list[dict[str, Any]]:
    """One sidecar per test (``ktstr.results.sidecar`` schema): ``ktstr stats`` lists them."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    records = []
    for r in run.results:
        failed = r.status.failed
        records.append({
            "test": f"selftests/{SUITE}/{r.name}",
            "kernel": {"id": entry.id, "version": entry.version, "key": entry.key,
                       "sched_ext": entry.sched_ext},
            "scheduler": {"name": "selftest", "profile": "default", "flags": [], "args": []},
            "topology": topology.label, "nr_cpus": topology.nr_cpus, "memory_mb": memory_mb,
            "verdict": VERDICTS[r.status], "reason": r.reason,
            "failure_kind": r.status.value if failed else None,
            "checks": [], "metrics": {},
            "summary": {"duration_s": r.duration_s} if r.duration_s is not None else {},
            "selftest": {"suite": SUITE, "status": r.status.value, "exit_code": r.exit_code,
                         "output": r.output, "stderr": r.stderr, "kernel": r.kernel},
            "vm_failure": {"kind": run.failure, "running": run.running} if run.failure else None,
            "console_tail": run.guest.vm.console_tail if failed and run.guest is not None
            else None,
            "timings": {"started": stamp, "wall_s": r.duration_s or 0.0,
                        "run_wall_s": round(run.wall_s, 3)},
        })
    return records


def print_results(run: SelftestsRun, printed: set[str], out: Callable[[str], None] = print
                  ) -> None:
    """The lines not yet printed live, the VM failure, and the summary."""
    for r in run.results:
        if r.name not in printed:
            out(r.line())
    if (line := run.vm_line()) is not None:
        out(line)
    out(run.summary())
