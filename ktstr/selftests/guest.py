"""Inside the guest: the sched_ext selftests, one runner process per test.

``run(ctx)`` is the scenario (``ktstr.selftests.guest:run``). For each test
it reports ``{"selftest": "start", ...}``, runs ``runner -t NAME`` (with
``KTSTR_SCX_TEST=NAME`` for a runner built with exact selection) in its own
session with a timeout (the whole process group is killed on expiry), keeps
a bounded tail of its stdout and stderr and of the kernel log it caused,
waits for ``/sys/kernel/sched_ext/state`` to read ``disabled`` again, and
reports ``{"selftest": "done", "result": {...}}``. Results travel as they
happen, so a VM that dies mid-run still tells the host which tests finished
and which one was running.

Standard library only (plus the stdlib-only ``ktstr.guest.sched`` and
``ktstr.selftests.parse``).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ktstr.guest.sched import SCX, GuestFailure, Kmsg, read_text
from ktstr.selftests.parse import (
    LIST_FILTER,
    SELECT_ENV,
    Status,
    error_reason,
    parse_listing,
    parse_output,
)

OUTPUT_LIMIT = 4096
"""Bytes kept per stream (stdout, stderr, kernel log) per test: the last ones."""
KERNEL_LINE_LIMIT = 300
SETTLE_S = 10.0
"""How long sched_ext may take to return to ``disabled`` after a test's process ended."""
DEFAULT_TIMEOUT_PER_TEST_S = 120.0
"""Per test. Under the emulated KVM host reload_loop alone takes 43 s in QEMU microvm and
53 s or more in ours (60 s timed it out); on hardware every test takes seconds."""
KILL_WAIT_S = 5.0
EXIT_GRACE_S = 1.0
"""Once the runner exited, how long its output may still arrive (from children it left)."""
POLL_S = 0.1


