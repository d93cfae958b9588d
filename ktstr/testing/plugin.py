"""The pytest plugin (entry point ``pytest11: ktstr``): VM tests as pytest items.

A module-level function decorated with ``@ktstr_test`` is collected as a
:class:`KtstrItem` (marked ``vm``); running it boots the kernel under test
with the test's topology, runs the scenario function in the guest, applies
the checks and writes a result sidecar. The kernel and scheduler come from
``--ktstr-kernel``/``KTSTR_KERNEL`` and ``--ktstr-scheduler``/``KTSTR_SCHEDULER``
unless the test pins a scheduler. ``--ktstr-gauntlet PLAN`` expands each test
into the plan's variants; ``--ktstr-dump-specs FILE`` writes the suite's
declarations (for the gauntlet and the disk-template pre-build).
``--ktstr-repeat N`` runs every VM test N times (a fresh VM each; it overrides
``@ktstr_test(repeat=)``) and writes one sidecar with every run's numbers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ktstr import hostfault
from ktstr.errors import KtstrError
from ktstr.reap import reap_stale_all
from ktstr.reserve import ReservationTimeout
from ktstr.results.sidecar import check_results_root, passed_tests, results_root, run_id
from ktstr.sandbox.detect import RESUME_ENV
from ktstr.scenario.payload_proc import resolve_program
from ktstr.scheduler import BUILTIN, FlagProfile, Scheduler, parse_scheduler_option
from ktstr.testing.decorator import MAX_REPEAT, KtstrTestSpec, check_repeat, spec_of
from ktstr.testing.repro import reproduce
from ktstr.topology import Topology
from ktstr.wire.request import TraceSpec

if TYPE_CHECKING:
    from ktstr.disks import DiskConfig
    from ktstr.gauntlet import Variant
    from ktstr.kernel.pipeline import ResolvedKernel
    from ktstr.testing.run import Attempt

KERNEL_ENV = "KTSTR_KERNEL"
SCHEDULER_ENV = "KTSTR_SCHEDULER"
PINS_MARK = "pins_scheduler"
CI_ENV = "CI"
"""Set by CI services (and ``.ci/run``): failed VM tests get a repro run by default."""
OUTSIDE_SANDBOX_HINT = (
    "run the VM tests through the sandbox: `nox -s vm_tests`, or "
    "`python -m ktstr sandbox run -- python -m pytest tests/vm`"
)


class KtstrTestFailure(Exception):
    """A VM test that failed; the message is the whole readable report."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ktstr", "ktstr VM tests")
    group.addoption(
        "--ktstr-kernel", default=None, metavar="KERNEL",
        help=f"kernel under test: catalog id (6.12) or bzImage/tree path (env {KERNEL_ENV})",
    )
    group.addoption(
        "--ktstr-scheduler", default=None, metavar="NAME[@PROFILE]",
        help=f"scheduler for tests that do not pin one, e.g. scx_qmap@batch "
        f"(env {SCHEDULER_ENV}; built-in: {', '.join(BUILTIN)})",
    )
    group.addoption(
        "--ktstr-gauntlet", default=None, metavar="PLAN",
        help="run each test as the variants listed in this gauntlet plan (JSON)",
    )
    group.addoption(
        "--ktstr-repeat", default=None, metavar="N",
        help=f"run each VM test N times (1-{MAX_REPEAT}, a fresh VM each) so that "
        "`ktstr stats compare` can test significance; overrides @ktstr_test(repeat=)",
    )
    group.addoption(
        "--ktstr-trace", action="store_true", default=False,
        help="trace every VM test's scenario in the guest (sched tracepoints; a text trace "
        "that Perfetto opens, beside each sidecar)",
    )
    group.addoption(
        "--ktstr-repro", default=None, choices=("never", "on-failure"),
        help="rerun a failed VM test once with tracing and kprobes on its failure's "
        f"backtrace and say whether it reproduced (default: on-failure when {CI_ENV} is "
        "set, else never)",
    )
    group.addoption(
        "--ktstr-perf-mode", default=None, choices=("on", "fifo"),
        help="performance mode for every VM test: vCPUs pinned to whole reserved host LLCs, "
        "2 MB pages, HLT/PAUSE exits off (fifo: SCHED_FIFO vCPU threads too)",
    )
    group.addoption(
        "--ktstr-pinned", default="all", choices=("all", "own"),
        help="tests that pin a scheduler: run them all (default), or only those pinning the "
        "run's scheduler binary (own: a matrix of sessions then runs each once)",
    )
    group.addoption(
        "--ktstr-dump-specs", default=None, metavar="FILE",
        help="write the collected VM tests' declarations as JSON",
    )


