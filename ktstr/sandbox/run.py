"""Run one command inside the sandbox and return its exit status.

The host side: pick the kernel and QEMU, prepare a per-run directory (scratch
share with the init script, environment and, afterwards, the exit status;
QEMU and console logs next to it), start QEMU in its own session, relay the
command's stdout/stderr live, and tear everything down however the run ends
(success, failure, timeout, SIGINT/SIGTERM, or this process dying: QEMU gets
PR_SET_PDEATHSIG, and the run directory is named after this process, so the
next run removes it, `ktstr.reap`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ktstr import reap
from ktstr.errors import KtstrError
from ktstr.meminfo import host_memory_mb
from ktstr.paths import cache_root
from ktstr.reserve import reserve
from ktstr.sandbox import guest_init
from ktstr.sandbox.detect import in_sandbox
from ktstr.sandbox.diskcache import disk_cache
from ktstr.sandbox.environ import guest_environment, render_env_script
from ktstr.sandbox.kernel import kernel_hz, sandbox_kernel
from ktstr.sandbox.qemu import ROOT_TAG, Machine, Share, find_qemu, kernel_cmdline, qemu_command
from ktstr.sandbox.shims import resolve_shim
from ktstr.sandbox.tsc import host_tsc_khz
from ktstr.sandbox.watch import ConsoleWatch, HeartbeatWatch

MEMORY_ENV = "KTSTR_SANDBOX_MEMORY_MB"
CPUS_ENV = "KTSTR_SANDBOX_CPUS"
TIMEOUT_ENV = "KTSTR_SANDBOX_TIMEOUT"
DEBUG_ENV = "KTSTR_SANDBOX_DEBUG"     # 1: print the console log and QEMU's output at exit
QEMU_ARGS_ENV = "KTSTR_SANDBOX_QEMU_ARGS"  # more QEMU options, for diagnosis (e.g. -d cpu_reset)
CMDLINE_ENV = "KTSTR_SANDBOX_CMDLINE"  # more outer-kernel options, for diagnosis
MAX_DEFAULT_MEMORY_MB = 8192
TIMEOUT_EXIT = 124                     # like timeout(1)
KILL_GRACE_S = 3.0
POWEROFF_GRACE_S = 10.0
RUNDIR_KIND = "sandbox"                # run dirs: <tmp>/ktstr-sandbox-<owner>-XXXXXXXX


CRASH_EXIT = 125                       # the sandbox VM itself died (not the command)


class SandboxTimeout(KtstrError):
    exit_code = TIMEOUT_EXIT


class SandboxCrashed(KtstrError):
    """The emulated host died before the command finished (e.g. its kernel panicked)."""

    exit_code = CRASH_EXIT


class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise KtstrError(f"${name}={value!r} is not an integer") from None


def default_memory_mb() -> int:
    """Enough for inner VMs: min(8 GiB, half the host's RAM), or $KTSTR_SANDBOX_MEMORY_MB."""
    return _int_env(MEMORY_ENV) or min(MAX_DEFAULT_MEMORY_MB, host_memory_mb() // 2)


def default_cpus() -> int:
    return _int_env(CPUS_ENV) or len(os.sched_getaffinity(0))


def default_timeout() -> float | None:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise KtstrError(f"${TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def checkout_dir(cwd: Path) -> Path:
    """The git top-level holding `cwd`, else `cwd` itself: what the command may write."""
    try:
        out = subprocess.run(["git", "-C", str(cwd), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return cwd
    top = out.stdout.strip()
    return Path(top) if out.returncode == 0 and top else cwd


def writable_shares(paths: Sequence[Path], scratch: Path) -> list[Share]:
    """9p shares for the read-write directories, nested ones folded into their parent.

    Mounted parents first, so a share inside another lands on top of it.
    """
    resolved: list[Path] = []
    for p in [*paths, scratch]:
        r = p.resolve()
        if r == Path("/"):
            raise KtstrError("cannot share / read-write into the sandbox; run from a "
                             "project directory")
        if r not in resolved:
            resolved.append(r)
    kept = [p for p in resolved if not any(o != p and o in p.parents for o in resolved)]
    kept.sort(key=lambda p: len(p.parts))
    return [Share(tag=f"kt{i}", host_path=p, guest_path=str(p),
                  cache="none" if p == scratch.resolve() else "mmap")
            for i, p in enumerate(kept)]


def _static_busybox() -> str | None:
    """/bin/busybox when it is statically linked (it then needs nothing else over 9p)."""
    path = Path("/bin/busybox")
    try:
        with path.open("rb") as f:
            header = f.read(4096)
    except OSError:
        return None
    # A dynamic ELF names its interpreter (PT_INTERP) near the start of the file.
    if header[:4] != b"\x7fELF" or b"/ld-linux" in header or b"ld.so" in header:
        return None
    return str(path)


def _relay(fd: int, sink: BinaryIO | None) -> None:
    """Copy a pipe to `sink` until EOF; a broken sink only stops the copying."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        if sink is None:
            continue
        try:
            sink.write(chunk)
            sink.flush()
        except (OSError, ValueError):
            sink = None
    os.close(fd)


def _default_sink(stream: object, fd: int) -> BinaryIO:
    buf = getattr(stream, "buffer", None)
    if buf is not None:
        return buf
    return open(os.dup(fd), "wb", buffering=0)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM become an exception so the run can stop QEMU and clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise _Signalled(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


CRASH_MARKERS = ("BUG:", "Oops:", "general protection fault", "RIP:", "Kernel panic")
"""Console lines that say how the sandbox's own kernel died (the first of each is kept)."""
CRASH_LOGS_KEPT = 10
RESET_LOG = "reset.log"


def _why(console_log: Path, qemu_log: Path) -> str:
    """The most telling console lines, joined into one: how the sandbox kernel crashed
    (its first BUG/Oops line, the RIP, the panic), else where its init got to."""
    lines = _tail(console_log, 400).splitlines()
    crash: dict[str, str] = {}
    for line in lines:
        for marker in CRASH_MARKERS:
            if marker in line and marker not in crash:
                crash[marker] = line[line.index(marker):].strip()
    if crash:
        return " | ".join(dict.fromkeys(crash.values()))
    inits = [line for line in lines if line.startswith("ktstr-init:")]
    if inits:  # how far its init got, and the last thing the kernel said after that
        last = lines[-1] if lines[-1] != inits[-1] else None
        return " | ".join(x.strip() for x in (inits[-1], last) if x is not None)
    rest = lines[-3:] or _tail(qemu_log, 3).splitlines() or ["no console output"]
    return " | ".join(x.strip() for x in rest)


TRIPLE_FAULT_LINE = "Triple fault"
"""What QEMU's ``-d cpu_reset`` log says when the sandbox's own CPU triple-faulted."""


def keep_console(console_log: Path) -> Path | None:
    """A copy of a lost sandbox's console log under the cache (``sandbox/crashes/``, the
    newest :data:`CRASH_LOGS_KEPT`), so the emulated host's own crash report survives the
    run directory; QEMU's reset log (``reset.log`` beside it) follows it."""
    where = cache_root() / "sandbox" / "crashes"
    try:
        where.mkdir(parents=True, exist_ok=True)
        dest = where / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-console.log"
        shutil.copyfile(console_log, dest)
        resets = _tail(console_log.with_name(RESET_LOG), 200)
        if resets:
            with dest.open("a") as out:
                out.write(f"\n--- QEMU -d cpu_reset ---\n{resets}\n")
        for old in sorted(where.glob("*-console.log"))[:-CRASH_LOGS_KEPT]:
            old.unlink(missing_ok=True)
    except OSError:
        return None
    return dest


def _crashed(message: str, console_log: Path) -> SandboxCrashed:
    if TRIPLE_FAULT_LINE in _tail(console_log.with_name(RESET_LOG), 200):
        message += " | QEMU: the sandbox's CPU triple-faulted"
    kept = keep_console(console_log)
    where = f"console kept: {kept}" if kept is not None else f"set {DEBUG_ENV}=1 for the console"
    return SandboxCrashed(f"{message} ({where})")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class _Run:
    """What a run must tear down, whatever happens."""

    rundir: Path
    debug: bool = False
    proc: subprocess.Popen[bytes] | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def cleanup(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        for t in self.threads:
            t.join(5.0)
        if self.debug:
            print(f"--- sandbox console ---\n{_tail(self.rundir / 'console.log', 200)}\n"
                  f"--- qemu ---\n{_tail(self.rundir / 'qemu.log', 50)}", file=sys.stderr)
        shutil.rmtree(self.rundir, ignore_errors=True)


def run_in_sandbox(argv: Sequence[str], *, memory_mb: int | None = None,
                   cpus: int | None = None, timeout: float | None = None,
                   kernel: Path | None = None, cwd: Path | None = None,
                   env: Mapping[str, str] | None = None,
                   stdout: BinaryIO | None = None, stderr: BinaryIO | None = None) -> int:
    """Run `argv` in the sandbox VM; its exit status (128+N if killed by signal N).

    Raises KtstrError when the sandbox cannot start or ends without a status,
    SandboxTimeout (exit code 124) when `timeout` seconds pass first. SIGINT or
    SIGTERM stop the VM and return 128+N. Nothing is left behind in any case:
    no QEMU process, no temporary file or directory.
    """
    if not argv:
        raise KtstrError("no command given; usage: ktstr sandbox run -- CMD [ARGS...]")
    if in_sandbox():
        raise KtstrError("already inside the sandbox (KTSTR_IN_SANDBOX=1); run the command "
                         "directly")
    qemu = find_qemu()
    # Also removes the run dirs of killed runs (their QEMU died with them).
    run = _Run(reap.mkdtemp(RUNDIR_KIND), debug=os.environ.get(DEBUG_ENV) == "1")
    try:
        with _signals_raise():
            return _run(run, qemu, argv, memory_mb=memory_mb, cpus=cpus, timeout=timeout,
                        kernel=kernel, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
    except _Signalled as sig:
        if run.proc is not None:
            _stop(run.proc)
        name = signal.Signals(sig.signum).name
        print(f"ktstr: sandbox: {name} received; VM stopped", file=sys.stderr)
        return 128 + sig.signum
    finally:
        run.cleanup()


def _run(run: _Run, qemu: str, argv: Sequence[str], *, memory_mb: int | None,
         cpus: int | None, timeout: float | None, kernel: Path | None, cwd: Path | None,
         env: Mapping[str, str] | None, stdout: BinaryIO | None,
         stderr: BinaryIO | None) -> int:
    bzimage = kernel or sandbox_kernel()
    memory_mb = memory_mb or default_memory_mb()
    cpus = cpus or default_cpus()
    timeout = timeout if timeout is not None else default_timeout()
    work = (cwd or Path.cwd()).resolve()
    argv, host_env = resolve_shim(argv, os.environ if env is None else env, work)
    debug = run.debug
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    rundir = run.rundir
    scratch = rundir / "share"
    scratch.mkdir()
    shares = writable_shares([checkout_dir(work), cache.resolve()], scratch)
    console_log = rundir / "console.log"
    qemu_log = rundir / "qemu.log"

    def waiting(line: str) -> None:
        print(f"ktstr: {line}", file=sys.stderr, flush=True)

    with reserve(cpus, test=f"sandbox: {shlex.join(argv)[:120]}", on_wait=waiting), \
            disk_cache(cache / "sandbox", rundir) as disk:
        guest_env = guest_environment(
            host_env, cwd=str(work), writable=[s.guest_path for s in shares],
            extra={"KTSTR_CACHE_DIR": str(cache.resolve()),
                   "KTSTR_DISK_CACHE_DIR": guest_init.DISK_MOUNT})
        (scratch / guest_init.ENV_FILE).write_text(render_env_script(guest_env))
        plan = guest_init.GuestPlan(
            scratch=str(scratch.resolve()), shares=shares, cwd=str(work), argv=list(argv),
            uid=os.getuid(), gid=os.getgid(), groups=os.getgroups(), disk=True,
            busybox=_static_busybox(), setpriv=shutil.which("setpriv") or "setpriv")
        init = scratch / guest_init.INIT_FILE
        init.write_text(guest_init.render_init(plan))
        init.chmod(0o755)

        out_r, out_w = os.pipe()
        run.fds += [out_r, out_w]
        err_r, err_w = os.pipe()
        run.fds += [err_r, err_w]
        root = Share(tag=ROOT_TAG, host_path=Path("/"), guest_path="/", readonly=True,
                     cache="loose")
        machine = Machine(
            qemu=qemu, kernel=bzimage, memory_mb=memory_mb, cpus=cpus,
            cmdline=kernel_cmdline(root, str(init.resolve()), quiet=not debug,
                                   tsc_khz=host_tsc_khz(), hz=kernel_hz(bzimage),
                                   extra=shlex.split(os.environ.get(CMDLINE_ENV, ""))),
            shares=[root, *shares], disk=disk.path, console_log=console_log,
            reset_log=rundir / RESET_LOG,
            stdout_path=f"/proc/self/fd/{out_w}", stderr_path=f"/proc/self/fd/{err_w}",
            extra_args=tuple(shlex.split(os.environ.get(QEMU_ARGS_ENV, ""))))
        with open(qemu_log, "wb") as log:
            run.proc = subprocess.Popen(
                qemu_command(machine), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, pass_fds=(out_w, err_w),
                start_new_session=True, preexec_fn=reap.pdeathsig_preexec(signal.SIGKILL))
        proc = run.proc
        for w in (out_w, err_w):
            run.fds.remove(w)
            os.close(w)
        for r, sink in ((out_r, stdout or _default_sink(sys.stdout, 1)),
                        (err_r, stderr or _default_sink(sys.stderr, 2))):
            run.fds.remove(r)  # the relay thread owns and closes it
            t = threading.Thread(target=_relay, args=(r, sink), daemon=True)
            t.start()
            run.threads.append(t)

        deadline = None if not timeout else time.monotonic() + timeout
        status = scratch / guest_init.STATUS_FILE
        reported: float | None = None
        host_watch = ConsoleWatch(console_log)
        heartbeat = HeartbeatWatch(scratch / guest_init.HEARTBEAT_FILE, time.monotonic())
        while proc.poll() is None:
            now = time.monotonic()
            if (problem := host_watch.poll() or heartbeat.poll(now)) is not None:
                _stop(proc)
                raise _crashed(problem.message, console_log)
            if deadline is not None and now >= deadline:
                _stop(proc)
                raise SandboxTimeout(f"sandbox command did not finish within {timeout:g} s; "
                                     f"VM stopped (raise --timeout)")
            # The command is done; a guest that fails to power off must not hang us.
            if reported is None and status.exists():
                reported = now
            if reported is not None and now - reported > POWEROFF_GRACE_S:
                _stop(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.2)
        for t in run.threads:
            t.join(5.0)

    kvm = scratch / guest_init.KVM_FILE
    if kvm.exists() and kvm.read_text().strip() != "ok":
        print(f"ktstr: sandbox: warning: {kvm.read_text().strip()}", file=sys.stderr)
    if not status.exists():
        raise _crashed(f"sandbox VM exited (QEMU status {proc.returncode}) before the "
                       f"command finished: {_why(console_log, qemu_log)}", console_log)
    return int(status.read_text().strip())
