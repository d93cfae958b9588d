"""Host side of one guest run: pack, boot, collect, classify.

:func:`run_guest` takes a :class:`GuestRequest`, builds (or reuses) the cached base
initramfs and a per-run suffix holding the wire request
(:class:`~ktstr.wire.request.RunRequest`), boots a :class:`~ktstr.vmm.vm.Vm` with the
result channel attached, turns the channel's messages into a :class:`GuestRun` and
classifies anything that went wrong. It never hangs: the VM has a hard timeout, and a
missing end marker is itself a failure.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ktstr import console, hostfault, initramfs, reap
from ktstr.errors import KtstrError
from ktstr.topology import Topology, run_timeout_s
from ktstr.tracing import TraceCapture, assemble
from ktstr.vmm.devices.channel import ResultChannel
from ktstr.vmm.performance import Performance
from ktstr.vmm.vcpu import TRIPLE_FAULT
from ktstr.wire.frame import decode_serial, note_error
from ktstr.wire.messages import STARTUP_STEPS, validate_message
from ktstr.wire.request import MountSpec, RunRequest, SchedulerSpec, TraceSpec

if TYPE_CHECKING:
    from ktstr.observe.monitor import GuestObserver, Observation
    from ktstr.observe.program import KernelFiles
    from ktstr.vmm.bus import VmDevice
    from ktstr.vmm.vm import Vm, VmResult

# Failure kinds (GuestRun.failure); guest-side kinds come from ktstr.guest.sched.GuestFailure,
# console ones from ktstr.console.PROBLEMS.
F_TIMEOUT = "timeout"
F_VM = "vm_error"
F_HUNG = hostfault.F_HUNG
F_TRIPLE_FAULT = hostfault.F_TRIPLE_FAULT
F_CHANNEL = "channel"
F_NO_END = "no_end_marker"
F_NO_RESULT = "no_result"
F_EJECTED = "scheduler_ejected"
DEFAULT_TOPOLOGY = Topology.parse("1n1l2c1t")


@dataclass(frozen=True)
class GuestRequest:
    """One guest run, as the host asks for it: what :func:`run_guest` takes.

    Exactly one of ``scenario`` (``module:function`` from ``test_file``), ``shell`` (a
    ``sh -c`` command, busybox) or ``interactive``. ``memory_mb`` and ``timeout`` left None
    take the topology's defaults (:attr:`guest_memory_mb`, :attr:`timeout_s`), resolved
    once by :func:`run_guest` and recorded in :attr:`GuestRun.memory_mb`/``timeout_s``.
    """

    kernel: Path
    scenario: str | None = None
    test_file: Path | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    shell: str | None = None
    interactive: bool = False
    topology: Topology = DEFAULT_TOPOLOGY
    memory_mb: int | None = None
    timeout: float | None = None
    duration_s: float = 10.0
    scheduler: SchedulerSpec | None = None
    """The wire type itself (:meth:`ktstr.scheduler.Scheduler.guest_spec` builds it)."""
    sysctls: Mapping[str, str | int] = field(default_factory=dict)
    binaries: Sequence[Path] = ()
    """Packed with their shared-library closure."""
    devices: Sequence[VmDevice] = ()
    """Extra VM devices (virtio-blk disks)."""
    mounts: Sequence[MountSpec] = ()
    test_files: Sequence[Path] = ()
    """More modules for the cached base (share one base across a suite)."""
    modules: Sequence[str] = ()
    compression: str = initramfs.DEFAULT_COMPRESSION
    channel: str = "mem"
    """Or ``serial`` (the same frames on COM2)."""
    cmdline_extra: str = ""
    on_console: Callable[[bytes], None] | None = None
    quiet: bool = True
    console_input: bytes = b""
    vm_hook: Callable[[Vm], None] | None = None
    """Sees the Vm before it runs (e.g. to feed console input)."""
    observe: KernelFiles | None = None
    """Watch the guest kernel from the host with drgn (:mod:`ktstr.observe`), using this
    kernel's vmlinux and System.map; the result is :attr:`GuestRun.observation`."""
    watch_maps: Sequence[str] = ()
    """BPF maps the observer samples (``GuestObserver(watch_maps=)``)."""
    keep_guest_ram: bool = False
    """With ``observe``: keep guest RAM open after the run for a vmcore; the caller then
    closes it (:meth:`ktstr.observe.monitor.Observation.close`)."""
    trace: TraceSpec | None = None
    """Trace the scenario in the guest (:mod:`ktstr.guest.trace`); the result is
    :attr:`GuestRun.trace`."""
    pin_cpus: tuple[int, ...] = ()
    """Performance mode (:mod:`ktstr.vmm.performance`) when set: vCPU ``i`` pinned to host
    CPU ``pin_cpus[i]``; what the host gave is in ``GuestRun.vm.performance``."""
    fifo_vcpus: bool = False
    """In performance mode, SCHED_FIFO vCPU threads."""

    @property
    def guest_memory_mb(self) -> int:
        """``memory_mb``, else the topology's default (:meth:`Topology.default_memory_mb`)."""
        return self.topology.default_memory_mb(self.memory_mb)

    @property
    def timeout_s(self) -> float:
        """``timeout``, else twice the duration plus the topology's boot budget."""
        return self.timeout if self.timeout is not None else run_timeout_s(
            self.topology, self.duration_s)