@dataclass
class SessionState:
    """Per-process lazily resolved environment, shared by every item."""

    config: pytest.Config
    kernel_spec: str
    sched_spec: str
    _kernel: ResolvedKernel | None = None
    _kvm: str | None = None
    """None: not checked yet; "": VMs can boot here; else why not."""
    plan: list[Variant] | None = None
    repeat: int | None = None
    """``--ktstr-repeat``: runs per VM test, over what each test declares."""
    specs: dict[str, KtstrTestSpec] = field(default_factory=dict)
    walls: list[tuple[str, str, float]] = field(default_factory=list)
    host_faults: list[tuple[str, str]] = field(default_factory=list)
    """(test, fault) for every run rerun after a fault of the emulated host."""
    test_files: tuple[Path, ...] = ()
    """Every VM test module next to the collected ones: packed into one shared base
    initramfs, so the session builds (or looks up) one base instead of one per module."""
    payload_binaries: tuple[Path, ...] = ()
    """The host programs of every selected test's payloads (those found here)."""
    trace: bool = False
    """``--ktstr-trace``: trace every VM test."""
    perf_mode: str | None = None
    """``--ktstr-perf-mode``: performance mode for every VM test (``on`` or ``fifo``)."""
    repro: str = "never"
    """``--ktstr-repro``: rerun a failed test once, traced and probed (``on-failure``)."""

    def default_scheduler(self) -> tuple[Scheduler, FlagProfile]:
        return parse_scheduler_option(self.sched_spec)

    def kvm_error(self) -> str | None:
        """``None`` when VMs can boot here, else the reason with the way out."""
        if self._kvm is None:
            from ktstr.sandbox.detect import detect_kvm, in_sandbox

            status = detect_kvm()
            if status.usable:
                self._kvm = ""
            elif in_sandbox():
                self._kvm = f"KVM is unusable inside the sandbox: {status.reason}"
            else:
                self._kvm = f"KVM is unusable on this machine ({status.reason}); " + (
                    OUTSIDE_SANDBOX_HINT
                )
        return self._kvm or None

    def kernel(self) -> ResolvedKernel:
        """The resolved kernel under test (``ktstr.kernel.resolve_kernel``), once."""
        if self._kernel is None:
            from ktstr.kernel import resolve_kernel

            self._kernel = resolve_kernel(self.kernel_spec)
        return self._kernel

    def base_binaries(self) -> tuple[Path, ...]:
        """The kernel entry's scheduler binaries: packed into every run's base initramfs,
        so runs under different schedulers share one cached base."""
        entry = self.kernel().entry
        built = dict(entry.schedulers) if entry is not None else {}
        scheds = [Path(built[n]).resolve() for n in sorted(built) if Path(built[n]).is_file()]
        return (*scheds, *self.payload_binaries)

    def vm_kernel(self) -> ResolvedKernel:
        """:meth:`kernel` for a test about to boot a VM; :class:`KtstrTestFailure` with
        the way out when VMs cannot boot here (the same for every kind of VM test)."""
        error = self.kvm_error()
        if error:
            raise KtstrTestFailure(error)
        return self.kernel()


def session_state(config: pytest.Config) -> SessionState:
    """The plugin's per-session state (kernel, scheduler, shared test files)."""
    return config.stash[STATE]


STATE = pytest.StashKey[SessionState]()


