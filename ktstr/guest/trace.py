"""Tracing inside the guest: tracefs events and kprobes around the scenario.

:class:`Tracer` turns on the scheduler tracepoints (``sched_switch``, wakeups,
migrations, fork/exit, and every sched_ext event this kernel has) and any
kprobes asked for, with the ``mono`` clock (the scenario runner's clock), sized
per-CPU buffers, and reads the text trace at the end: ftrace's own text format,
which Perfetto's UI and trace processor open as they are. It travels to the
host zlib-compressed in base64 chunks; what was missing (events, kprobes that
cannot be probed) travels with it, so the run goes on without them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import zlib
from pathlib import Path
from typing import Any

from ktstr.wire.request import TraceSpec

TRACEFS = Path("/sys/kernel/tracing")
CHUNK = 4 << 20
KPROBE_GROUP = "ktstr"
_ARGS = " ".join(f"arg{i}=$arg{i}" for i in range(1, 5))


def probe_name(function: str) -> str:
    """A kprobe event name for ``function`` (tracefs allows [A-Za-z0-9_])."""
    return "p_" + re.sub(r"\W", "_", function)[:60]


class Tracer:
    def __init__(self, spec: TraceSpec, root: Path = TRACEFS) -> None:
        self.spec = spec
        self.root = root
        self.enabled: list[str] = []
        self.missing: list[str] = []
        self.kprobes: list[str] = []
        self.kprobe_problems: list[str] = []
        self.error: str | None = None

    def _write(self, rel: str, text: str, append: bool = False) -> None:
        flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(self.root / rel, flags)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def start(self) -> None:
        if not (self.root / "trace").exists():
            self.error = f"no tracefs at {self.root} (CONFIG_FTRACE): the run goes on untraced"
            return
        try:
            self._write("tracing_on", "0")
            self._write("events/enable", "0")
            self._write("trace", "")
            self._write("buffer_size_kb", str(self.spec.buffer_kb))
            with contextlib.suppress(OSError):
                self._write("trace_clock", "mono")
        except OSError as err:
            self.error = f"cannot set up tracefs: {err}"
            return
        events = list(self.spec.events)
        scx = self.root / "events" / "sched_ext"
        if self.spec.sched_ext_events and scx.is_dir():
            events += [f"sched_ext/{e.name}" for e in sorted(scx.iterdir()) if e.is_dir()]
        for event in events:
            try:
                self._write(f"events/{event}/enable", "1")
                self.enabled.append(event)
            except OSError:
                self.missing.append(event)
        for function in self.spec.kprobes:
            self._add_kprobe(function)
        self._write("tracing_on", "1")

    def _add_kprobe(self, function: str) -> None:
        name = probe_name(function)
        last: OSError | None = None
        # With its first arguments where the kernel can fetch them; else bare.
        for probe in (f"p:{KPROBE_GROUP}/{name} {function} {_ARGS}",
                      f"p:{KPROBE_GROUP}/{name} {function}"):
            try:
                self._write("kprobe_events", probe, append=True)
                self._write(f"events/{KPROBE_GROUP}/{name}/enable", "1")
                self.kprobes.append(function)
                return
            except OSError as err:
                last = err
        self.kprobe_problems.append(f"{function}: cannot be probed ({last})")

    def stop(self) -> tuple[bytes, dict[str, Any]]:
        """Stop tracing; (the text trace, what it holds). Tracefs is left as it was found."""
        text = b""
        overruns: dict[str, int] = {}
        if self.error is None:
            with contextlib.suppress(OSError):
                self._write("tracing_on", "0")
            for stats in sorted((self.root / "per_cpu").glob("cpu*/stats")):
                with contextlib.suppress(OSError, ValueError):
                    m = re.search(r"^overrun: (\d+)", stats.read_text(), re.M)
                    if m and int(m[1]):
                        overruns[stats.parent.name] = int(m[1])
            try:
                text = (self.root / "trace").read_bytes()
            except OSError as err:
                self.error = f"cannot read the trace: {err}"
            self._clean()
        info: dict[str, Any] = {
            "events": self.enabled, "missing": self.missing, "kprobes": self.kprobes,
            "kprobe_problems": self.kprobe_problems, "buffer_kb": self.spec.buffer_kb,
            "bytes": len(text), "overruns": overruns, "error": self.error,
        }
        return text, info

    def _clean(self) -> None:
        with contextlib.suppress(OSError):
            self._write("events/enable", "0")
        for function in self.kprobes:
            with contextlib.suppress(OSError):
                self._write("kprobe_events", f"-:{KPROBE_GROUP}/{probe_name(function)}",
                            append=True)
        with contextlib.suppress(OSError):
            self._write("trace", "")


def trace_messages(text: bytes, info: dict[str, Any]) -> list[dict[str, Any]]:
    """The channel messages that carry ``text`` (compressed, in chunks) and ``info``."""
    packed = base64.b64encode(zlib.compress(text, 6)).decode()
    chunks = [packed[i:i + CHUNK] for i in range(0, len(packed), CHUNK)]
    return [*({"type": "trace_chunk", "seq": i, "data": c} for i, c in enumerate(chunks)),
            {"type": "trace_info", **info, "chunks": len(chunks)}]
