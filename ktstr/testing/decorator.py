"""``@ktstr_test``: declare a scenario function as a VM test.

The decorator validates every argument immediately (so a typo fails at
import/collection time, not after a VM boot) and attaches a
:class:`KtstrTestSpec` to the function, which stays callable as is: the
guest imports ``module:function`` and calls it with its scenario context.
The pytest plugin turns functions carrying a spec into VM test items.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ktstr.errors import KtstrError
from ktstr.gauntlet import Constraints
from ktstr.scenario.payload import Payload
from ktstr.scheduler import FlagProfile, Scheduler, get_scheduler
from ktstr.topology import Topology

if TYPE_CHECKING:
    from ktstr.checks import Checks
    from ktstr.disks import DiskConfig
    from ktstr.runner import GuestRun

SPEC_ATTR = "__ktstr_test__"

MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 1 << 20
MAX_DURATION_S = 3600.0
DEFAULT_TOPOLOGY = "1n2l2c1t"
DEFAULT_DURATION_S = 2.0
MAX_REPEAT = 100

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class KtstrTestSpec:
    """Everything a VM test declared, validated."""

    module: str
    qualname: str
    topology: Topology
    scheduler: Scheduler | None
    """A scheduler pinned by the test; ``None`` means "the one the run selects"."""
    profile: FlagProfile | None
    duration: float
    watchdog_timeout: float | None
    memory_mb: int | None
    """As declared; None: the topology's default (what booted is in the sidecar)."""
    disks: tuple[DiskConfig, ...] = ()
    expect_err: bool | str = False
    checks: Checks | Mapping[str, Any] | None = None
    timeout: float | None = None
    """As declared; None: ``ktstr.topology.run_timeout_s``."""
    constraints: Constraints = field(default_factory=Constraints)
    gauntlet: bool = True
    repeat: int = 1
    """Runs per test (a fresh VM each), so ``stats compare`` can test significance."""
    watch_bpf_maps: tuple[str, ...] = ()
    """BPF maps the observer samples during the run (names, or suffixes such as
    ``".bss"``); in ``run.observation.map_samples`` and the sidecar."""
    allow_inconclusive: bool = False
    """An inconclusive run (no signal: ``ktstr.testing.run.no_signal``) skips the test
    instead of failing it."""
    host_check: Callable[[GuestRun], None] | None = None
    """Runs on the host after each run with its :class:`~ktstr.runner.GuestRun` (the
    observer's view of guest memory included); an ``AssertionError`` fails the run."""
    payloads: tuple[Payload, ...] = ()
    """Programs the scenario runs (RunPayload): packed into the guest."""
    trace: bool = False
    """Trace the scenario in the guest (sched tracepoints; a Perfetto-ready text trace
    beside the sidecar)."""
    performance_mode: bool = False
    """vCPUs pinned to whole reserved host LLCs, RAM on 2 MB pages, HLT/PAUSE exits off
    (:mod:`ktstr.vmm.performance`)."""
    fifo_vcpus: bool = False
    """In performance mode, SCHED_FIFO vCPU threads too."""

    @property
    def target(self) -> str:
        """``module:function`` as the guest runtime imports it."""
        return f"{self.module}:{self.qualname}"

    def to_dict(self) -> dict[str, Any]:
        """The gauntlet's view (see :class:`ktstr.gauntlet.GauntletTest`)."""
        c = self.constraints
        return {
            "name": self.qualname,
            "target": self.target,
            "duration_s": self.duration,
            "memory_mb": self.memory_mb,
            "scheduler": self.scheduler.name if self.scheduler else None,
            "topology": self.topology.label,
            "expect_err": self.expect_err,
            "gauntlet": self.gauntlet,
            "constraints": {
                "min_cpus": c.min_cpus,
                "max_cpus": c.max_cpus,
                "min_llcs": c.min_llcs,
                "min_numa_nodes": c.min_numa_nodes,
                "requires_smt": c.requires_smt,
                "sched_ext_only": c.sched_ext_only,
            },
        }


