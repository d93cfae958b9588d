"""Watch the emulated host's console: a soft lockup or panic in it ends the sandbox run.

The sandbox kernel prints emergencies (``loglevel=1`` keeps exactly those) to a log
file. A VMM thread stuck inside ``KVM_RUN`` in that kernel shows up as repeated
soft-lockup reports; nothing inside the sandbox can end such a run, since the
stuck thread's process cannot exit. So the host side reads the log as it grows and
stops the sandbox with a clear reason instead of waiting for its timeout.
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


@dataclass(frozen=True)
class HostProblem:
    kind: str
    """``soft_lockup`` or ``panic``."""
    message: str


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
