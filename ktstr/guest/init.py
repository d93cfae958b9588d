"""PID 1 of the test VM: set the machine up, run the scenario, report, power off.

``/init`` in the initramfs is a two-line Python script that puts the packed
``ktstr`` on ``sys.path`` and calls :func:`main`. Order of work:

1. mount devtmpfs, mark boot time on ``ports.BOOT_PORT``, mount the rest
   (proc, sysfs, cgroup2 with +cpuset +cpu +memory, tmpfs, debugfs, tracefs, bpffs);
2. open the result channel (``ktstr.channel=`` on the kernel command line);
3. read the run request (``/ktstr/request.json``), apply sysctls, mount disks;
4. start the scheduler and wait until sched_ext reports it attached;
5. run the scenario with a :class:`~ktstr.guest.context.Context`, sampling
   sched_ext state; stop the scheduler with SIGINT and report how it went;
6. send ``end`` with the exit code, write it to ``ports.EXIT_PORT``, power off.

Any exception is sent to the host as a full traceback; PID 1 never returns
(the kernel would panic), it always powers off.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ktstr.guest.channel import Channel, NullChannel, open_channel
from ktstr.guest.context import Context, online_cpus
from ktstr.guest.disks import mount_disks
from ktstr.guest.sched import (
    GuestFailure,
    Kmsg,
    Sampler,
    SchedulerControl,
    SchedulerProcess,
    read_text,
)
from ktstr.guest.trace import Tracer, trace_messages
from ktstr.topology import Topology
from ktstr.wire import ports
from ktstr.wire.request import REQUEST_PATH, RunRequest

RB_POWER_OFF = 0x4321FEDC
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
DEFAULT_SYSCTLS = {"kernel.sched_schedstats": "1", "kernel.kptr_restrict": "0"}
CGROUP_ROOT = Path("/sys/fs/cgroup/ktstr")
SCRATCH = Path("/tmp/ktstr")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin:/ktstr/bin"

_libc = ctypes.CDLL(None, use_errno=True)


def log(text: str) -> None:
    """To the console (the host keeps it in VmResult.console)."""
    try:
        sys.stderr.write(f"ktstr-init: {text}\n")
        sys.stderr.flush()
    except OSError:
        pass


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "",
          must: bool = True) -> bool:
    os.makedirs(target, exist_ok=True)
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                     data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        if err == 16:  # EBUSY: already mounted (e.g. devtmpfs automount)
            return True
        if must:
            raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")
        log(f"mount {fstype} on {target} failed: {os.strerror(err)}")
        return False
    return True


def port_write(port: int, value: int) -> None:
    try:
        fd = os.open("/dev/port", os.O_WRONLY)
    except OSError:
        return
    try:
        os.pwrite(fd, bytes([value & 0xFF]), port)
    except OSError:
        pass
    finally:
        os.close(fd)


def early_mounts() -> None:
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def late_mounts() -> None:
    # Packed files may live under /tmp (test files are packed at their host paths): a
    # tmpfs would hide them, and the initramfs root is RAM-backed anyway.
    os.makedirs("/tmp", exist_ok=True)
    if not os.listdir("/tmp"):
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.chmod("/tmp", 0o1777)
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("debugfs", "/sys/kernel/debug", "debugfs", must=False)
    mount("tracefs", "/sys/kernel/tracing", "tracefs", must=False)
    mount("bpf", "/sys/fs/bpf", "bpf", must=False)
    controllers = read_text("/sys/fs/cgroup/cgroup.controllers").split()
    wanted = [c for c in ("cpuset", "cpu", "memory") if c in controllers]
    if wanted:
        Path("/sys/fs/cgroup/cgroup.subtree_control").write_text(
            " ".join(f"+{c}" for c in wanted))
    CGROUP_ROOT.mkdir(exist_ok=True)
    if wanted:
        (CGROUP_ROOT / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
    SCRATCH.mkdir(parents=True, exist_ok=True)


def set_sysctl(name: str, value: str) -> None:
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        path.write_text(str(value))
    except OSError as err:
        raise GuestFailure("sysctl", f"cannot set {name}={value}: {err.strerror}") from err


def load_function(ref: str, test_file: str | None) -> Any:
    module_name, sep, func_name = ref.partition(":")
    if not sep or not module_name or not func_name:
        raise GuestFailure("request", f"scenario {ref!r} is not of the form module:function")
    if test_file:
        sys.path.insert(0, os.path.dirname(test_file))
        spec = importlib.util.spec_from_file_location(module_name, test_file)
        if spec is None or spec.loader is None:
            raise GuestFailure("request", f"cannot import {test_file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if func is None:
        raise GuestFailure("request", f"{module_name} has no function {func_name}")
    # A decorated test may keep the scenario body on an attribute.
    return getattr(func, "__ktstr_scenario__", func)


def uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Steps:
    """Seconds each start-up step took, for the host's phase table (``steps`` fields)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.times[name] = round(now - self._last, 4)
        self._last = now

    def take(self) -> dict[str, float]:
        """The steps so far (then starts afresh)."""
        times, self.times = self.times, {}
        self._last = time.monotonic()
        return times