@dataclass
class GuestRun:
    """Everything one guest run produced. ``ok`` is False exactly when ``failure`` is set."""

    vm: VmResult
    """Console, timing, exit counts."""
    base: initramfs.BaseArchive
    failure: str | None = None
    message: str = ""
    """One paragraph; the console is not in it (see :attr:`console_tail`)."""
    console_tail: str = ""
    """The console's end (``VmResult.console_tail``) when it explains the failure: a hang,
    a timeout, a kernel problem, an ejection, a missing end marker. Empty otherwise."""
    result: dict[str, Any] | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    sched_samples: list[dict[str, Any]] = field(default_factory=list)
    sched_exit: dict[str, Any] | None = None
    shell: dict[str, Any] | None = None
    traceback: str | None = None
    exit_code: int | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Every message that passed :func:`~ktstr.wire.messages.validate_message`."""
    channel_errors: list[str] = field(default_factory=list)
    reservation: dict[str, Any] = field(default_factory=dict)
    """The host CPUs this run held (``ktstr.reserve.Reservation.to_record``), if any."""
    """Transport errors and messages the host refused (at most ``frame.MAX_ERRORS``)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds since VM start on the host clock: ``hello`` (init running),
    ``scenario_start``, ``scenario_end``, ``end``; plus ``boot_ms`` from the boot port,
    and host phases ``prep_s`` (before ``vm.run()``) and ``vm_run_s`` (``vm.run()``)."""
    startup_steps: dict[str, float] = field(default_factory=dict)
    """The guest init's start-up steps (``wire.messages.STARTUP_STEPS``): seconds each took."""
    channel_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """Things the guest could not do but that do not fail the run (e.g. watchdog timeout)."""
    memory_mb: int | None = None
    """Guest RAM the VM booted with (set by :func:`run_guest`)."""
    timeout_s: float | None = None
    """The VM's hard timeout (set by :func:`run_guest`)."""
    observation: Observation | None = None
    """What the host-side observer saw (``GuestRequest.observe``)."""
    trace: TraceCapture | None = None
    """The guest's trace (``GuestRequest.trace``), reassembled."""

    @property
    def attached_state(self) -> dict[str, Any] | None:
        """The guest's ``sched_attached`` report (the scheduler attached), or None."""
        for m in self.messages:
            if m.get("type") == "sched_attached" and isinstance(m.get("state"), dict):
                return dict(m["state"])
        return None

    @property
    def attach_attempts(self) -> list[dict[str, Any]]:
        """Failed scheduler attach attempts (:class:`ktstr.scheduler.AttachPolicy`)."""
        state = self.attached_state
        attempts = (state.get("attempts") if state is not None
                    else self.details.get("attach_attempts"))
        return list(attempts) if isinstance(attempts, list) else []

    @property
    def retried_ejections(self) -> int:
        """Attach attempts the kernel ejected and the attach policy then retried (not the
        last one of an attach that failed for good)."""
        attempts = self.attach_attempts
        if self.attached_state is None:
            attempts = attempts[:-1]
        return sum(a.get("kind") == "scheduler_ejected" for a in attempts)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def summary(self) -> str:
        """The failure for a person: kind, message and, where it explains it, the console."""
        if self.ok:
            return "ok"
        tail = f"\nconsole tail:\n{self.console_tail}" if self.console_tail else ""
        return f"{self.failure}: {self.message}{tail}"


