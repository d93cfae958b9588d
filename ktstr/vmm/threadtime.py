"""A host thread's scheduler time (``schedstat``): how long it ran, how long it waited.

A vCPU thread that is runnable but not running on the host is guest time that
stood still: the guest's clocks advance while its CPU does nothing. Its share of
the run (the *dilation*) tells a slow scheduler apart from a busy host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadTime:
    """One reading: nanoseconds on a host CPU, runnable but waiting, and when (monotonic)."""

    run_ns: int
    wait_ns: int
    at_ns: int


def thread_time(tid: int | None = None) -> ThreadTime | None:
    """The calling thread's (or thread ``tid`` of this process's) schedstat; None where the
    host kernel has none (no ``CONFIG_SCHED_INFO``) or the thread is gone."""
    path = "/proc/thread-self/schedstat" if tid is None else f"/proc/self/task/{tid}/schedstat"
    try:
        with open(path) as fh:
            run_ns, wait_ns = (int(x) for x in fh.read().split()[:2])
    except (OSError, ValueError):
        return None
    return ThreadTime(run_ns, wait_ns, time.monotonic_ns())


def dilation(start: ThreadTime | None, end: ThreadTime | None) -> float | None:
    """The fraction of the wall time between two readings the thread spent waiting runnable."""
    if start is None or end is None or end.at_ns <= start.at_ns:
        return None
    return max(0.0, min(1.0, (end.wait_ns - start.wait_ns) / (end.at_ns - start.at_ns)))


def mean_dilation(per_vcpu: list[float | None]) -> float | None:
    """The mean of the vCPUs' dilations that were measured (None when none was)."""
    known = [d for d in per_vcpu if d is not None]
    return sum(known) / len(known) if known else None