class Reporter(Protocol):
    def report(self, data: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class GuestArgs:
    runner: str
    tests: tuple[str, ...] = ()
    """Names to run, in order; empty: every test the runner lists."""
    timeout_s: float = DEFAULT_TIMEOUT_PER_TEST_S
    exact: bool = True
    output_limit: int = OUTPUT_LIMIT
    settle_s: float = SETTLE_S

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuestArgs:
        return cls(runner=str(data["runner"]),
                   tests=tuple(str(t) for t in data.get("tests", ())),
                   timeout_s=float(data.get("timeout_s", DEFAULT_TIMEOUT_PER_TEST_S)),
                   exact=bool(data.get("exact", True)),
                   output_limit=int(data.get("output_limit", OUTPUT_LIMIT)),
                   settle_s=float(data.get("settle_s", SETTLE_S)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tests": list(self.tests)}


class Tail:
    """The last ``limit`` bytes written, and how many came before them."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.dropped += excess

    def text(self) -> str:
        return self.data.decode(errors="replace")


@dataclass
class Outcome:
    exit_code: int | None
    """The process's status; negative: killed by that signal."""
    timed_out: bool
    stdout: str
    stderr: str
    stdout_dropped: int
    stderr_dropped: int
    duration_s: float


def run_process(argv: list[str], *, timeout_s: float, limit: int, env: dict[str, str] | None = None,
                cwd: str | None = None) -> Outcome:
    """Run ``argv`` in a new session; past ``timeout_s`` kill its whole process group.

    Output is read as it comes (so a chatty test cannot block on a full pipe)
    and only the last ``limit`` bytes of each stream are kept.
    """
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    tails = {proc.stdout.fileno(): Tail(limit), proc.stderr.fileno(): Tail(limit)}
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    timed_out = False
    deadline = start + timeout_s
    exited_at: float | None = None
    with selectors.DefaultSelector() as sel:
        for fd in tails:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > EXIT_GRACE_S:
                break  # a child the test left behind still holds the pipes
            if now >= deadline:
                timed_out = exited_at is None
                break
            for key, _ in sel.select(POLL_S):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    tails[key.fd].add(chunk)
                else:
                    sel.unregister(key.fd)
    if timed_out:
        _kill_group(proc.pid)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()) + KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        proc.wait()
    _kill_group(proc.pid)  # children the test left behind in its session
    duration = time.monotonic() - start
    for fd, tail in tails.items():
        with contextlib.suppress(OSError):  # drain what the killed group left in the pipe
            os.set_blocking(fd, False)
            while chunk := os.read(fd, 65536):
                tail.add(chunk)
    proc.stdout.close()
    proc.stderr.close()
    return Outcome(proc.returncode, timed_out, tails[out_fd].text(), tails[err_fd].text(),
                   tails[out_fd].dropped, tails[err_fd].dropped, round(duration, 3))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def sched_ext_state(root: Path = SCX) -> tuple[str, str]:
    return read_text(root / "state"), read_text(root / "root" / "ops")


def wait_disabled(settle_s: float, root: Path = SCX) -> tuple[str, str]:
    """(state, ops) once sched_ext is ``disabled``, or as it is after ``settle_s``."""
    deadline = time.monotonic() + settle_s
    state, ops = sched_ext_state(root)
    while state != "disabled" and time.monotonic() < deadline:
        time.sleep(0.02)
        state, ops = sched_ext_state(root)
    return state, ops


def classify(name: str, outcome: Outcome, timeout_s: float) -> tuple[Status, str, list[str]]:
    """(status, reason, the test's stdout lines) from one runner process."""
    parsed = parse_output(outcome.stdout)
    mine = [r for r in parsed.results if r.name == name]
    lines = mine[-1].output if mine else (
        parsed.unfinished_output if parsed.unfinished == name else [])
    if outcome.timed_out:
        return Status.TIMEOUT, f"no result within {timeout_s:g} s; killed", lines
    died = _death(outcome.exit_code)
    if not mine:
        tail = outcome.stderr.strip().splitlines()[-1:] or [""]
        why = died or "exited without a result line"
        return Status.FAIL, f"runner {why} for {name}" + (f" ({tail[0][:200]})" if tail[0]
                                                            else ""), lines
    result = mine[-1]
    if result.status is Status.FAIL:
        return Status.FAIL, error_reason(outcome.stderr) or "the runner reported not ok", lines
    if died:
        return Status.FAIL, f"runner {died} after reporting {result.status.value}", lines
    return result.status, result.reason, lines


def _death(code: int | None) -> str:
    if code is None or code == 0:
        return ""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class GuestResult:
    name: str
    status: str
    reason: str
    duration_s: float
    exit_code: int | None
    output: str
    stderr: str
    kernel: list[str] = field(default_factory=list)
    state_after: str = ""
    also_ran: list[str] = field(default_factory=list)
    """Other tests the same (substring-selected) runner process ran."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_test(args: GuestArgs, name: str, kmsg: Kmsg | None, cwd: str | None = None,
             scx_root: Path = SCX) -> GuestResult:
    env = dict(os.environ)
    if args.exact:
        env[SELECT_ENV] = name
    outcome = run_process([args.runner, "-t", name], timeout_s=args.timeout_s,
                          limit=args.output_limit, env=env, cwd=cwd)
    state, ops = wait_disabled(args.settle_s, scx_root)
    status, reason, lines = classify(name, outcome, args.timeout_s)
    if state != "disabled" and scx_root.is_dir():
        status = Status.FAIL
        left = f"left sched_ext {state!r}" + (f" with {ops!r} attached" if ops else "")
        reason = f"{left} {args.settle_s:g} s after its process ended" + (
            f"; {reason}" if reason else "")
    kernel = _kernel_tail(kmsg, args.output_limit)
    parsed = parse_output(outcome.stdout)
    output = "\n".join(lines)
    return GuestResult(
        name=name, status=status.value, reason=reason, duration_s=outcome.duration_s,
        exit_code=outcome.exit_code, output=output[-args.output_limit:],
        stderr=outcome.stderr, kernel=kernel, state_after=state,
        also_ran=[r.name for r in parsed.results if r.name != name])


def _kernel_tail(kmsg: Kmsg | None, limit: int) -> list[str]:
    if kmsg is None:
        return []
    lines = [line[:KERNEL_LINE_LIMIT] for line in kmsg.poll()]
    kmsg.lines.clear()  # Kmsg keeps every line it read; only this test's are wanted
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        size += len(line) + 1
        if size > limit:
            break
        kept.append(line)
    return kept[::-1]


def list_guest_tests(runner: str) -> list[str]:
    proc = subprocess.run([runner, "-s", "-t", LIST_FILTER], capture_output=True, text=True,
                          errors="replace", stdin=subprocess.DEVNULL, timeout=30, check=False)
    return [t.name for t in parse_listing(proc.stdout)]


def run(ctx: Any) -> dict[str, Any]:
    """The scenario: every requested test, in order; results go out as reports."""
    kmsg = Kmsg()
    try:
        return run_all(GuestArgs.from_dict(ctx.args), ctx,
                       cwd=str(getattr(ctx, "scratch", "/tmp")), kmsg=kmsg)
    finally:
        kmsg.close()


def run_all(args: GuestArgs, reporter: Reporter, *, cwd: str | None = None,
            scx_root: Path = SCX, kmsg: Kmsg | None = None) -> dict[str, Any]:
    if not scx_root.is_dir():
        raise GuestFailure("scheduler_unsupported",
                           f"this kernel has no sched_ext ({scx_root} missing)")
    if not os.access(args.runner, os.X_OK):
        raise GuestFailure("selftests", f"the selftests runner {args.runner} is not in the guest")
    state, ops = wait_disabled(args.settle_s, scx_root)
    if state != "disabled":
        raise GuestFailure("selftests", f"sched_ext is {state!r} ({ops!r}) before any test ran")
    names = list(args.tests) or list_guest_tests(args.runner)
    if kmsg is not None:
        kmsg.poll()  # the boot log so far is nobody's
        kmsg.lines.clear()
    done = 0
    for i, name in enumerate(names):
        reporter.report({"selftest": "start", "name": name, "index": i, "total": len(names)})
        result = run_test(args, name, kmsg, cwd=cwd, scx_root=scx_root)
        reporter.report({"selftest": "done", "result": result.to_dict()})
        done += 1
        if result.state_after != "disabled":
            # Nothing after this can attach its scheduler: the rest cannot run.
            for rest in names[i + 1:]:
                reporter.report({"selftest": "done", "result": GuestResult(
                    rest, Status.NOT_RUN.value,
                    f"sched_ext stuck {result.state_after!r} after {name}", 0.0, None,
                    "", "").to_dict()})
            break
    return {"completed": done, "tests": len(names), "exact": args.exact}