def _kernel_default() -> str:
    try:
        from ktstr.kernel.catalog import DEFAULT_KERNEL
    except ImportError:
        return "6.12"
    return DEFAULT_KERNEL


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a real kernel in a VM (ktstr)")
    config.addinivalue_line("markers", "expect_err: a ktstr VM test that passes only if it fails")
    config.addinivalue_line(
        "markers", f"{PINS_MARK}(name): a plain test that boots its own VMs under scheduler "
        "NAME; --ktstr-pinned own runs it only in that scheduler's session")
    reap_stale_all()  # what killed runs left: temp dirs, unpack trees, loop devices
    kernel = config.getoption("ktstr_kernel") or os.environ.get(KERNEL_ENV) or _kernel_default()
    sched = config.getoption("ktstr_scheduler") or os.environ.get(SCHEDULER_ENV) or "eevdf"
    state = SessionState(config=config, kernel_spec=kernel, sched_spec=sched)
    try:
        state.default_scheduler()
    except KtstrError as err:
        raise pytest.UsageError(f"--ktstr-scheduler / {SCHEDULER_ENV}: {err}") from None
    state.trace = bool(config.getoption("ktstr_trace"))
    state.perf_mode = config.getoption("ktstr_perf_mode")
    state.repro = config.getoption("ktstr_repro") or (
        "on-failure" if os.environ.get(CI_ENV) else "never")
    repeat = config.getoption("ktstr_repeat")
    if repeat is not None:
        try:
            state.repeat = check_repeat(repeat, "--ktstr-repeat")
        except KtstrError as err:
            raise pytest.UsageError(str(err)) from None
    plan_path = config.getoption("ktstr_gauntlet")
    if plan_path:
        from ktstr.gauntlet import read_plan

        try:
            state.plan = read_plan(Path(plan_path))
        except KtstrError as err:
            raise pytest.UsageError(str(err)) from None
    config.stash[STATE] = state
    _STATE_BY_PROCESS["state"] = state
    run_id()  # fix the run id now so xdist workers inherit it through the environment


def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> list[pytest.Item] | None:
    spec = spec_of(obj)
    if spec is None or not isinstance(collector, pytest.Module):
        return None
    if getattr(obj, "__module__", None) != collector.obj.__name__:
        return None  # imported from elsewhere: collected where it is defined
    if not collector.funcnamefilter(name):
        return None
    state = collector.config.stash[STATE]
    state.specs[f"{collector.nodeid}::{name}"] = spec
    items: list[pytest.Item] = []
    if state.plan is None:
        items.append(KtstrItem.from_parent(collector, name=name, spec=spec))
    else:
        for variant in state.plan:
            if variant.test == spec.qualname and spec.gauntlet:
                items.append(
                    KtstrItem.from_parent(
                        collector, name=f"{name}[{variant.id}]", spec=spec, variant=variant
                    )
                )
    # Marks on the function (@pytest.mark.smoke) apply to its VM items, as to plain tests.
    for mark in getattr(obj, "pytestmark", []):
        for item in items:
            item.add_marker(getattr(pytest.mark, mark.name)(*mark.args, **mark.kwargs))
    return items


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    if config.getoption("ktstr_pinned") == "own":
        own = config.stash[STATE].default_scheduler()[0]
        foreign = [i for i in items if _pinned_elsewhere(i, own)]
        if foreign:
            config.hook.pytest_deselected(items=foreign)
            items[:] = [i for i in items if i not in foreign]
    if os.environ.get(RESUME_ENV) != "1":
        return
    done = passed_tests(results_root() / run_id())
    keep = [i for i in items if not (isinstance(i, KtstrItem) and i.nodeid in done)]
    skipped = [i for i in items if i not in keep]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = keep
        print(f"ktstr: resuming run {run_id()}: {len(skipped)} VM test(s) passed before the "
              f"sandbox was lost and are not run again (their sidecars stand)", flush=True)


def _pinned_elsewhere(item: pytest.Item, own: Scheduler) -> bool:
    """The item pins a scheduler other than the run's: a VM test's declared scheduler, or a
    plain test's ``pins_scheduler`` mark."""
    if isinstance(item, KtstrItem):
        return item.spec.scheduler is not None and item.spec.scheduler.binary != own.binary
    mark = item.get_closest_marker(PINS_MARK)
    return mark is not None and mark.args[0] != own.name


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash[STATE]
    vm_items = [i for i in session.items if isinstance(i, KtstrItem)]
    if vm_items and not session.config.option.collectonly:
        try:
            check_results_root()
        except KtstrError as err:
            raise pytest.UsageError(str(err)) from None
    state.test_files = vm_test_files(session.items)
    state.payload_binaries = payload_binaries([i.spec for i in vm_items])
    path = session.config.getoption("ktstr_dump_specs")
    if not path:
        return
    rows = []
    for nodeid, spec in sorted(state.specs.items()):
        row = spec.to_dict()
        row["nodeid"] = nodeid
        row["disks"] = [_disk_dict(d) for d in spec.disks]
        rows.append(row)
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


