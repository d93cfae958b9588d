"""Owner processes for the reaper's tests: a real child makes something, then is killed.

Imported by test modules in this directory (pytest puts it on sys.path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ktstr import reap

HOLD = "\nprint(flush=True)\nimport time\ntime.sleep(600)\n"
"""Appended to a child's script: it says it is ready (an empty line), then waits to be killed."""


class Child:
    """A `python -c` process that makes something, prints lines about it, and waits."""

    def __init__(self, script: str, tmp: Path, *args: str) -> None:
        env = {**os.environ, "TMPDIR": str(tmp), "KTSTR_CACHE_DIR": str(tmp / "cache"),
               "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen([sys.executable, "-c", script + HOLD, *args], env=env,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        while (line := self.proc.stdout.readline()) not in ("\n", ""):
            self.lines.append(line.strip())
            assert time.monotonic() < deadline
        assert self.proc.poll() is None, f"child failed: {self.lines}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill(group=True)

    def kill(self, *, group: bool = False, wait: bool = True) -> None:
        """SIGKILL the child (and its process group): no cleanup of any kind runs."""
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        if wait:
            self.proc.wait()


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether `pid` exited (or became a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (st := reap.proc_stat(pid)) is not None and not st.gone:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
