"""Host side of one guest run: pack, boot, collect, classify.

:func:`run_guest` builds (or reuses) the cached base initramfs and a per-run
suffix holding the request, boots a :class:`~ktstr.vmm.vm.Vm` with the result
channel attached, turns the channel's messages into a :class:`GuestRun` and
classifies anything that went wrong. It never hangs: the VM has a hard
timeout, and a missing end marker is itself a failure.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktstr import hostfault, initramfs, reap
from ktstr.errors import KtstrError
from ktstr.guest.sched import CLEAN_REASON, disabled_events
from ktstr.topology import Topology
from ktstr.vmm.devices.channel import ResultChannel
from ktstr.vmm.vcpu import TRIPLE_FAULT
from ktstr.wire.frame import decode_serial, note_error
from ktstr.wire.messages import validate_message
from ktstr.wire.request import MountSpec, RunRequest, SchedulerSpec

KERNEL_PROBLEM_RES = (
    ("panic", re.compile(r"Kernel panic - not syncing[^\n]*")),
    ("initramfs", re.compile(r"Initramfs unpacking failed[^\n]*")),
    ("kernel_bug", re.compile(r"(?m)^.*\bBUG: [^\n]*")),
    ("kernel_oops", re.compile(r"(?m)^.*\bOops: [^\n]*")),
    ("kernel_warning", re.compile(r"(?m)^.*\bWARNING: [^\n]*")),
)
CONSOLE_TAIL = 4000
# Failure kinds (GuestRun.failure); guest-side kinds come from ktstr.guest.sched.GuestFailure.
F_TIMEOUT = "timeout"
F_VM = "vm_error"
F_HUNG = hostfault.F_HUNG
F_TRIPLE_FAULT = hostfault.F_TRIPLE_FAULT
F_CHANNEL = "channel"
F_NO_END = "no_end_marker"
F_NO_RESULT = "no_result"


@dataclass(frozen=True)
class Scheduler:
    """The scheduler under test, as the host names it."""

    binary: Path
    args: Sequence[str] = ()
    ops_name: str | None = None
    """Expected sched_ext ops name (e.g. ``simple`` for scx_simple); None accepts any."""
    watchdog_timeout_ms: int | None = None
    attach_timeout_s: float = 20.0
    attach_retries: int = 0
    attach_transient: Sequence[str] = ()
    """See :class:`ktstr.scheduler.AttachPolicy`."""


@dataclass
class GuestRun:
    """Everything one guest run produced. ``ok`` is False exactly when ``failure`` is set."""

    failure: str | None
    message: str
    result: dict[str, Any] | None
    reports: list[dict[str, Any]]
    sched_samples: list[dict[str, Any]]
    sched_exit: dict[str, Any] | None
    shell: dict[str, Any] | None
    traceback: str | None
    exit_code: int | None
    messages: list[dict[str, Any]]
    """Every message that passed :func:`~ktstr.wire.messages.validate_message`."""
    channel_errors: list[str]
    """Transport errors and messages the host refused (at most ``frame.MAX_ERRORS``)."""
    timings: dict[str, float]
    """Seconds since VM start on the host clock: ``hello`` (init running),
    ``scenario_start``, ``scenario_end``, ``end``; plus ``boot_ms`` from the boot port,
    and host phases ``prep_s`` (before ``vm.run()``) and ``vm_run_s`` (``vm.run()``)."""
    vm: Any
    """The :class:`~ktstr.vmm.vm.VmResult` (console, timing, exit counts)."""
    base: initramfs.BaseArchive
    channel_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """Things the guest could not do but that do not fail the run (e.g. watchdog timeout)."""

    @property
    def attach_attempts(self) -> list[dict[str, Any]]:
        """Failed scheduler attach attempts (:class:`ktstr.scheduler.AttachPolicy`)."""
        for m in self.messages:
            if m.get("type") == "sched_attached" and isinstance(m.get("state"), dict):
                attempts = m["state"].get("attempts")
                return list(attempts) if isinstance(attempts, list) else []
        attempts = self.details.get("attach_attempts")
        return list(attempts) if isinstance(attempts, list) else []

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def console_tail(self) -> str:
        return str(getattr(self.vm, "console", ""))[-CONSOLE_TAIL:]

    def summary(self) -> str:
        if self.ok:
            return "ok"
        return f"{self.failure}: {self.message}"


def run_guest(
    kernel: Path | str,
    *,
    scenario: str | None = None,
    test_file: Path | str | None = None,
    args: Mapping[str, Any] | None = None,
    shell: str | None = None,
    interactive: bool = False,
    topology: Topology | str = "1n1l2c1t",
    memory_mb: int = 2048,
    timeout: float = 60.0,
    duration_s: float = 10.0,
    scheduler: Scheduler | None = None,
    sysctls: Mapping[str, str | int] | None = None,
    binaries: Sequence[Path | str] = (),
    devices: Sequence[Any] = (),
    mounts: Sequence[MountSpec] = (),
    test_files: Sequence[Path | str] = (),
    modules: Sequence[str] = (),
    compression: str = initramfs.DEFAULT_COMPRESSION,
    channel: str = "mem",
    cmdline_extra: str = "",
    on_console: Callable[[bytes], None] | None = None,
    quiet: bool = True,
    console_input: bytes = b"",
    vm_hook: Callable[[Any], None] | None = None,
) -> GuestRun:
    """Boot ``kernel`` and run ``scenario`` (``module:function`` from ``test_file``) in it.

    Or run ``shell`` (a ``sh -c`` command, busybox) / an ``interactive`` shell.
    ``test_files`` adds more modules to the cached base (share one base across a
    suite). ``devices`` are extra VmDevices (disks); ``mounts`` what to mount.
    ``vm_hook`` sees the Vm before it runs (e.g. to feed console input).
    """
    from ktstr.vmm.vm import Vm

    entered = time.monotonic()
    topo = Topology.parse(topology) if isinstance(topology, str) else topology
    if (scenario is None) == (shell is None and not interactive):
        raise KtstrError("run_guest: give exactly one of scenario=, shell= or interactive=True")
    if channel not in ("mem", "serial"):
        raise KtstrError(f"channel {channel!r}: use 'mem' or 'serial'")
    files = [Path(f).resolve() for f in (*test_files, *([test_file] if test_file else []))]
    bins = [Path(b).resolve() for b in binaries]
    if scheduler is not None:
        if not Path(scheduler.binary).is_file():
            raise KtstrError(f"scheduler binary {scheduler.binary} does not exist; build it "
                             "(ktstr kernel schedulers) or fix the path")
        bins.append(Path(scheduler.binary).resolve())
    busybox = initramfs.default_busybox()
    if (shell is not None or interactive) and busybox is None:
        raise KtstrError("ktstr shell needs busybox on the host (apt-get install busybox-static)")
    base = _base(initramfs.BaseSpec(
        test_files=tuple(dict.fromkeys(files)), binaries=tuple(dict.fromkeys(bins)),
        modules=tuple(modules), busybox=busybox, compression=compression))

    request = RunRequest(
        scenario=scenario,
        test_file=str(Path(test_file).resolve()) if test_file else None,
        args=dict(args or {}),
        shell=shell,
        interactive=interactive,
        topology=topo.label,
        duration_s=duration_s,
        scheduler=SchedulerSpec(
            binary=str(Path(scheduler.binary).resolve()), args=list(scheduler.args),
            ops_name=scheduler.ops_name, attach_timeout_s=scheduler.attach_timeout_s,
            watchdog_timeout_ms=scheduler.watchdog_timeout_ms,
            attach_retries=scheduler.attach_retries,
            attach_transient=list(scheduler.attach_transient),
        ) if scheduler else None,
        sysctls={k: str(v) for k, v in (sysctls or {}).items()},
        mounts=list(mounts),
        busybox=str(busybox) if busybox else None,
    )
    chan = ResultChannel()
    chan.handlers["poke"] = lambda msg: _poke(chan, msg)
    vm_devices = [*devices]
    extra = cmdline_extra
    if channel == "mem":
        vm_devices.append(chan)
    else:
        extra = f"{extra} ktstr.channel=serial,ttyS1"

    with reap.temporary_directory("run") as tmp:
        suffix = tmp / "run.cpio"
        suffix.write_bytes(initramfs.build_suffix(
            {"ktstr/request.json": request.to_json().encode()}))
        # The suffix goes first: the kernel's lz4 reader consumes everything after an lz4
        # stream (legacy frames have no end marker), so nothing may follow the base.
        vm = Vm(Path(kernel), [suffix, base.path], topo, memory_mb=memory_mb,
                cmdline_extra=extra, devices=vm_devices, timeout=timeout, quiet=quiet,
                on_console=on_console, console_input=console_input)
        if vm_hook is not None:
            vm_hook(vm)
        start = time.monotonic()
        result = vm.run()

    if channel == "mem":
        errors = chan.finish()
        timed = [(m.received - start, m.body) for m in chan.messages]
        nbytes = chan.bytes_received
    else:
        msgs, errors = decode_serial(result.channel2)
        timed = [(float("nan"), m) for m in msgs]
        nbytes = len(result.channel2)
    run = collect(timed, errors, result, base, nbytes, scenario_mode=scenario is not None)
    # Host phases: packing and VM set-up before vm.run(), and vm.run() itself (guest
    # memory and vCPU set-up, the guest's run, teardown).
    run.timings["prep_s"] = start - entered
    run.timings["vm_run_s"] = time.monotonic() - start
    return run


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


def _last(by_type: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any] | None:
    items = by_type.get(kind)
    return items[-1] if items else None



def _unclean_ejection(console: str) -> str | None:
    """The kernel's last 'BPF scheduler disabled' record, unless it was a clean unregister."""
    events = disabled_events(console.splitlines())
    if not events or events[-1]["reason"] == CLEAN_REASON:
        return None
    ev = events[-1]
    detail = f": {ev['message']}" if ev["message"] else ""
    return f"scheduler {ev['name']!r} was ejected ({ev['reason']}{detail})"