def payload_binaries(specs: list[KtstrTestSpec]) -> tuple[Path, ...]:
    """The host paths of the payload programs ``specs`` use, each once, sorted: one base
    initramfs serves every test of the session."""
    found = {resolve_program(p.program) for s in specs for p in s.payloads}
    return tuple(sorted(Path(f).resolve() for f in found if f))


def missing_payloads(spec: KtstrTestSpec) -> str | None:
    """Why a payload of ``spec`` cannot be packed (its program is not on this host)."""
    for p in spec.payloads:
        if resolve_program(p.program) is None:
            hint = f": apt-get install {p.package}" if p.package else ""
            return f"payload {p.name}: program {p.program!r} not found on this host{hint}"
    return None


def vm_test_files(items: list[pytest.Item]) -> tuple[Path, ...]:
    """``test_*.py`` in every directory holding a selected VM test.

    By directory, not by selected item, so ``-k``/``-m`` selections and single-file
    runs of one suite share one cached base initramfs.
    """
    dirs = {Path(str(item.path)).parent for item in items
            if isinstance(item, KtstrItem) or item.get_closest_marker("vm")}
    return tuple(sorted(f.resolve() for d in dirs for f in d.glob("test_*.py")))


def _disk_dict(disk: DiskConfig) -> dict[str, Any]:
    return {"capacity_mb": disk.capacity_mb, "filesystem": disk.filesystem.value}


