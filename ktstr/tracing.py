"""Traces of guest runs on the host: reassembly, and what the timeline reads from them.

The guest (:mod:`ktstr.guest.trace`) sends ftrace's text trace compressed in chunks;
:func:`assemble` puts it back together within a size bound (the guest is hostile: a
chunk out of order, bad base64 or a zlib bomb is a problem, not an exception).
:func:`parse_trace` reads the ``sched_switch`` and ``sched_wakeup`` lines into
per-CPU run segments and per-task wake-to-run latencies, for the report's timeline.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ktstr.telemetry import percentile

MAX_TRACE_BYTES = 256 << 20


@dataclass
class TraceCapture:
    text: bytes
    info: dict[str, Any]
    problem: str | None = None
    path: str | None = None
    """Where the text was written beside the sidecar (``ktstr.testing.run``)."""

    def record(self) -> dict[str, Any]:
        """What the sidecar says of it."""
        keep = ("events", "missing", "kprobes", "kprobe_problems", "buffer_kb", "overruns",
                "error")
        return {"path": self.path, "bytes": len(self.text), "problem": self.problem,
                **{k: self.info.get(k) for k in keep}}


def assemble(chunks: Sequence[Mapping[str, Any]], info: Mapping[str, Any] | None,
             max_bytes: int = MAX_TRACE_BYTES) -> TraceCapture | None:
    """The trace from its ``trace_chunk`` messages and ``trace_info``; None if neither came."""
    if info is None and not chunks:
        return None
    meta = dict(info or {})
    if info is None:
        return TraceCapture(b"", meta, "the trace's info message never came (guest lost?)")
    # Every number here is the guest's: compare, never materialise, what it claims.
    ordered = sorted(chunks, key=lambda c: c["seq"])
    want = meta.get("chunks", len(ordered))
    seqs = [c["seq"] for c in ordered]
    if want != len(ordered) or any(seq != i for i, seq in enumerate(seqs)):
        return TraceCapture(b"", meta, f"trace chunks {seqs[:8]}{'...' if len(seqs) > 8 else ''}"
                                       f" ({len(seqs)}) of {want} arrived")
    encoded = sum(len(c["data"]) for c in ordered)
    if encoded > 2 * max_bytes:
        return TraceCapture(b"", meta, f"the trace's {encoded} encoded bytes exceed the "
                                       f"{2 * max_bytes}-byte limit")
    try:
        packed = base64.b64decode("".join(c["data"] for c in ordered), validate=True)
        inflater = zlib.decompressobj()
        text = inflater.decompress(packed, max_bytes)
    except (binascii.Error, ValueError, zlib.error) as err:
        return TraceCapture(b"", meta, f"the trace does not decode: {err}")
    if inflater.unconsumed_tail:
        return TraceCapture(text, meta, f"the trace is larger than {max_bytes} bytes: cut")
    return TraceCapture(text, meta)


# ---- reading the text trace ----------------------------------------------------------

# "  python3-123 [001] d..2.  12.345678: sched_switch: prev_comm=... next_pid=456 ..."
_LINE = re.compile(r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+\S+\s+"
                   r"(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s?(?P<body>.*)$")
_FIELD = re.compile(r"(\w+)=(\S+(?: \S+)*?)(?= \w+=|$)")


@dataclass(frozen=True)
class Segment:
    cpu: int
    start: float
    end: float
    pid: int
    comm: str


@dataclass
class TaskLatency:
    pid: int
    comm: str
    wakeups: int
    max_us: float
    p99_us: float


@dataclass
class Timeline:
    segments: list[Segment] = field(default_factory=list)
    latencies: list[TaskLatency] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    events: int = 0
    cpus: list[int] = field(default_factory=list)
    longest_wait: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Per task: the longest time it was runnable without running (start, end); one
    still waiting when the trace ends waits until then."""

    def switches_per_cpu(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.segments:
            out[s.cpu] = out.get(s.cpu, 0) + 1
        return out


def _fields(body: str) -> dict[str, str]:
    return {k: v for k, v in _FIELD.findall(body)}


def parse_trace(text: str, pids: Sequence[int] | None = None) -> Timeline:
    """Run segments per CPU (from ``sched_switch``) and wake-to-run latency per task (a
    ``sched_wakeup``/``_new`` to the ``sched_switch`` onto it), for ``pids`` if given."""
    timeline = Timeline()
    running: dict[int, tuple[float, int, str]] = {}
    woken: dict[int, float] = {}
    lat: dict[int, list[float]] = {}
    comms: dict[int, str] = {}
    wanted = set(pids) if pids is not None else None
    waiting: dict[int, float] = {}
    first = last = None

    def waited(pid: int, until: float) -> None:
        since = waiting.pop(pid, None)
        if since is not None:
            best = timeline.longest_wait.get(pid)
            if best is None or until - since > best[1] - best[0]:
                timeline.longest_wait[pid] = (since, until)

    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        ts, cpu, event = float(m["ts"]), int(m["cpu"]), m["event"]
        first = ts if first is None else first
        last = ts
        timeline.events += 1
        if event == "sched_switch":
            f = _fields(m["body"])
            try:
                next_pid = int(f["next_pid"])
            except (KeyError, ValueError):
                continue
            if cpu in running:
                start, pid, comm = running[cpu]
                timeline.segments.append(Segment(cpu, start, ts, pid, comm))
            comm = f.get("next_comm", "?")
            running[cpu] = (ts, next_pid, comm)
            comms[next_pid] = comm
            waited(next_pid, ts)
            prev = f.get("prev_pid", "")
            if prev.isdigit() and f.get("prev_state", "").startswith("R") and int(prev):
                waiting.setdefault(int(prev), ts)  # preempted: still runnable
            if next_pid in woken:
                lat.setdefault(next_pid, []).append((ts - woken.pop(next_pid)) * 1e6)
        elif event in ("sched_wakeup", "sched_wakeup_new"):
            f = _fields(m["body"])
            try:
                pid = int(f["pid"])
            except (KeyError, ValueError):
                continue
            waiting.setdefault(pid, ts)
            if wanted is None or pid in wanted:
                woken.setdefault(pid, ts)
                comms.setdefault(pid, f.get("comm", "?"))
    if last is not None:
        for cpu, (start, pid, comm) in running.items():
            timeline.segments.append(Segment(cpu, start, last, pid, comm))
        for pid in list(waiting):
            waited(pid, last)
        timeline.start, timeline.end = first or 0.0, last
    timeline.cpus = sorted({s.cpu for s in timeline.segments})
    for pid, values in sorted(lat.items()):
        timeline.latencies.append(TaskLatency(pid, comms.get(pid, "?"), len(values),
                                              round(max(values), 1),
                                              round(percentile(values, 99), 1)))
    return timeline