def _positive(name: str, value: Any, where: str, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise KtstrError(f"{where}: {name}={value!r} must be a number of seconds")
    if value <= 0:
        raise KtstrError(f"{where}: {name}={value!r} must be > 0 seconds")
    if upper is not None and value > upper:
        raise KtstrError(f"{where}: {name}={value!r} is over the {upper:g} s limit")
    return float(value)


def check_repeat(value: object, where: str) -> int:
    """A repeat count: an integer in 1..MAX_REPEAT."""
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPEAT:
        raise KtstrError(
            f"{where}: repeat={value!r} must be a whole number of runs from 1 to {MAX_REPEAT}"
        )
    return value


def _topology(value: Any, where: str) -> Topology:
    if isinstance(value, Topology):
        return value
    if isinstance(value, str):
        try:
            return Topology.parse(value)
        except KtstrError as err:
            raise KtstrError(f"{where}: {err}") from None
    raise KtstrError(
        f"{where}: topology={value!r}; use a label such as '1n2l2c1t', a preset name, "
        "or Topology(...)"
    )


def _scheduler(value: Any, where: str) -> tuple[Scheduler | None, FlagProfile | None]:
    if value is None:
        return None, None
    try:
        if isinstance(value, Scheduler):
            return value, None
        if isinstance(value, str):
            name, _, prof = value.partition("@")
            sched = get_scheduler(name)
            return sched, sched.profile(prof) if prof else None
    except KtstrError as err:
        raise KtstrError(f"{where}: {err}") from None
    raise KtstrError(
        f"{where}: scheduler={value!r}; use a built-in name ('scx_simple', "
        "'scx_qmap@batch') or a Scheduler(...)"
    )


def _memory(value: Any, topo: Topology, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise KtstrError(f"{where}: memory_mb={value!r} must be an integer number of MiB")
    if not MIN_MEMORY_MB <= value <= MAX_MEMORY_MB:
        raise KtstrError(
            f"{where}: memory_mb={value} is outside {MIN_MEMORY_MB}..{MAX_MEMORY_MB} MiB"
        )
    try:
        topo.node_memory_mb(value)
    except KtstrError as err:
        raise KtstrError(f"{where}: {err}") from None
    return value


def _disks(value: Any, where: str) -> tuple[DiskConfig, ...]:
    if value is None:
        return ()
    from ktstr.disks import validate_disks

    try:
        return tuple(validate_disks(value))
    except KtstrError as err:
        raise KtstrError(f"{where}: {err}") from None
    except TypeError:
        raise KtstrError(f"{where}: disk={value!r}; use a DiskConfig or a list of them") from None


def ktstr_test(
    func: F | None = None,
    *,
    topology: str | Topology = DEFAULT_TOPOLOGY,
    scheduler: str | Scheduler | None = None,
    duration: float = DEFAULT_DURATION_S,
    watchdog_timeout: float | None = None,
    memory_mb: int | None = None,
    disk: Any = None,
    expect_err: bool | str = False,
    checks: Any = None,
    timeout: float | None = None,
    min_cpus: int = 1,
    max_cpus: int | None = None,
    min_llcs: int = 1,
    min_numa_nodes: int = 1,
    requires_smt: bool = False,
    requires_sched_ext: bool = False,
    gauntlet: bool = True,
    repeat: int = 1,
    host_check: Callable[[GuestRun], None] | None = None,
    allow_inconclusive: bool = False,
    watch_bpf_maps: Sequence[str] = (),
    payloads: Sequence[Payload] = (),
    trace: bool = False,
    performance_mode: bool = False,
    fifo_vcpus: bool = False,
) -> Any:
    """Declare ``scenario(ctx) -> AssertResult | dict`` as a VM test.

    ``scheduler`` pins the test to one scheduler (``"scx_qmap"``,
    ``"scx_qmap@batch"`` or a :class:`~ktstr.scheduler.Scheduler`); without
    it the run's scheduler (``--ktstr-scheduler`` / ``KTSTR_SCHEDULER``) is
    used. ``expect_err`` inverts the verdict: the test passes only if the run
    fails (scheduler error, watchdog ejection, failed check); a string is a
    regex the failure's description must match (e.g. ``"stall"``). The remaining
    keywords constrain which topologies the gauntlet may run the test on.
    ``repeat`` runs the test that many times, each in a fresh VM (``--ktstr-repeat``
    overrides it); the sidecar keeps every run's numbers and fails if any run failed.
    ``host_check(run)`` runs on the host after each run, e.g. to assert on what the
    observer read from guest memory (``run.observation``). A run with no signal (the guest
    lost before the scenario, no worker progressing) is *inconclusive*: a failure whose
    message starts ``inconclusive:``, or a skip with ``allow_inconclusive=True``.
    ``payloads`` are the programs (``ktstr.scenario.payload``) its RunPayload steps run:
    the host packs them into the guest with their libraries. ``trace=True`` records the
    scheduler tracepoints during the scenario (``--ktstr-trace`` does it for every test).
    ``performance_mode=True`` pins each vCPU to a host CPU of whole reserved LLCs, backs
    guest RAM with 2 MB pages and disables HLT/PAUSE exits where the host allows
    (``--ktstr-perf-mode`` for every test); ``fifo_vcpus`` adds SCHED_FIFO vCPU threads. The
    sidecar's ``performance`` says what the host gave and what it could not.
    """

    def wrap(fn: F) -> F:
        if not callable(fn) or not hasattr(fn, "__qualname__"):
            raise KtstrError(f"@ktstr_test applies to functions, not {fn!r}")
        where = f"@ktstr_test on {fn.__module__}.{fn.__qualname__}"
        if "<locals>" in fn.__qualname__:
            raise KtstrError(
                f"{where}: define the test at module level; the guest imports it by name"
            )
        params = [
            p for p in inspect.signature(fn).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) != 1:
            raise KtstrError(
                f"{where}: the scenario function takes exactly one argument (ctx), "
                f"it takes {len(params)}"
            )
        topo = _topology(topology, where)
        sched, profile = _scheduler(scheduler, where)
        dur = _positive("duration", duration, where, upper=MAX_DURATION_S)
        wd = None
        if watchdog_timeout is not None:
            wd = _positive("watchdog_timeout", watchdog_timeout, where, upper=MAX_DURATION_S)
        tmo = None
        if timeout is not None:
            tmo = _positive("timeout", timeout, where, upper=4 * MAX_DURATION_S)
            if tmo <= dur:
                raise KtstrError(
                    f"{where}: timeout={timeout} must exceed duration={duration} "
                    "(it also covers boot and teardown)"
                )
        if isinstance(expect_err, str):
            try:
                re.compile(expect_err)
            except re.error as err:
                raise KtstrError(
                    f"{where}: expect_err={expect_err!r} is not a regex: {err}"
                ) from None
        elif not isinstance(expect_err, bool):
            raise KtstrError(
                f"{where}: expect_err={expect_err!r} must be True, False or a regex the "
                "failure must match"
            )
        for name, value in (("min_cpus", min_cpus), ("min_llcs", min_llcs),
                            ("min_numa_nodes", min_numa_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KtstrError(f"{where}: {name}={value!r} must be a positive integer")
        if max_cpus is not None and (not isinstance(max_cpus, int) or max_cpus < min_cpus):
            raise KtstrError(f"{where}: max_cpus={max_cpus!r} must be an integer >= min_cpus")
        constraints = Constraints(
            min_cpus=min_cpus,
            max_cpus=max_cpus,
            min_llcs=min_llcs,
            min_numa_nodes=min_numa_nodes,
            requires_smt=requires_smt,
            sched_ext_only=requires_sched_ext or bool(sched and sched.sched_ext),
        )
        why = constraints.allows(topo)
        if why:
            raise KtstrError(f"{where}: topology {topo.label} breaks its own constraint: {why}")
        _check_checks(checks, where)
        runs = check_repeat(repeat, where)
        if fifo_vcpus and not performance_mode:
            raise KtstrError(f"{where}: fifo_vcpus=True needs performance_mode=True")
        if host_check is not None and not callable(host_check):
            raise KtstrError(f"{where}: host_check={host_check!r} must be a function of the run")
        spec = KtstrTestSpec(
            module=fn.__module__,
            qualname=fn.__qualname__,
            topology=topo,
            scheduler=sched,
            profile=profile,
            duration=dur,
            watchdog_timeout=wd,
            memory_mb=_memory(memory_mb, topo, where),
            disks=_disks(disk, where),
            expect_err=expect_err,
            checks=checks,
            timeout=tmo,
            constraints=constraints,
            gauntlet=gauntlet,
            repeat=runs,
            host_check=host_check,
            allow_inconclusive=bool(allow_inconclusive),
            watch_bpf_maps=_map_names(watch_bpf_maps, where),
            payloads=_payloads(payloads, where),
            trace=bool(trace),
            performance_mode=bool(performance_mode),
            fifo_vcpus=bool(fifo_vcpus),
        )
        wrapper = _guest_entry(fn)
        setattr(wrapper, SPEC_ATTR, spec)
        return wrapper  # type: ignore[return-value]

    if func is not None:
        return wrap(func)
    return wrap


def _payloads(value: Any, where: str) -> tuple[Payload, ...]:
    if isinstance(value, Payload):
        value = (value,)
    if not all(isinstance(p, Payload) for p in value):
        raise KtstrError(f"{where}: payloads={value!r} must be a list of Payload "
                         "(ktstr.scenario.payload: HACKBENCH, CYCLICTEST, STRESS_NG_CPU, ...)")
    return tuple(value)


def _map_names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise KtstrError(f"{where}: watch_bpf_maps={value!r} must be a list of map names "
                         "(or suffixes such as '.bss')")
    return tuple(value)


def _check_checks(checks: Any, where: str) -> None:
    if checks is None or isinstance(checks, dict):
        return
    from ktstr.checks import Checks

    if not isinstance(checks, Checks):
        raise KtstrError(f"{where}: checks={checks!r}; use ktstr.checks.Checks(...)")


def _guest_entry(fn: Callable[..., Any]) -> Callable[[Any], Any]:
    """What the guest calls as ``module:function``: adapt ctx in, make the result a dict out.

    The guest context names the duration ``duration_s`` and carries the
    resolved thresholds in ``args["checks"]``; test bodies may read
    ``ctx.duration`` and ``ctx.checks`` (mapped by the scenario runner's
    helpers, the same ones ``ScenarioContext.of`` uses). Results travel as
    JSON, so an AssertResult or ScenarioResult becomes its ``to_dict()``.
    """

    @functools.wraps(fn)
    def entry(ctx: Any) -> Any:
        from ktstr.scenario.runner import context_checks, context_duration

        if getattr(ctx, "duration", None) is None:
            ctx.duration = context_duration(ctx)
        if getattr(ctx, "checks", None) is None:
            ctx.checks = context_checks(ctx)
        value = fn(ctx)
        return to_result_dict(value)

    return entry


def to_result_dict(value: Any) -> Any:
    """A scenario's return value as JSON-able data (None, dicts and lists pass through)."""
    if value is None or isinstance(value, dict | list):
        return value
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        out = to_dict()
        if type(value).__name__ == "AssertResult" and isinstance(out, dict):
            out["kind"] = "assert_result"
        return out
    raise KtstrError(
        f"the scenario returned {type(value).__name__}; return an AssertResult, the "
        "result of execute_defs/execute_steps, or a dict"
    )


def spec_of(obj: Any) -> KtstrTestSpec | None:
    spec = getattr(obj, SPEC_ATTR, None)
    return spec if isinstance(spec, KtstrTestSpec) else None


def disk_templates(specs: Sequence[KtstrTestSpec]) -> list[DiskConfig]:
    """Distinct disk configs a suite declares (the session pre-builds their templates)."""
    seen: list[DiskConfig] = []
    for spec in specs:
        for disk in spec.disks:
            if disk not in seen:
                seen.append(disk)
    return seen