class KtstrItem(pytest.Item):
    """One VM test run (optionally one gauntlet variant of it)."""

    def __init__(self, *, spec: KtstrTestSpec, variant: Variant | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.variant = variant
        self.add_marker("vm")
        if spec.expect_err:
            self.add_marker("expect_err")

    def _scheduler(self, state: SessionState) -> tuple[Scheduler, FlagProfile]:
        if self.variant is not None:
            sched = self.spec.scheduler or BUILTIN[self.variant.scheduler]
            return sched, sched.profile(self.variant.profile)
        if self.spec.scheduler is not None:
            return self.spec.scheduler, self.spec.profile or FlagProfile(())
        return state.default_scheduler()

    def _topology(self) -> Topology:
        if self.variant is not None:
            return Topology.parse(self.variant.topology)
        return self.spec.topology

    def runtest(self) -> None:
        from ktstr.testing import run

        state = self.config.stash[STATE]
        sched, profile = self._scheduler(state)
        started = time.time()
        host_faults: list[hostfault.HostFault] = []
        exhausted = False
        try:
            missing = missing_payloads(self.spec)
            if missing:
                raise KtstrError(missing)
            kernel = state.vm_kernel()
            entry = kernel.entry
            if sched.sched_ext and entry is not None and not entry.sched_ext:
                pytest.skip(
                    f"{sched.name} is a sched_ext scheduler; kernel {entry.id} "
                    f"({entry.version}) has no sched_ext"
                )
            plan = run.RunPlan(
                test_id=self.nodeid,
                spec=self.spec,
                test_file=Path(str(self.path)),
                kernel=kernel,
                kernel_spec=state.kernel_spec,
                scheduler=sched,
                profile=profile,
                scheduler_binary=sched.resolve_binary(entry),
                topology=self._topology(),
                test_files=state.test_files,
                binaries=state.base_binaries(),
                phases={"resolve_s": round(time.time() - started, 3)},
                trace=TraceSpec() if state.trace or self.spec.trace else None,
                performance=state.perf_mode is not None or self.spec.performance_mode,
                fifo_vcpus=state.perf_mode == "fifo" or self.spec.fifo_vcpus,
            )
            attempts: list[run.Attempt] = []
            for _ in range(state.repeat or self.spec.repeat):
                # Each repeat has its own rerun budget: faults come in bursts, and ten
                # repeats sharing two reruns would fail on the host's account.
                lost: list[hostfault.HostFault] = []
                attempts.append(hostfault.rerun_lost(lambda: run.run_once(plan), _attempt_fault,
                                                     lost))
                host_faults.extend(lost)
            verdict, shown = run.combined_verdict(attempts)
            repro = None
            # A run still lost to the emulated host after every rerun says nothing about
            # the scheduler; a repro run would only roll the same dice once more.
            exhausted = hostfault.in_sandbox() and _attempt_fault(attempts[shown]) is not None
            if (not verdict.passed and verdict.status != run.KNOWN_ISSUE
                    and state.repro == "on-failure" and not exhausted):
                repro, _again = reproduce(plan, attempts[shown])
            verdict, shown, sidecar = run.write_results(plan, attempts, host_faults, repro)
            guest = attempts[shown].run
        except ReservationTimeout as err:
            # Busy host CPUs are not the test's failure: skipped, with who holds them.
            pytest.skip(f"{self.nodeid}: {err}")
        except KtstrError as err:
            raise KtstrTestFailure(f"{self.nodeid}: {err}") from None
        finally:
            # user_properties travel with the report, so xdist's controller sees them too.
            self.user_properties.append(
                ("ktstr", {"scheduler": f"{sched.name}@{profile.name}",
                           "wall_s": round(time.time() - started, 3),
                           "host_faults": [f.line() for f in host_faults]})
            )
        if verdict.status == "inconclusive" and self.spec.allow_inconclusive:
            pytest.skip(f"{self.nodeid}: {verdict.reason} (allow_inconclusive)")
        if verdict.status == run.KNOWN_ISSUE:
            # Caught, and known: an expected failure that names the issue (never a pass).
            pytest.xfail(f"{verdict.reason} (result: {sidecar})")
        if not verdict.passed:
            title = (f"{self.name} [{sched.name}@{profile.name} {plan.topology.label}, "
                     f"kernel {plan.kernel_label}]")
            text = run.format_failure(title, verdict, guest, sidecar)
            if exhausted:
                text += (f"\nthe emulated host lost this run too, after {len(host_faults)} "
                         f"reruns (so no repro run): a fault of the sandbox, not a verdict "
                         f"on the scheduler")
            if repro is not None:
                text += f"\n{repro.line()}: {repro.reason}"
                trace = (repro.trace or {}).get("path")
                text += f"\n  repro trace: {trace}" if trace else ""
            raise KtstrTestFailure(text)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, KtstrTestFailure | KtstrError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"ktstr vm test: {self.name}"


def _attempt_fault(attempt: Attempt) -> hostfault.HostFault | None:
    """The fault of the emulated host that lost this attempt, if one did."""
    if attempt.verdict.passed:
        return None
    guest = attempt.run
    stacks = guest.observation.vcpu_stacks if guest.observation is not None else None
    return (hostfault.host_fault(guest.failure, guest.message, guest.vm.console,
                                 retried_ejections=guest.retried_ejections, vcpu_stacks=stacks)
            or hostfault.inconclusive_fault(attempt.verdict.status, attempt.verdict.reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key == "ktstr" and isinstance(value, dict):
            state = _STATE_BY_PROCESS.get("state")
            if state is not None:
                state.walls.append((report.nodeid, str(value["scheduler"]),
                                    float(value["wall_s"])))
                state.host_faults += [(report.nodeid, str(f))
                                      for f in value.get("host_faults", ())]


_STATE_BY_PROCESS: dict[str, SessionState] = {}


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None or not state.walls:
        return
    tr = terminalreporter
    tr.section("ktstr VM tests: wall time")
    for nodeid, sched, wall in state.walls:
        tr.write_line(f"{wall:7.1f}s  {sched:<24} {nodeid}")
    tr.write_line(f"{sum(w for _, _, w in state.walls):7.1f}s  total ({len(state.walls)} tests)")
    for nodeid, fault in state.host_faults:
        tr.write_line(f"rerun after a fault of the emulated host: {nodeid}: {fault}")
    tr.write_line(f"results: {results_root() / run_id()}")
