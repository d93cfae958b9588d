"""Carry out steps: create cgroups, fork workers, apply ops, hold, collect telemetry.

``execute_defs`` and ``execute_steps`` are what a test's ``scenario(ctx)``
calls inside the guest; host mode calls them with a context built from the
host. The context only needs ``topology``, ``duration`` and ``cgroup_root``
(see :class:`ScenarioContextLike`); the optional attributes of
:class:`ScenarioContext` are read with defaults.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

from ktstr.errors import KtstrError
from ktstr.scenario import worker as wk
from ktstr.scenario.cgroups import CgroupBackend, backend_for
from ktstr.scenario.controls import CgroupControls
from ktstr.scenario.cpuset import resolve_affinity, resolve_cpuset
from ktstr.scenario.model import (
    AddCgroup,
    Affinity,
    AttachScheduler,
    CaptureCgroupProcs,
    CgroupDef,
    ClearCpuset,
    CpusetSpec,
    DetachScheduler,
    FreezeCgroup,
    KillPayload,
    MoveAllTasks,
    Op,
    PolicyKind,
    RemoveCgroup,
    ReplaceScheduler,
    RestartScheduler,
    RunPayload,
    SchedulerOp,
    SetAffinity,
    SetControls,
    SetCpuset,
    Spawn,
    Step,
    StopCgroup,
    SwapCpusets,
    UnfreezeCgroup,
    WaitPayload,
    format_cpu_list,
)
from ktstr.scenario.overhead import OverheadMeter
from ktstr.scenario.payload_proc import PayloadProcess
from ktstr.scenario.syscalls import SCHED_DEADLINE
from ktstr.scenario.work import Work
from ktstr.telemetry import CgroupStats, PayloadResult, PhaseStats, ScenarioResult, WorkerStats
from ktstr.topology import Topology

_POLICY = {
    PolicyKind.NORMAL: os.SCHED_OTHER,
    PolicyKind.BATCH: os.SCHED_BATCH,
    PolicyKind.IDLE: os.SCHED_IDLE,
    PolicyKind.FIFO: os.SCHED_FIFO,
    PolicyKind.RR: os.SCHED_RR,
    PolicyKind.DEADLINE: SCHED_DEADLINE,
}
_SAMPLE_S = 0.05
_SAMPLE_CPU_BUDGET = 0.03  # share of one CPU the placement sampling may use


@runtime_checkable
class SchedulerControl(Protocol):
    """Attaches and detaches the scheduler under test (the guest runtime provides one)."""

    def current(self) -> str | None:
        """The attached sched_ext ops name, or None (the kernel's own scheduler)."""
        ...

    def state(self) -> dict[str, Any]:
        """sched_ext's sysfs state now."""
        ...

    def detach(self) -> None: ...

    def attach(self, binary: str | None, args: tuple[str, ...] | None) -> None: ...


@runtime_checkable
class ScenarioContextLike(Protocol):
    """The minimum a ctx object must offer (the guest runtime's ctx satisfies it)."""

    topology: Topology
    duration: float
    cgroup_root: str


@dataclass
class ScenarioContext:
    """A ready-made context: the host runner builds one, tests may too."""

    topology: Topology
    duration: float
    cgroup_root: str
    """An existing cgroup directory (v2, or a v1 cpuset directory) this run may populate."""
    cpu_ids: tuple[int, ...] | None = None
    """Real CPU id of each topology CPU; None = identity (the guest)."""
    workers: int | None = None
    """Default workers per cgroup for catalog scenarios (None: scale to the CPUs)."""
    checks: Any = None
    """A :class:`ktstr.checks.Checks` (None = defaults)."""
    scratch_dir: str = tempfile.gettempdir()
    seed: int = 0
    scheduler_control: SchedulerControl | None = None
    """What scheduler lifecycle ops use (the guest's; None on a host)."""

    @classmethod
    def of(cls, ctx: Any) -> ScenarioContext:
        """The runner's view of any context object; a ScenarioContext passes through.

        The one place that maps other contexts' names: the guest's
        (``ktstr.guest.context.Context``) has ``duration_s``, a Path
        ``cgroup_root``, ``scratch`` and the thresholds in ``args["checks"]``.
        """
        if isinstance(ctx, cls):
            return ctx
        scratch = getattr(ctx, "scratch_dir", None) or getattr(ctx, "scratch", None)
        return cls(
            topology=ctx.topology,
            duration=context_duration(ctx) or 0.0,
            cgroup_root=os.fspath(ctx.cgroup_root),
            cpu_ids=getattr(ctx, "cpu_ids", None),
            workers=getattr(ctx, "workers", None),
            checks=context_checks(ctx),
            scratch_dir=os.fspath(scratch) if scratch else tempfile.gettempdir(),
            seed=getattr(ctx, "seed", 0) or 0,
            scheduler_control=getattr(ctx, "scheduler_control", None),
        )


def context_duration(ctx: Any) -> float | None:
    """``ctx.duration``, else the guest context's ``duration_s``; None if neither is set."""
    value = getattr(ctx, "duration", None)
    if value is None:
        value = getattr(ctx, "duration_s", None)
    return None if value is None else float(value)


def context_checks(ctx: Any) -> Any:
    """``ctx.checks``, else the resolved thresholds the host put in ``ctx.args["checks"]``
    (as a :class:`ktstr.checks.Checks`); None means the defaults."""
    checks = getattr(ctx, "checks", None)
    if checks is None:
        checks = (getattr(ctx, "args", None) or {}).get("checks")
    if isinstance(checks, Mapping):
        from ktstr.checks import Checks

        checks = Checks().override(checks)
    return checks


@dataclass
class _Cgroup:
    name: str
    definition: CgroupDef
    spec: CpusetSpec | None
    affinity: Affinity
    controls: CgroupControls
    next_index: int = 0
    frozen_at: float | None = None
    frozen_s: float = 0.0
    """The longest single freeze so far (the gap checks allow for it)."""
    cpu_stat: dict[str, int] | None = None


class Runner:
    """Live state of one scenario: cgroups, workers, and the telemetry of stopped workers."""

    def __init__(self, ctx: ScenarioContextLike, name: str = "scenario", lifetime_s: float = 600):
        self.ctx = ctx = ScenarioContext.of(ctx)
        self.name = name
        self.topology: Topology = ctx.topology
        self.backend: CgroupBackend = backend_for(ctx.cgroup_root)
        ids = ctx.cpu_ids
        self.cpu_ids: tuple[int, ...] = tuple(ids) if ids else tuple(range(self.topology.nr_cpus))
        if len(self.cpu_ids) != self.topology.nr_cpus:
            raise KtstrError(
                f"context: cpu_ids has {len(self.cpu_ids)} entries for "
                f"{self.topology.nr_cpus} topology CPUs"
            )
        self.scratch_dir: str = ctx.scratch_dir
        self.rng = random.Random(ctx.seed)
        self.lifetime_s = lifetime_s
        self.cgroups: dict[str, _Cgroup] = {}
        self.effective: dict[str, tuple[int, ...]] = {}
        self.last_cpus: dict[str, tuple[int, ...]] = {}
        self.live: list[wk.WorkerHandle] = []
        self.finished: list[WorkerStats] = []
        self.notes: list[str] = []
        self._shared: list[Any] = []
        self._created: list[str] = []
        self.gone: dict[str, _Cgroup] = {}
        """Removed cgroups, for the telemetry of the workers they had."""
        self.control = ctx.scheduler_control
        self.phases: list[PhaseStats] = []
        self.payloads: dict[str, PayloadProcess] = {}
        """Payloads started and not yet waited for or killed, by label."""
        self.payload_results: list[PayloadResult] = []
        self.started = time.monotonic()
        self.overhead = OverheadMeter()
        self._phase = self._phase_begin("")

    # -- cpu mapping --------------------------------------------------------

    def real(self, cpus: Iterable[int]) -> tuple[int, ...]:
        return tuple(sorted(self.cpu_ids[c] for c in cpus))

    # -- ops ------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        if isinstance(op, AddCgroup):
            self.add(op.cgroup, op.parent)
        elif isinstance(op, RemoveCgroup):
            self.remove(op.name)
        elif isinstance(op, SetCpuset):
            self._need(op.name).spec = op.cpuset
            self.apply_cpusets()
        elif isinstance(op, ClearCpuset):
            self._need(op.name).spec = None
            self.apply_cpusets()
        elif isinstance(op, SwapCpusets):
            a, b = self._need(op.a), self._need(op.b)
            a.spec, b.spec = b.spec, a.spec
            self.apply_cpusets()
        elif isinstance(op, Spawn):
            cg = self._need(op.name)
            self.spawn(cg, op.workers, op.work or cg.definition.work)
        elif isinstance(op, StopCgroup):
            self.freeze(self._need(op.name), False)
            self.stop_workers([h for h in self.live if h.cgroup == op.name])
        elif isinstance(op, MoveAllTasks):
            self._need(op.src)
            dst = self._need(op.dst)
            target = frozenset(self.real(self.effective[dst.name]))
            for h in [h for h in self.live if h.cgroup == op.src]:
                h.set_allowed(h.allowed | target)  # samples racing the move may show either
                self.backend.attach(dst.name, h.pid)
                h.cgroup = dst.name
                h.set_allowed(target)
        elif isinstance(op, SetControls):
            cg = self._need(op.name)
            self.backend.set_controls(op.name, op.controls)
            cg.controls = cg.controls.merged(op.controls)
        elif isinstance(op, FreezeCgroup):
            self.freeze(self._need(op.name), True)
        elif isinstance(op, UnfreezeCgroup):
            self.freeze(self._need(op.name), False)
        elif isinstance(op, CaptureCgroupProcs):
            self._need(op.name)
            pids = sorted(self.backend.pids(op.name))
            self.notes.append(
                f"capture {op.name} at {time.monotonic() - self.started:.2f} s: "
                f"{len(pids)} tasks: {' '.join(map(str, pids)) or '-'}"
            )
        elif isinstance(op, SchedulerOp):
            self.scheduler_op(op)
        elif isinstance(op, RunPayload):
            self.run_payload(op)
        elif isinstance(op, WaitPayload):
            self._payload(op.label).wait()
            self._payload_done(op.label)
        elif isinstance(op, KillPayload):
            self._payload(op.label).kill("KillPayload")
            self._payload_done(op.label)
        elif isinstance(op, SetAffinity):
            cg = self._need(op.name)
            cg.affinity = op.affinity
            for i, h in enumerate(h for h in self.live if h.cgroup == op.name):
                mask = resolve_affinity(
                    op.affinity, self.topology, self.effective[op.name], i, self.rng
                )
                cpus = self.real(mask) if mask is not None else self.real(self.effective[op.name])
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(h.pid, cpus)
        else:  # pragma: no cover - the Op union is closed
            raise KtstrError(f"unknown op {op!r}")

    def _need(self, name: str) -> _Cgroup:
        cg = self.cgroups.get(name)
        if cg is None:
            raise KtstrError(
                f"scenario {self.name}: no cgroup {name!r} (have: "
                f"{', '.join(sorted(self.cgroups)) or 'none'})"
            )
        return cg

    def add(self, definition: CgroupDef, parent: str = "") -> None:
        if parent:
            self._need(parent)
        entries = definition.flatten(parent)
        for full, _ in entries:
            if full in self.cgroups:
                raise KtstrError(f"scenario {self.name}: cgroup {full!r} already exists")
        # Resolve first so an impossible cpuset fails before anything is created.
        for full, d in entries:
            self.cgroups[full] = _Cgroup(full, d, d.cpuset, d.affinity, d.controls)
        try:
            self.resolve_all()
        except KtstrError:
            for full, _ in entries:
                del self.cgroups[full]
            raise
        for full, d in entries:
            self.backend.create(full)
            self._created.append(full)
            if not d.controls.empty:
                self.backend.set_controls(full, d.controls)
        self.apply_cpusets()
        for full, d in entries:
            count = d.worker_count(len(self.effective[full]))
            if count:
                self.spawn(self.cgroups[full], count, d.work)

    # -- payloads -------------------------------------------------------------------

    def run_payload(self, op: RunPayload) -> None:
        label = op.name
        if label in self.payloads:
            raise KtstrError(f"scenario {self.name}: payload {label!r} is already running")
        join = None
        if op.cgroup is not None:
            self._need(op.cgroup)
            join = partial(self.backend.attach, op.cgroup)
        self.payloads[label] = PayloadProcess(label, op.payload, self.scratch_dir, join)
        if op.wait:
            self.payloads[label].wait()
            self._payload_done(label)

    def _payload(self, label: str) -> PayloadProcess:
        proc = self.payloads.get(label)
        if proc is None:
            raise KtstrError(
                f"scenario {self.name}: no running payload {label!r} (running: "
                f"{', '.join(sorted(self.payloads)) or 'none'})"
            )
        return proc

    def _payload_done(self, label: str) -> None:
        self.payload_results.append(self.payloads.pop(label).result())

    def _end_payloads(self, why: str) -> None:
        for label, proc in list(self.payloads.items()):
            proc.kill(why)
            self._payload_done(label)

    # -- scheduler phases --------------------------------------------------------

    def scheduler_op(self, op: SchedulerOp) -> None:
        """Carry out a lifecycle op between two phases (work done during the switch
        itself belongs to neither)."""
        if self.control is None:
            raise KtstrError(
                f"scenario {self.name}: {type(op).__name__} needs a scheduler to control: "
                "it runs inside a ktstr VM, not on a host"
            )
        self.phases.append(self._phase_end(self._phase))
        if isinstance(op, DetachScheduler):
            self.control.detach()
        elif isinstance(op, AttachScheduler):
            self.control.attach(None, op.args)
        elif isinstance(op, RestartScheduler):
            self.control.detach()
            self.control.attach(None, None)
        elif isinstance(op, ReplaceScheduler):
            self.control.detach()
            self.control.attach(op.binary, op.args)
        self._phase = self._phase_begin(type(op).__name__)

    def _progress(self) -> tuple[int, int, dict[str, int]]:
        """Work units and CPU time of every worker so far, and units per cgroup."""
        now = time.monotonic_ns()
        stats = [*self.finished, *(h.snapshot(now) for h in self.live)]
        per_cg: dict[str, int] = {}
        for w in stats:
            per_cg[w.cgroup] = per_cg.get(w.cgroup, 0) + w.work_units
        return sum(w.work_units for w in stats), sum(w.cpu_ns for w in stats), per_cg

    def _phase_begin(self, started_by: str) -> PhaseStats:
        units, cpu, per_cg = self._progress()
        control = self.control
        return PhaseStats(
            index=len(self.phases), scheduler=(control.current() if control else None) or "kernel",
            start_s=time.monotonic() - self.started, end_s=0.0, work_units=units, cpu_ns=cpu,
            cgroup_units=per_cg, sched_state=control.state() if control else {},
            started_by=started_by,
        )

    def _phase_end(self, phase: PhaseStats) -> PhaseStats:
        """``phase`` (holding the counts at its start) with what was done since."""
        units, cpu, per_cg = self._progress()
        phase.end_s = time.monotonic() - self.started
        phase.work_units = units - phase.work_units
        phase.cpu_ns = cpu - phase.cpu_ns
        phase.cgroup_units = {cg: n - phase.cgroup_units.get(cg, 0) for cg, n in per_cg.items()}
        return phase

    def freeze(self, cg: _Cgroup, frozen: bool) -> None:
        if frozen == (cg.frozen_at is not None):
            return
        self.backend.set_frozen(cg.name, frozen)
        now = time.monotonic()
        if frozen:
            cg.frozen_at = now
        else:
            assert cg.frozen_at is not None
            cg.frozen_s = max(cg.frozen_s, now - cg.frozen_at)
            cg.frozen_at = None

    def _thaw_all(self) -> None:
        for cg in self.cgroups.values():
            if cg.frozen_at is not None:
                with contextlib.suppress(KtstrError, OSError):
                    self.freeze(cg, False)

    def remove(self, name: str) -> None:
        self._need(name)
        doomed = [n for n in self.cgroups if n == name or n.startswith(name + "/")]
        for n in doomed:
            self.freeze(self.cgroups[n], False)
        self.stop_workers([h for h in self.live if h.cgroup in doomed])
        for n in doomed:
            self.cgroups[n].cpu_stat = self.backend.cpu_stat(n)
        self.backend.remove(name)
        for n in doomed:
            self.last_cpus[n] = self.real(self.effective.get(n, ()))
            self.gone[n] = self.cgroups.pop(n)
            self.effective.pop(n, None)
            if n in self._created:
                self._created.remove(n)

    def resolve_all(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        root = tuple(range(self.topology.nr_cpus))
        for name in sorted(self.cgroups, key=lambda n: n.count("/")):
            parent = os.path.dirname(name)
            base = out[parent] if parent else root
            spec = self.cgroups[name].spec
            try:
                out[name] = base if spec is None else resolve_cpuset(spec, self.topology, base)
            except KtstrError as err:
                raise KtstrError(f"cgroup {name}: {err}") from None
        return out

    def apply_cpusets(self) -> None:
        new = self.resolve_all()
        # Placement samples racing the change may show either set: widen first.
        changing = [h for h in self.live if frozenset(self.real(new[h.cgroup])) != h.allowed]
        for h in changing:
            h.set_allowed(h.allowed | frozenset(self.real(new[h.cgroup])))
        self.backend.apply_cpus(
            explicit={
                n: (self.real(new[n]) if cg.spec is not None else None)
                for n, cg in self.cgroups.items()
            },
            effective={n: self.real(c) for n, c in new.items()},
            previous={n: self.real(c) for n, c in self.effective.items() if n in new},
        )
        self.effective = new
        for h in self.live:
            allowed = frozenset(self.real(new[h.cgroup]))
            if allowed != h.allowed:
                h.set_allowed(allowed)

    def spawn(self, cg: _Cgroup, count: int, work: Work) -> list[wk.WorkerHandle]:
        d = cg.definition
        for leaf in work.cgroup_leaves():  # made once, then removed with their parent
            if f"{cg.name}/{leaf}" not in self.cgroups:
                self.add(CgroupDef(leaf, workers=0), cg.name)
        leaves = tuple(self.backend.task_path(f"{cg.name}/{leaf}") for leaf in work.cgroup_leaves())
        shared = work.make_shared(count, self.scratch_dir)
        self._shared.append(shared)
        handles: list[wk.WorkerHandle] = []
        try:
            for member in range(count):
                mask = resolve_affinity(
                    cg.affinity, self.topology, self.effective[cg.name], member, self.rng
                )
                spec = wk.WorkerSpec(
                    cgroup=cg.name,
                    index=cg.next_index,
                    work=work,
                    attach=partial(self.backend.attach, cg.name),
                    affinity=self.real(mask) if mask is not None else None,
                    policy=_POLICY[d.policy.kind],
                    priority=d.policy.priority,
                    policy_name=d.policy.describe(),
                    deadline=d.policy.deadline_params,
                    nice=d.nice,
                    member=member,
                    shared=shared,
                    scratch_dir=self.scratch_dir,
                    max_lifetime_s=self.lifetime_s,
                    seed=self.rng.randrange(1 << 30),
                    topology=self.topology,
                    cpu_ids=self.cpu_ids,
                    cgroup_leaves=leaves,
                )
                cg.next_index += 1
                with signals_blocked():  # a Ctrl-C between fork and bookkeeping leaks a pid
                    h = wk.spawn(spec)
                    h.allowed = frozenset(self.real(self.effective[cg.name]))
                    handles.append(h)
                    self.live.append(h)
            wk.wait_started(handles)
        except wk.WorkerError as err:
            raise KtstrError(f"scenario {self.name}: {err}") from None
        return handles

    def stop_workers(self, handles: Sequence[wk.WorkerHandle]) -> None:
        if not handles:
            return
        for h in handles:
            self.last_cpus[h.cgroup] = self.real(self.effective.get(h.cgroup, ()))
        self.finished.extend(wk.stop(list(handles)))
        for h in handles:  # what workers noted (a fallback taken), once per cgroup
            note = f"cgroup {h.cgroup}: {h.note}" if h.note else None
            if note and note not in self.notes:
                self.notes.append(note)
        gone = {id(h) for h in handles}
        self.live = [h for h in self.live if id(h) not in gone]

    # -- time -----------------------------------------------------------------

    def hold(self, seconds: float) -> None:
        """Sleep while sampling worker placement and noticing workers that died."""
        for h in self.live:
            h.open_window()
        end = time.monotonic() + seconds
        period = _SAMPLE_S
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(period, left))
            cost = time.thread_time()
            for h in self.live:
                h.sample_proc()
            # On a slow (emulated) guest the harness samples less often rather than
            # take more than its budget of a CPU from the workers it measures.
            period = max(_SAMPLE_S, (time.thread_time() - cost) / _SAMPLE_CPU_BUDGET)
            dead = [h for h in self.live if h.state in (wk.DONE, wk.FAILED)]
            if dead:
                self.stop_workers(dead)

    # -- results / teardown -------------------------------------------------------

    def finish(self) -> ScenarioResult:
        self._thaw_all()
        if self.phases:  # a lifecycle op ran: the last phase ends here
            self.phases.append(self._phase_end(self._phase))
        self._end_payloads("scenario end")
        self.stop_workers(list(self.live))
        overhead = self.overhead.read()
        by_cg: dict[str, list[WorkerStats]] = {}
        for w in self.finished:
            by_cg.setdefault(w.cgroup, []).append(w)
        cgroups = []
        for name, workers in by_cg.items():
            cpus = self.real(self.effective[name]) if name in self.effective else \
                self.last_cpus.get(name, ())
            cg = self.cgroups.get(name) or self.gone.get(name)
            if cg is None:
                cgroups.append(CgroupStats.aggregate(name, cpus, workers))
                continue
            c = cg.controls
            cgroups.append(CgroupStats.aggregate(
                name, cpus, workers,
                controls=c.describe(),
                weight=c.effective_weight if c.weight_declared else None,
                cpu_max_cpus=c.cpu_max.limit_cpus if c.cpu_max else None,
                cpu_max_period_us=c.cpu_max.period_us if c.cpu_max else None,
                frozen_ms=round(cg.frozen_s * 1000, 1),
                cpu_stat=cg.cpu_stat if cg.cpu_stat is not None else self.backend.cpu_stat(name),
            ))
        return ScenarioResult(
            name=self.name,
            topology=self.topology.label,
            duration_s=time.monotonic() - self.started,
            workers=sorted(self.finished, key=lambda w: (w.cgroup, w.index)),
            cgroups=sorted(cgroups, key=lambda c: c.name),
            notes=self.notes,
            phases=self.phases,
            payloads=self.payload_results,
            overhead=overhead,
        )

    def close(self) -> None:
        """Kill every worker and remove every cgroup this runner created (idempotent)."""
        with signals_blocked():
            self._close()

    def _close(self) -> None:
        self._thaw_all()
        for proc in self.payloads.values():
            proc.kill("teardown")
        self.payloads = {}
        for h in self.live:
            wk.kill_and_reap(h.pid)
            h.files.close()
        self.live = []
        for name in sorted(self._created, key=lambda n: n.count("/"), reverse=True):
            with contextlib.suppress(KtstrError, OSError):
                self.backend.remove(name)
        self._created = []
        for shared in self._shared:
            _close_shared(shared)
        self._shared = []


_DEFERRED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Defer Ctrl-C/SIGTERM/SIGHUP (delivered on exit) so bookkeeping is never cut in half."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _close_shared(obj: Any) -> None:
    if isinstance(obj, int):
        with contextlib.suppress(OSError):
            os.close(obj)
    elif isinstance(obj, mmap.mmap):
        with contextlib.suppress(BufferError, ValueError):
            obj.close()
    elif isinstance(obj, list | tuple):
        for item in obj:
            _close_shared(item)


def planned_seconds(steps: Sequence[Step], duration: float) -> float:
    return sum(s.hold_seconds(duration) for s in steps)


def execute_steps(
    ctx: ScenarioContextLike,
    steps: Sequence[Step],
    *,
    setup: Sequence[CgroupDef] = (),
    duration: float | None = None,
    name: str = "scenario",
    checks: Any = None,
) -> ScenarioResult:
    """Create ``setup`` cgroups, run each step (ops, then hold), evaluate the checks.

    Holds are fractions of ``duration`` (default ``ctx.duration``) unless a step
    gives fixed seconds. The result carries per-worker and per-cgroup
    telemetry plus ``checks``/``passed`` (:func:`apply_checks`, with ``checks`` if given, else
    ``ctx.checks``): the host keeps that verdict. Cgroups created here are removed and
    workers reaped, whatever happens.
    """
    ctx = ScenarioContext.of(ctx)
    if duration is None:
        duration = ctx.duration or None
    if duration is None:
        raise KtstrError(f"scenario {name}: no duration (pass duration= or set ctx.duration)")
    total = float(duration)
    if total <= 0:
        raise KtstrError(f"scenario {name}: duration must be > 0, got {total:g}")
    plan = planned_seconds(steps, total)
    runner = Runner(ctx, name, lifetime_s=plan * 1.5 + 30)
    try:
        for d in setup:
            runner.add(d)
        for step in steps:
            for op in step.ops:
                runner.apply(op)
            runner.hold(step.hold_seconds(total))
        result = runner.finish()
    finally:
        runner.close()
    return apply_checks(result, checks if checks is not None else ctx.checks)


def apply_checks(result: ScenarioResult, checks: Any) -> ScenarioResult:
    """Evaluate ``checks`` (a :class:`ktstr.checks.Checks`, a dict of overrides, or None for
    the defaults) over ``result`` into its ``checks``/``passed``: the one evaluation of its
    telemetry, which the host keeps as it is (:func:`ktstr.checks.run_checks`)."""
    from ktstr.checks import AssertResult, evaluate

    verdict = AssertResult.from_checks(evaluate(result, checks))
    result.checks = [c.to_dict() for c in verdict.results]
    result.passed = verdict.passed
    return result


def execute_defs(
    ctx: ScenarioContextLike,
    defs: Sequence[CgroupDef],
    *,
    duration: float | None = None,
    name: str = "scenario",
    checks: Any = None,
) -> ScenarioResult:
    """Run ``defs`` side by side for the whole duration (one step)."""
    return execute_steps(
        ctx, [Step(ops=tuple(AddCgroup(d) for d in defs))], duration=duration, name=name,
        checks=checks,
    )


def describe_cpus(cpus: Sequence[int]) -> str:
    return format_cpu_list(cpus) or "-"
