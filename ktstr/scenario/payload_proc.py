"""A payload's process: start it (in a cgroup), wait for it, kill it, read its result.

Forked and exec'd by hand rather than through subprocess: the child joins its
cgroup before exec, so neither the program nor anything it forks ever runs
outside it. The child leads its own process group, so a kill reaches the
program's own children too. Output goes to a file in the scratch directory;
at most ``OUTPUT_CAP`` bytes of it are read back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable

from ktstr.scenario.payload import Payload, PayloadOutputError
from ktstr.telemetry import PayloadResult

OUTPUT_CAP = 1 << 20
TAIL_CHARS = 2000
_POLL_S = 0.02


def resolve_program(program: str) -> str | None:
    """The executable ``program`` names here (an absolute path, or found on PATH)."""
    if os.path.isabs(program):
        return program if os.access(program, os.X_OK) else None
    return shutil.which(program)


class PayloadProcess:
    def __init__(self, label: str, payload: Payload, scratch_dir: str,
                 join_cgroup: Callable[[int], None] | None = None) -> None:
        self.label = label
        self.payload = payload
        self.out_path = os.path.join(scratch_dir, f"payload-{label}-{os.getpid()}.out")
        self.pid: int | None = None
        self.started = time.monotonic()
        self.status: int | None = None
        self.killed_by: str | None = None
        self.error: str | None = None
        path = resolve_program(payload.program)
        self.argv = [path or payload.program, *payload.args]
        if path is None:
            self.error = (f"program {payload.program!r} is not here (declare the payload in "
                          "@ktstr_test(payloads=...) so the host packs it)")
            return
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setpgid(0, 0)
                if join_cgroup is not None:
                    join_cgroup(os.getpid())
                fd = os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.execv(path, self.argv)
            except BaseException as err:
                with contextlib.suppress(OSError):
                    os.write(2, f"ktstr: cannot start {path}: {err}\n".encode())
            os._exit(127)
        self.pid = pid

    @property
    def running(self) -> bool:
        return self.pid is not None and self.status is None and self._poll() is None

    def _poll(self) -> int | None:
        if self.pid is None or self.status is not None:
            return self.status
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self, limit_s: float | None = None) -> None:
        """Until it ends or its timeout (from its start) passes; then it is killed."""
        deadline = self.started + self.payload.timeout_s
        if limit_s is not None:
            deadline = min(deadline, time.monotonic() + limit_s)
        while self.running:
            if time.monotonic() >= deadline:
                self.kill("timeout")
                self.error = f"did not finish within {self.payload.timeout_s:g} s"
                return
            time.sleep(_POLL_S)

    def kill(self, why: str) -> None:
        if not self.running or self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.status = None
        self.killed_by = why
        self.pid = None

    def result(self) -> PayloadResult:
        """What it did, parsed (call after wait or kill)."""
        duration = time.monotonic() - self.started
        text = ""
        with contextlib.suppress(OSError), open(self.out_path, "rb") as f:
            text = f.read(OUTPUT_CAP).decode(errors="replace")
        with contextlib.suppress(OSError):
            os.unlink(self.out_path)
        p = self.payload
        out = PayloadResult(
            label=self.label, name=p.name, argv=self.argv, exit_code=self.status,
            duration_s=round(duration, 3), output_tail=text[-TAIL_CHARS:], error=self.error,
            killed_by=self.killed_by,
            units={m.name: m.unit for m in p.metrics},
            higher_is_better={m.name: m.higher_is_better for m in p.metrics},
        )
        if out.error is None and self.killed_by is None:
            if self.status != 0:
                out.error = f"exited with status {self.status}"
            elif p.parse is not None:
                try:
                    metrics = p.parse(text)
                except PayloadOutputError as err:
                    out.error = f"its output did not parse: {err}"
                else:
                    out.metrics = {k: float(v) for k, v in metrics.items()}
                    missing = [m.name for m in p.metrics if m.name not in out.metrics]
                    if missing:
                        out.error = f"its output lacks {', '.join(missing)}"
        return out