def run_guest(request: GuestRequest) -> GuestRun:
    """Boot ``request.kernel`` and run the request's scenario or shell in it."""
    from ktstr.vmm.vm import Vm

    entered = time.monotonic()
    req = request
    if (req.scenario is None) == (req.shell is None and not req.interactive):
        raise KtstrError("run_guest: give exactly one of scenario=, shell= or interactive=True")
    if req.channel not in ("mem", "serial"):
        raise KtstrError(f"channel {req.channel!r}: use 'mem' or 'serial'")
    test_file = Path(req.test_file).resolve() if req.test_file else None
    files = [Path(f).resolve() for f in (*req.test_files, *([test_file] if test_file else []))]
    bins = [Path(b).resolve() for b in req.binaries]
    scheduler = req.scheduler
    if scheduler is not None:
        binary = Path(scheduler.binary)
        if not binary.is_file():
            raise KtstrError(f"scheduler binary {binary} does not exist; build it "
                             "(ktstr kernel schedulers) or fix the path")
        scheduler = replace(scheduler, binary=str(binary.resolve()))
        bins.append(binary.resolve())
    busybox = initramfs.default_busybox()
    if (req.shell is not None or req.interactive) and busybox is None:
        raise KtstrError("ktstr shell needs busybox on the host (apt-get install busybox-static)")
    base = _base(initramfs.BaseSpec(
        test_files=tuple(dict.fromkeys(files)), binaries=tuple(dict.fromkeys(bins)),
        modules=tuple(req.modules), busybox=busybox, compression=req.compression))
    memory_mb, timeout_s = req.guest_memory_mb, req.timeout_s

    wire = RunRequest(
        scenario=req.scenario,
        test_file=str(test_file) if test_file else None,
        args=dict(req.args),
        shell=req.shell,
        interactive=req.interactive,
        topology=req.topology.label,
        duration_s=req.duration_s,
        scheduler=scheduler,
        sysctls={k: str(v) for k, v in req.sysctls.items()},
        mounts=list(req.mounts),
        busybox=str(busybox) if busybox else None,
        trace=req.trace,
    )
    chan = ResultChannel()
    chan.handlers["poke"] = lambda msg: _poke(chan, msg)
    vm_devices = [*req.devices]
    extra = req.cmdline_extra
    if req.channel == "mem":
        vm_devices.append(chan)
    else:
        extra = f"{extra} ktstr.channel=serial,ttyS1"

    with reap.temporary_directory("run") as tmp:
        suffix = tmp / "run.cpio"
        suffix.write_bytes(initramfs.build_suffix(
            {"ktstr/request.json": wire.to_json().encode()}))
        # The suffix goes first: the kernel's lz4 reader consumes everything after an lz4
        # stream (legacy frames have no end marker), so nothing may follow the base.
        observer = _observer(req)
        vm = Vm(Path(req.kernel), [suffix, base.path], req.topology, memory_mb=memory_mb,
                cmdline_extra=extra, devices=vm_devices, timeout=timeout_s, quiet=req.quiet,
                on_console=req.on_console, console_input=req.console_input,
                observer=observer,
                performance=Performance(req.pin_cpus, fifo=req.fifo_vcpus)
                if req.pin_cpus else None)
        if req.vm_hook is not None:
            req.vm_hook(vm)
        start = time.monotonic()
        result = vm.run()
    observation = observer.observation if observer is not None else None
    if observation is not None:
        if result.observer_error:
            observation.note(f"observer: {result.observer_error}")
        if not req.keep_guest_ram:
            observation.close()

    if req.channel == "mem":
        errors = chan.finish()
        timed = [(m.received - start, m.body) for m in chan.messages]
        nbytes = chan.bytes_received
    else:
        msgs, errors = decode_serial(result.channel2)
        timed = [(float("nan"), m) for m in msgs]
        nbytes = len(result.channel2)
    run = collect(timed, errors, result, base, nbytes, scenario_mode=req.scenario is not None)
    run.memory_mb, run.timeout_s = memory_mb, timeout_s
    run.observation = observation
    # Host phases: packing and VM set-up before vm.run(), and vm.run() itself (guest
    # memory and vCPU set-up, the guest's run, teardown).
    run.timings["prep_s"] = start - entered
    run.timings["vm_run_s"] = time.monotonic() - start
    return run


