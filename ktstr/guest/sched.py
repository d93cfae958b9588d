"""The scheduler under test, inside the guest: start, wait for attach, sample, stop.

sched_ext exposes its state in sysfs: ``/sys/kernel/sched_ext/state``
(``enabled``/``disabled``/``enabling``/``disabling``), ``root/ops`` (the
attached scheduler's name), and counters. When the kernel ejects a scheduler
it logs ``sched_ext: BPF scheduler "NAME" disabled (REASON)`` and, for an
``scx_bpf_error()``, a second line ``sched_ext: NAME: MESSAGE``; we read those
from ``/dev/kmsg`` and parse them with :mod:`ktstr.console`, as the host does.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ktstr.console import UNREGISTERED, disabled_events, exit_text, is_ejection
from ktstr.wire.request import SchedulerSpec

SCX = Path("/sys/kernel/sched_ext")
LOG_PATH = "/tmp/ktstr-scheduler.log"
MAX_SAMPLES = 4000


class GuestFailure(Exception):
    """A classified failure inside the guest; ``kind`` is what the host reports."""

    def __init__(self, kind: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = details


def read_text(path: Path | str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def scx_state() -> dict[str, Any]:
    """One snapshot of sched_ext's sysfs state (empty dict when the kernel has none)."""
    if not SCX.is_dir():
        return {}
    out: dict[str, Any] = {
        "state": read_text(SCX / "state"),
        "ops": read_text(SCX / "root" / "ops"),
    }
    for name in ("switch_all", "nr_rejected", "hotplug_seq", "enable_seq"):
        value = read_text(SCX / name, "")
        if value.lstrip("-").isdigit():
            out[name] = int(value)
    return out


