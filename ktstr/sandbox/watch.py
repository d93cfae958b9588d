"""Watch the emulated host: a soft lockup or panic on its console, or its heartbeat going
silent, ends the sandbox run.

The sandbox kernel prints warnings and worse (``loglevel=5``: a whole oops report) to a
log file. A VMM thread stuck inside ``KVM_RUN`` in that kernel shows up as repeated
soft-lockup reports; nothing inside the sandbox can end such a run, since the
stuck thread's process cannot exit. So the host side reads the log as it grows and
stops the sandbox with a clear reason instead of waiting for its timeout. An emulated
host whose CPUs all stop prints nothing at all: the sandbox's init rewrites a heartbeat
file every few seconds, and a heartbeat that stops changing means the host is gone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SOFT_LOCKUP_RE = re.compile(
    r"watchdog: BUG: soft lockup - CPU#(\d+) stuck for (\d+)s! \[([^\]]*)\]")
PANIC_RE = re.compile(r"Kernel panic - not syncing[^\n]*")
LOCKUP_GIVE_UP_S = 40
"""A soft lockup reported as lasting this long is not going to clear (the kernel's own
threshold is 20 s; the stuck thread gets no second chance after two reports)."""
MAX_READ = 1 << 20
"""Bytes read per poll at most (the log is the guest's: never read it whole)."""


HEARTBEAT_SILENCE_S = 120.0
"""Host seconds without a new heartbeat (written every 5 s) after which the emulated host is
declared hung: far above what a loaded sandbox delays a 5 s sleep by."""
FIRST_HEARTBEAT_S = 300.0
"""Host seconds from start to the first heartbeat (the sandbox kernel's boot, 9p mounts)."""


@dataclass(frozen=True)
class HostProblem:
    kind: str
    """``soft_lockup``, ``panic`` or ``hung``."""
    message: str


class HeartbeatWatch:
    """Tells when the sandbox's heartbeat file stopped changing (see the module docstring)."""

    def __init__(self, path: Path, started: float, *, silence_s: float = HEARTBEAT_SILENCE_S,
                 first_s: float = FIRST_HEARTBEAT_S) -> None:
        self.path = path
        self.silence_s = silence_s
        self.first_s = first_s
        self._started = started
        self._last: bytes | None = None
        self._changed = started

    def poll(self, now: float) -> HostProblem | None:
        try:
            beat: bytes | None = self.path.read_bytes()[:64]
        except OSError:
            beat = None
        if beat is not None and beat != self._last:
            self._last, self._changed = beat, now
            return None
        if self._last is None:
            if now - self._started >= self.first_s:
                return HostProblem("hung", f"the sandbox never started its command's heartbeat "
                                           f"within {self.first_s:g} s; sandbox stopped")
            return None
        if now - self._changed >= self.silence_s:
            return HostProblem(
                "hung", f"the emulated host stopped: no heartbeat for {now - self._changed:.0f} "
                        f"s (last guest uptime {self._last.decode(errors='replace').split()[0]} "
                        f"s); sandbox stopped")
        return None


class ConsoleWatch:
    """Incremental reader of the sandbox console log; :meth:`poll` returns a problem once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._carry = ""

    def poll(self) -> HostProblem | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(MAX_READ)
        except OSError:
            return None
        self._offset += len(data)
        text = self._carry + data.decode("utf-8", "replace")
        lines = text.split("\n")
        self._carry = lines.pop()[-4096:]  # an unfinished line, bounded
        for line in lines:
            problem = classify_line(line)
            if problem is not None:
                return problem
        return None


def classify_line(line: str) -> HostProblem | None:
    """A problem that must end the sandbox, from one console line; None for the rest."""
    if m := PANIC_RE.search(line):
        return HostProblem("panic", f"the sandbox kernel panicked: {m.group(0)}")
    m = SOFT_LOCKUP_RE.search(line)
    if m and int(m.group(2)) >= LOCKUP_GIVE_UP_S:
        return HostProblem(
            "soft_lockup",
            f"the sandbox kernel reports a soft lockup: CPU#{m.group(1)} stuck for "
            f"{m.group(2)} s in [{m.group(3)}] (a VMM thread stuck inside KVM_RUN in the "
            f"emulated host); sandbox stopped")
    return None