def _observer(req: GuestRequest) -> GuestObserver | None:
    """The host-side observer the request asks for, if drgn is here (said once if not)."""
    if req.observe is None:
        return None
    from ktstr.observe.monitor import GuestObserver
    from ktstr.observe.program import drgn_problem

    if (problem := drgn_problem()) is not None:
        _say_once(problem)
        return None
    return GuestObserver(req.observe, watch_maps=req.watch_maps, kernel=req.kernel)


@functools.cache
def _say_once(text: str) -> None:
    print(f"ktstr: {text}", file=sys.stderr)


_BASES: dict[initramfs.BaseSpec, initramfs.BaseArchive] = {}


def _base(spec: initramfs.BaseSpec) -> initramfs.BaseArchive:
    """:func:`initramfs.build_base`, checked once per process and spec.

    The cache check stats every packed file (~340 of them, ~1 s per run under the
    sandbox's 9p); within one test session they do not change, like the host's own
    imported modules.
    """
    known = _BASES.get(spec)
    if known is not None and known.path.is_file():
        return known
    base = initramfs.build_base(spec)
    _BASES[spec] = base
    return base


def _poke(chan: ResultChannel, msg: dict[str, Any]) -> None:
    """The guest asks us to write its own RAM (sched_ext watchdog timeout); bounds-checked."""
    problem = validate_message(msg)
    if problem is not None:
        raise ValueError(problem)
    if len(msg["data"]) > 16:
        raise ValueError("poke carries at most 8 bytes of hex data")
    chan.write_guest(msg["gpa"], bytes.fromhex(msg["data"]))


MAX_STEP_S = 1e6
"""A start-up step said to take longer (or under 0 s) is not a duration the guest measured."""


def startup_steps(body: Mapping[str, Any]) -> dict[str, float]:
    """The known start-up steps of a validated ``hello``/``scenario_start`` message, each
    kept only where its duration is plausible."""
    steps = body.get("steps") or {}
    return {name: float(steps[name]) for name in STARTUP_STEPS.get(body["type"], ())
            if name in steps and 0 <= steps[name] <= MAX_STEP_S}


def _last(by_type: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any] | None:
    items = by_type.get(kind)
    return items[-1] if items else None