class Kmsg:
    """Reads new kernel log records (non-blocking) from /dev/kmsg."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            self._fd = None
        self.lines: list[str] = []

    def poll(self) -> list[str]:
        new: list[str] = []
        while self._fd is not None:
            try:
                rec = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records overwritten; just continue reading
                continue
            if not rec:
                break
            text = rec.decode(errors="replace")
            _, _, msg = text.partition(";")
            new.append(msg.split("\n", 1)[0])
        self.lines.extend(new)
        return new

    def sched_ext_lines(self, since: int = 0) -> list[str]:
        """sched_ext records, from record number ``since`` on (all by default)."""
        self.poll()
        return [line for line in self.lines[since:] if "sched_ext" in line]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def tail(path: str, limit: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


@dataclass
class ExitReport:
    exit_status: int | None
    """Process exit status; negative = killed by that signal; None = still running (killed)."""
    stopped_by: str
    """'sigint', 'sigkill', or 'exited' (it was gone before we stopped it)."""
    state_after: str
    clean_unregister: bool
    disabled: list[dict[str, str]] = field(default_factory=list)
    kernel_lines: list[str] = field(default_factory=list)
    log_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SchedulerProcess:
    def __init__(self, spec: SchedulerSpec, kmsg: Kmsg) -> None:
        self.spec = spec
        self.kmsg = kmsg
        self.proc: subprocess.Popen[bytes] | None = None
        self.name: str | None = None
        self._mark = 0
        """Kernel log records before the current attempt (older ones are not its own)."""

    def start(self) -> None:
        if not os.path.exists(self.spec.binary):
            raise GuestFailure("scheduler_missing",
                               f"scheduler binary {self.spec.binary} is not in the guest")
        if not SCX.is_dir():
            raise GuestFailure("scheduler_unsupported",
                               "this kernel has no sched_ext (/sys/kernel/sched_ext missing)")
        log = open(LOG_PATH, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen([self.spec.binary, *self.spec.args],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            raise GuestFailure("scheduler_missing",
                               f"cannot start {self.spec.binary}: {err}") from err
        finally:
            log.close()

    def attach(self) -> dict[str, Any]:
        """Start the scheduler and wait until it is attached, retrying transient failures.

        Returns the attached state, with ``attempts``: every failed attempt (kind, message,
        scheduler output tail). A failure that matches none of the spec's transient
        patterns, or the last allowed one, is raised with the attempts in its details.
        """
        attempts: list[dict[str, Any]] = []
        patterns = [re.compile(p) for p in self.spec.attach_transient]
        while True:
            self._mark = len(self.kmsg.lines)
            pinned = (pin_enable_helper(self.spec.attach_init_cpu)
                      if self.spec.attach_init_cpu is not None else [])
            self.start()
            try:
                state = self.wait_attached()
            except GuestFailure as err:
                if err.kind not in ("scheduler_crashed", "scheduler_attach_timeout",
                                    "scheduler_ejected"):
                    raise
                if self.proc is not None and self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
                seen = "\n".join([err.message, str(err.details.get("log_tail", "")),
                                  *err.details.get("kernel_lines", [])])
                transient = next((p.pattern for p in patterns if p.search(seen)), None)
                attempts.append({"attempt": len(attempts) + 1, "kind": err.kind,
                                 "message": err.message, "transient": transient,
                                 "enable_helper_pinned": pinned,
                                 "log_tail": str(err.details.get("log_tail", ""))[-1500:]})
                if transient is None or len(attempts) > self.spec.attach_retries:
                    err.details["attach_attempts"] = attempts
                    if len(attempts) > 1:
                        err.message += f" (attempt {len(attempts)} of " \
                                       f"{self.spec.attach_retries + 1})"
                    raise
                _wait_disabled(2.0)
                continue
            state["attempts"] = attempts
            return state

    def wait_attached(self) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + self.spec.attach_timeout_s
        want = self.spec.ops_name
        while True:
            state = scx_state()
            if state.get("state") == "enabled" and state.get("ops") and (
                want is None or state["ops"] == want
            ):
                self.name = state["ops"]
                return state
            lines = self.kmsg.sched_ext_lines(self._mark)
            ejected = [e for e in disabled_events(lines) if is_ejection(e["reason"])]
            if ejected:
                # The kernel logs the exit's message on the line after; the scheduler
                # process ends once it sees the exit. Give both a moment, so the message
                # (what an attach policy's transient patterns match) is there.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2.0)
                lines = self.kmsg.sched_ext_lines(self._mark)
                ejected = [e for e in disabled_events(lines) if is_ejection(e["reason"])]
                # Ejected while enabling (a stall in the enable path, say): say so, not
                # "did not attach" at the timeout.
                raise GuestFailure(
                    "scheduler_ejected",
                    f"scheduler {self.spec.binary} was ejected while attaching "
                    f"(sched_ext: {exit_text(ejected[-1])})",
                    log_tail=tail(LOG_PATH), kernel_lines=lines)
            rc = self.proc.poll()
            if rc is not None:
                events = disabled_events(lines)
                why = f" (sched_ext: {exit_text(events[-1])})" if events else ""
                raise GuestFailure(
                    "scheduler_crashed",
                    f"scheduler {self.spec.binary} exited with status {rc} before attaching"
                    f"{why}", log_tail=tail(LOG_PATH), kernel_lines=lines)
            if time.monotonic() > deadline:
                raise GuestFailure(
                    "scheduler_attach_timeout",
                    f"scheduler did not attach within {self.spec.attach_timeout_s:g} s "
                    f"(state {state.get('state')!r}, ops {state.get('ops')!r}, "
                    f"expected {want or 'any'})",
                    log_tail=tail(LOG_PATH), kernel_lines=self.kmsg.sched_ext_lines(self._mark))
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> ExitReport:
        assert self.proc is not None
        stopped_by = "exited"
        if self.proc.poll() is None:
            stopped_by = "sigint"
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.spec.stop_timeout_s)
            except subprocess.TimeoutExpired:
                stopped_by = "sigkill"
                self.proc.kill()
                self.proc.wait()
        _wait_disabled(2.0)  # the kernel finishes disabling asynchronously
        lines = self.kmsg.sched_ext_lines(self._mark)
        events = disabled_events(lines)
        state_after = read_text(SCX / "state")
        last = events[-1] if events else None
        clean = (stopped_by == "sigint" and self.proc.returncode == 0
                 and state_after == "disabled" and last is not None
                 and last["reason"] == UNREGISTERED)
        return ExitReport(self.proc.returncode, stopped_by, state_after, clean, events,
                          lines[-50:], tail(LOG_PATH))


class SchedulerControl:
    """The scheduler lifecycle a scenario drives (detach, attach, replace) in one boot.

    ``current`` is the attached process (None while the kernel's own scheduler runs);
    ``busy`` is set during a switch so the sampler does not call it an ejection. Every
    attach and detach is kept in ``events`` for the host.
    """

    def __init__(self, spec: SchedulerSpec | None, kmsg: Kmsg,
                 current: SchedulerProcess | None) -> None:
        self.spec = spec
        self.kmsg = kmsg
        self.proc = current
        self.busy = False
        self.events: list[dict[str, Any]] = []
        self._t0 = time.monotonic()

    def current(self) -> str | None:
        return self.proc.name if self.proc is not None and self.proc.alive() else None

    def state(self) -> dict[str, Any]:
        return scx_state()

    def detach(self) -> None:
        if self.proc is None:
            raise GuestFailure("scenario", "DetachScheduler: no scheduler is attached")
        self.busy = True
        try:
            report = self.proc.stop()
            self.proc = None
        finally:
            self.busy = False
        self.events.append({"t": round(time.monotonic() - self._t0, 3), "op": "detach",
                            "clean": report.clean_unregister, "state": report.state_after})
        if not report.clean_unregister:
            raise GuestFailure(
                "scheduler_ejected",
                f"the scheduler did not detach cleanly (stopped by {report.stopped_by}, "
                f"exit status {report.exit_status}, state {report.state_after!r})",
                log_tail=report.log_tail, kernel_lines=report.kernel_lines)

    def attach(self, binary: str | None, args: tuple[str, ...] | None) -> None:
        if self.spec is None:
            raise GuestFailure("scenario", "AttachScheduler: this run has no sched_ext "
                               "scheduler (it runs under the kernel's own)")
        if self.proc is not None:
            raise GuestFailure("scenario", f"AttachScheduler: {self.proc.name!r} is still "
                               "attached (detach it first, or use ReplaceScheduler)")
        spec = replace(self.spec, binary=binary or self.spec.binary,
                       args=list(args) if args is not None else list(self.spec.args),
                       ops_name=None if binary else self.spec.ops_name)
        proc = SchedulerProcess(spec, self.kmsg)
        self.busy = True
        try:
            state = proc.attach()
            self.proc = proc
        finally:
            self.busy = False
        self.events.append({"t": round(time.monotonic() - self._t0, 3), "op": "attach",
                            "binary": spec.binary, "args": spec.args, "ops": state.get("ops")})


ENABLE_HELPERS = ("scx_ops_enable_helper", "scx_enable_helper")
"""Names of the kthread sched_ext enables a scheduler in (6.12; later kernels)."""


def pin_enable_helper(cpu: int, proc: Path = Path("/proc")) -> list[int]:
    """Pin sched_ext's enable helper kthread(s) to ``cpu``; the pids pinned.

    The helper only exists once a scheduler has been enabled in this boot; before that
    there is nothing to pin, and an affinity the kernel refuses is left as it was.
    """
    pinned: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        if read_text(entry / "comm") not in ENABLE_HELPERS:
            continue
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(entry.name), {cpu})
            pinned.append(int(entry.name))
    return pinned


def _wait_disabled(limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while read_text(SCX / "state") not in ("disabled", "") and time.monotonic() < deadline:
        time.sleep(0.01)


class Sampler(threading.Thread):
    """Samples sched_ext state periodically; notices the scheduler being ejected."""

    def __init__(self, interval: float, control: SchedulerControl | None) -> None:
        super().__init__(name="ktstr-sampler", daemon=True)
        self.interval = max(0.01, interval)
        self.control = control
        self.samples: list[dict[str, Any]] = []
        self.ejected_at: float | None = None
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def sample(self) -> None:
        snap = scx_state()
        snap["t"] = round(time.monotonic() - self._t0, 4)
        control = self.control
        # Only a scheduler that should be attached can be ejected: not between a
        # scenario's own detach and attach, nor during either.
        sched = control.proc if control is not None and not control.busy else None
        if sched is not None:
            snap["alive"] = sched.alive()
            if self.ejected_at is None and (snap.get("state") != "enabled" or not snap["alive"]):
                self.ejected_at = snap["t"]
        if len(self.samples) >= MAX_SAMPLES:
            del self.samples[::2]  # decimate rather than grow without bound
        self.samples.append(snap)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.sample()