def kernel_symbols(*names: str) -> dict[str, int | None]:
    """Addresses from /proc/kallsyms (one pass; None for a name not found)."""
    out: dict[str, int | None] = dict.fromkeys(names)
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                addr, _, sym = line.split()[:3]
                if sym in out and out[sym] is None:
                    out[sym] = int(addr, 16)
    except OSError:
        pass
    return out


def config_value(name: str) -> str | None:
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith(name + "="):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


WATCHDOG_MAX_TIMEOUT_S = 30
"""SCX_WATCHDOG_MAX_TIMEOUT: the longest timeout a scheduler's ops can ask for."""


def jiffies_now() -> int | None:
    """The kernel's jiffies, from /proc/schedstat's ``timestamp`` line (CONFIG_SCHEDSTATS)."""
    for line in read_text("/proc/schedstat").splitlines():
        if line.startswith("timestamp "):
            return int(line.split()[1])
    return None


def watchdog_pokes(timeout_ms: int) -> list[dict[str, Any]]:
    """Requests for the host to set the kernel's sched_ext watchdog timeout.

    6.12 keeps it in ``scx_watchdog_timeout`` (jiffies), set from the
    scheduler's ops on enable, with no knob; the host writes it in guest RAM.
    The physical addresses come from /proc/kallsyms and /proc/iomem.

    Lowering the timeout alone is wrong for the first watchdog period: at
    enable the kernel queued its watchdog work ``old timeout / 2`` ahead (15 s
    for a scheduler without ``timeout_ms``), and ``scx_tick`` compares the
    enable-time ``scx_watchdog_timestamp`` with the *new* timeout, so it
    ejects ("watchdog failed to check in") before the work first runs. So the
    timestamp is moved past that first run first; the work's first run resets
    it, checks tasks against the new timeout and re-arms at ``new / 2``.
    """
    syms = kernel_symbols("_text", "scx_watchdog_timestamp", "scx_watchdog_timeout")
    text = syms.pop("_text")
    phys_text = None
    for line in read_text("/proc/iomem").splitlines():
        if line.strip().endswith("Kernel code"):
            phys_text = int(line.strip().split("-")[0], 16)
            break
    hz = int(config_value("CONFIG_HZ") or "0")
    now = jiffies_now()
    if text is None or phys_text is None or not hz or None in syms.values() or now is None:
        raise GuestFailure("watchdog", "cannot locate the sched_ext watchdog in this kernel "
                           "(needs KALLSYMS_ALL, IKCONFIG_PROC and SCHEDSTATS)")

    def poke(name: str, value: int) -> dict[str, Any]:
        addr = syms[name]
        assert addr is not None and text is not None and phys_text is not None
        return {"type": "poke", "gpa": addr - text + phys_text,
                "data": (value & (1 << 64) - 1).to_bytes(8, "little").hex(), "what": name}

    jiffies = max(1, timeout_ms * hz // 1000)
    return [poke("scx_watchdog_timestamp", now + WATCHDOG_MAX_TIMEOUT_S * hz),
            poke("scx_watchdog_timeout", jiffies)]


def run_scenario(req: RunRequest, chan: Channel, kmsg: Kmsg, steps: Steps) -> int:
    sched: SchedulerProcess | None = None
    if req.scheduler is not None:
        sched = SchedulerProcess(req.scheduler, kmsg)
        state = sched.attach()
        chan.send({"type": "sched_attached", "state": state, "uptime": uptime()})
        if req.scheduler.watchdog_timeout_ms:
            try:
                for poke in watchdog_pokes(req.scheduler.watchdog_timeout_ms):
                    chan.send(poke)  # applied by the host before send() returns, in order
            except GuestFailure as err:  # the run is still meaningful with the default
                chan.send({"type": "warning", "text": err.message})
        steps.done("attach")
    try:
        disks = mount_disks(req.mounts)
    except (OSError, ValueError) as err:  # a disk that never appeared, or a failed mount
        raise GuestFailure("disk", str(err)) from err
    steps.done("disks")
    func = load_function(req.scenario or "", req.test_file)
    steps.done("import")
    topo = Topology.parse(req.topology) if req.topology else None
    control = SchedulerControl(req.scheduler, kmsg, sched)
    ctx = Context(channel=chan, topology=topo, cpus=online_cpus(), duration_s=req.duration_s,
                  cgroup_root=CGROUP_ROOT, scratch=SCRATCH, disks=disks, args=req.args,
                  scheduler=sched.name if sched else None, scheduler_control=control)
    sampler = Sampler(req.sample_interval_s, control)
    sampler.start()
    tracer = Tracer(req.trace) if req.trace is not None else None
    if tracer is not None:
        tracer.start()
    steps.done("setup")
    chan.send({"type": "scenario_start", "uptime": uptime(), "steps": steps.take()})
    failure: GuestFailure | None = None
    scenario_error: Exception | None = None
    value = None
    try:
        value = func(ctx)
    except Exception as err:  # reported below, after the scheduler's fate is known
        scenario_error = err
    finally:
        sampler.stop()
        if tracer is not None:
            for msg in trace_messages(*tracer.stop()):
                chan.send(msg)
        chan.send({"type": "scenario_end", "uptime": uptime()})
        chan.send({"type": "sched_samples", "samples": sampler.samples})
        sched = control.proc  # the scenario may have detached or replaced it
        if sched is not None:
            report = sched.stop()
            chan.send({"type": "sched_exit", **report.to_dict()})
            if sampler.ejected_at is not None and not report.clean_unregister:
                ev = report.disabled[-1] if report.disabled else {}
                reason = ev.get("reason", "scheduler process exited")
                detail = f": {ev['message']}" if ev.get("message") else ""
                failure = GuestFailure(
                    "scheduler_ejected",
                    f"scheduler {sched.name!r} was ejected during the scenario "
                    f"({reason}{detail})", log_tail=report.log_tail,
                    kernel_lines=report.kernel_lines)
    if scenario_error is not None:
        if failure is not None:
            # The ejection is the cause; what the scenario hit afterwards is its symptom.
            failure.message += (f"; the scenario then failed: "
                                f"{type(scenario_error).__name__}: {scenario_error}")
            raise failure from scenario_error
        raise scenario_error
    if value is not None and not isinstance(value, dict):
        raise GuestFailure("result", f"scenario returned {type(value).__name__}, expected a "
                           "dict or None")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise GuestFailure("result", f"scenario result is not JSON-serialisable: {err}") from err
    chan.send({"type": "result", "value": value})
    if failure is not None:
        raise failure
    return 0


def run_shell(req: RunRequest, chan: Channel) -> int:
    sh = [req.busybox, "sh"] if req.busybox else ["/bin/sh"]
    env = {"PATH": PATH, "HOME": "/root", "TERM": "linux"}
    os.makedirs("/root", exist_ok=True)
    if req.interactive:
        import fcntl
        import termios

        def take_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        with open("/dev/ttyS0", "r+b", buffering=0) as tty:
            proc = subprocess.run(sh, stdin=tty, stdout=tty, stderr=tty, env=env, cwd="/root",
                                  start_new_session=True, preexec_fn=take_tty, check=False)
        code = proc.returncode
    else:
        proc = subprocess.run([*sh, "-c", req.shell or ""], capture_output=True, env=env,
                              cwd="/root", stdin=subprocess.DEVNULL, check=False)
        code = proc.returncode
        chan.send({"type": "shell", "exit_code": code,
                   "stdout": proc.stdout.decode(errors="surrogateescape"),
                   "stderr": proc.stderr.decode(errors="surrogateescape")})
    return code if code >= 0 else 128 - code


def poweroff(code: int) -> None:
    os.sync()
    port_write(ports.EXIT_PORT, code)
    _libc.reboot(RB_POWER_OFF)
    while True:  # PID 1 must not exit
        time.sleep(1)


def main() -> None:
    code = 1
    chan: Channel = NullChannel()
    kmsg: Kmsg | None = None
    try:
        early_mounts()
        port_write(ports.BOOT_PORT, ports.BOOT_MAGIC)
        steps = Steps()
        os.environ.update({"PATH": PATH, "HOME": "/root"})
        late_mounts()
        steps.done("mounts")
        chan = open_channel(read_text("/proc/cmdline"))
        steps.done("channel")
        chan.send({"type": "hello", "uptime": uptime(), "kernel": os.uname().release,
                   "steps": steps.take()})
        kmsg = Kmsg()
        req = RunRequest.from_json(Path(REQUEST_PATH).read_text())
        for name, value in {**DEFAULT_SYSCTLS, **req.sysctls}.items():
            set_sysctl(name, value)
        steps.done("request")
        if req.shell is not None or req.interactive:
            code = run_shell(req, chan)
        else:
            code = run_scenario(req, chan, kmsg, steps)
    except GuestFailure as err:
        log(f"failure ({err.kind}): {err.message}")
        _send(chan, {"type": "failure", "kind": err.kind, "message": err.message,
                     "details": err.details, "traceback": traceback.format_exc()})
        code = 1
    except BaseException as err:
        tb = traceback.format_exc()
        log(tb)
        _send(chan, {"type": "failure", "kind": "exception",
                     "message": f"{type(err).__name__}: {err}", "traceback": tb})
        code = 1
    finally:
        _send(chan, {"type": "end", "exit_code": code, "uptime": uptime()})
        if kmsg is not None:
            kmsg.close()
        poweroff(code)


def _send(chan: Channel, message: dict[str, Any]) -> None:
    try:
        chan.send(message)
    except BaseException as err:  # the channel itself failed: the console is all we have
        log(f"channel send failed: {err}; message was {str(message)[:2000]}")


if __name__ == "__main__":
    main()