def collect(timed: Sequence[tuple[float, Any]], channel_errors: list[str], vm: VmResult,
            base: initramfs.BaseArchive, nbytes: int, *, scenario_mode: bool) -> GuestRun:
    """Turn channel messages and the VmResult into a classified :class:`GuestRun`.

    A message that fails :func:`~ktstr.wire.messages.validate_message` is not used:
    it becomes a channel error, and the rest are classified as usual.
    """
    by_type: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    steps: dict[str, float] = {}
    errors = list(channel_errors)
    valid: list[tuple[float, dict[str, Any]]] = []
    for t, body in timed:
        problem = validate_message(body)
        if problem is not None:
            note_error(errors, f"channel: {problem}")
            continue
        valid.append((t, body))
        by_type.setdefault(body["type"], []).append(body)
        timings.setdefault(body["type"], t)
        for name, seconds in startup_steps(body).items():
            steps.setdefault(name, seconds)
    if vm.boot_ms is not None:
        timings["boot_ms"] = vm.boot_ms
    results = by_type.get("result", [])
    samples = [s for m in by_type.get("sched_samples", []) for s in m.get("samples", [])]
    end = _last(by_type, "end")
    failures = by_type.get("failure", [])
    guest_failure = failures[0] if failures else None
    run = GuestRun(
        vm=vm, base=base,
        result=results[-1].get("value") if results else None,
        reports=[m.get("data", {}) for m in by_type.get("report", [])],
        sched_samples=samples, sched_exit=_last(by_type, "sched_exit"),
        shell=_last(by_type, "shell"),
        traceback=guest_failure.get("traceback") if guest_failure else None,
        exit_code=end.get("exit_code") if end else vm.exit_code,
        messages=[b for _, b in valid], channel_errors=errors, timings=timings,
        startup_steps=steps,
        channel_bytes=nbytes,
        warnings=[str(m.get("text", "")) for m in by_type.get("warning", [])],
        trace=assemble(by_type.get("trace_chunk", []), _last(by_type, "trace_info")),
    )
    if vm.device_errors:
        first = (vm.device_error_messages or ["?"])[0]
        run.warnings.append(f"the VMM dropped guest accesses a device failed on: "
                            f"{vm.device_errors} (first: {first})")
    kernel_problem = console.run_failure(vm.console)
    states = "".join(f"\n  {line}" for line in vm.vcpu_states)
    if vm.reason == F_HUNG:
        run.failure = F_HUNG
        run.message = f"{vm.error}\nvCPU states:{states}\n{vm.detail}"
        run.console_tail = vm.console_tail
    elif vm.error and not vm.timed_out and not vm.panicked:
        run.failure, run.message = F_VM, str(vm.error)
    elif guest_failure is not None:
        run.failure = str(guest_failure.get("kind", "exception"))
        run.message = str(guest_failure.get("message", ""))
        run.details = dict(guest_failure.get("details") or {})
        if run.failure.startswith("scheduler") and run.details.get("log_tail"):
            run.message += "\nscheduler output:\n" + run.details["log_tail"][-2000:]
    elif kernel_problem is not None:
        run.failure, run.message = kernel_problem.kind, kernel_problem.line
        run.console_tail = vm.console_tail
    elif vm.reason == "reboot" and TRIPLE_FAULT in vm.detail:
        run.failure = F_TRIPLE_FAULT
        run.message = (f"{vm.detail.splitlines()[0]}: the guest was lost before its end "
                       f"marker (messages received: {', '.join(sorted(by_type)) or 'none'})\n"
                       f"{vm.detail}")
        run.console_tail = vm.console_tail
    elif (end is None or vm.timed_out) and (
            ejection := console.last_ejection(vm.console, run.retried_ejections)) is not None:
        # The kernel ejected the scheduler and the guest never finished: the ejection is the
        # cause (e.g. init itself was the stalled task), not the missing end marker.
        run.failure, run.message = F_EJECTED, f"{ejection}; the guest did not finish"
        run.console_tail = vm.console_tail
    elif vm.timed_out:
        run.failure = F_TIMEOUT
        run.message = f"{vm.error or 'guest timed out'}\nvCPU states:{states}"
        run.console_tail = vm.console_tail
    elif errors:
        run.failure, run.message = F_CHANNEL, "; ".join(errors)
    elif end is None:
        run.failure = F_NO_END
        how = vm.reason or "?"
        seen = ", ".join(sorted(by_type)) or "none"
        run.message = (f"guest ended ({how}{': ' + vm.detail if vm.detail else ''}) without "
                       f"its end marker (init died or the channel lost data; messages "
                       f"received: {seen})")
        run.console_tail = vm.console_tail
    elif scenario_mode and not results:
        run.failure, run.message = F_NO_RESULT, "the scenario sent no result"
    elif scenario_mode and end.get("exit_code") != 0:
        run.failure, run.message = "exit_code", f"guest exited with {end.get('exit_code')}"
    return run