def collect(timed: Sequence[tuple[float, Any]], channel_errors: list[str], vm: Any,
            base: initramfs.BaseArchive, nbytes: int, *, scenario_mode: bool) -> GuestRun:
    """Turn channel messages and the VmResult into a classified :class:`GuestRun`.

    A message that fails :func:`~ktstr.wire.messages.validate_message` is not used:
    it becomes a channel error, and the rest are classified as usual.
    """
    by_type: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
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
    if getattr(vm, "boot_ms", None) is not None:
        timings["boot_ms"] = vm.boot_ms
    results = by_type.get("result", [])
    samples = [s for m in by_type.get("sched_samples", []) for s in m.get("samples", [])]
    sched_exit = _last(by_type, "sched_exit")
    shell = _last(by_type, "shell")
    end = _last(by_type, "end")
    failures = by_type.get("failure", [])
    guest_failure = failures[0] if failures else None
    run = GuestRun(
        failure=None, message="",
        result=results[-1].get("value") if results else None,
        reports=[m.get("data", {}) for m in by_type.get("report", [])],
        sched_samples=samples, sched_exit=sched_exit, shell=shell,
        traceback=guest_failure.get("traceback") if guest_failure else None,
        exit_code=end.get("exit_code") if end else getattr(vm, "exit_code", None),
        messages=[b for _, b in valid], channel_errors=errors, timings=timings,
        vm=vm, base=base, channel_bytes=nbytes,
        warnings=[str(m.get("text", "")) for m in by_type.get("warning", [])],
    )
    device_errors = getattr(vm, "device_errors", None)
    if device_errors:
        first = (getattr(vm, "device_error_messages", None) or ["?"])[0]
        run.warnings.append(f"the VMM dropped guest accesses a device failed on: "
                            f"{device_errors} (first: {first})")
    console = str(getattr(vm, "console", ""))
    kernel_problem = next(((k, m.group(0).strip()) for k, rx in KERNEL_PROBLEM_RES
                           if (m := rx.search(console))), None)
    states = "".join(f"\n  {line}" for line in getattr(vm, "vcpu_states", None) or [])
    if getattr(vm, "reason", "") == F_HUNG:
        run.failure = F_HUNG
        run.message = (f"{vm.error}\nvCPU states:{states}\n{vm.detail}\nconsole tail:\n"
                       f"{console[-CONSOLE_TAIL:]}")
    elif getattr(vm, "error", None) and not getattr(vm, "timed_out", False) and not (
            getattr(vm, "panicked", False)):
        run.failure, run.message = F_VM, str(vm.error)
    elif guest_failure is not None:
        run.failure = str(guest_failure.get("kind", "exception"))
        run.message = str(guest_failure.get("message", ""))
        run.details = dict(guest_failure.get("details") or {})
        if run.failure.startswith("scheduler") and run.details.get("log_tail"):
            run.message += "\nscheduler output:\n" + run.details["log_tail"][-2000:]
    elif kernel_problem is not None:
        run.failure = kernel_problem[0]
        run.message = f"{kernel_problem[1]}\nconsole tail:\n{console[-CONSOLE_TAIL:]}"
    elif getattr(vm, "reason", "") == "reboot" and TRIPLE_FAULT in str(getattr(vm, "detail", "")):
        run.failure = F_TRIPLE_FAULT
        run.message = (f"{str(vm.detail).splitlines()[0]}: the guest was lost before its end "
                       f"marker (messages received: {', '.join(sorted(by_type)) or 'none'})\n"
                       f"{vm.detail}\nconsole tail:\n{console[-CONSOLE_TAIL:]}")
    elif (end is None or getattr(vm, "timed_out", False)) and (
            ejection := _unclean_ejection(console)) is not None:
        # The kernel ejected the scheduler and the guest never finished: the ejection is the
        # cause (e.g. init itself was the stalled task), not the missing end marker.
        run.failure = "scheduler_ejected"
        run.message = (f"{ejection}; the guest did not finish\nconsole tail:\n"
                       f"{console[-CONSOLE_TAIL:]}")
    elif getattr(vm, "timed_out", False):
        run.failure = F_TIMEOUT
        run.message = (f"{vm.error or 'guest timed out'}\nvCPU states:{states}\n"
                       f"console tail:\n{console[-CONSOLE_TAIL:]}")
    elif errors:
        run.failure, run.message = F_CHANNEL, "; ".join(errors)
    elif end is None:
        run.failure = F_NO_END
        how = getattr(vm, "reason", "") or "?"
        detail = str(getattr(vm, "detail", "") or "")
        seen = ", ".join(sorted(by_type)) or "none"
        run.message = (f"guest ended ({how}{': ' + detail if detail else ''}) without its end "
                       f"marker (init died or the channel lost data; messages received: "
                       f"{seen})\nconsole tail:\n{console[-CONSOLE_TAIL:]}")
    elif scenario_mode and not results:
        run.failure, run.message = F_NO_RESULT, "the scenario sent no result"
    elif scenario_mode and end.get("exit_code") != 0:
        run.failure, run.message = "exit_code", f"guest exited with {end.get('exit_code')}"
    return run
