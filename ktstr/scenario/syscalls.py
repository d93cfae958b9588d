"""The x86_64 system calls the standard library lacks, through ctypes: futex, sched_setattr.

The one home for their numbers and structs: work types wait on futex words with
:class:`Futex`, the worker applies SCHED_DEADLINE with :func:`set_deadline`.
"""

from __future__ import annotations

import ctypes
import mmap
import os

SYS_FUTEX = 202
SYS_SCHED_SETATTR = 314
FUTEX_WAIT, FUTEX_WAKE = 0, 1
WAKE_ALL = 0x7FFFFFFF
SCHED_DEADLINE = 6
"""Not in :mod:`os` (Python 3.11 has SCHED_OTHER..SCHED_RR only)."""
SCHED_FLAG_RESET_ON_FORK = 0x01
PR_SET_TIMERSLACK = 29

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    @classmethod
    def of(cls, seconds: float) -> Timespec:
        ns = max(0, int(seconds * 1e9))
        return cls(ns // 1_000_000_000, ns % 1_000_000_000)


class SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER0."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


class Futex:
    """A 32-bit futex word at ``offset`` of a MAP_SHARED mapping made before the fork.

    Not FUTEX_PRIVATE: the waiters are separate processes sharing the page.
    """

    def __init__(self, mm: mmap.mmap, offset: int) -> None:
        self._word = ctypes.c_uint32.from_buffer(mm, offset)
        self._addr = ctypes.c_void_p(ctypes.addressof(self._word))

    @property
    def value(self) -> int:
        return self._word.value

    @value.setter
    def value(self, v: int) -> None:
        self._word.value = v & 0xFFFFFFFF

    def wait(self, expected: int, timeout_s: float) -> None:
        """Sleep while the word holds ``expected``, at most ``timeout_s``.

        Returning early (the word changed: EAGAIN; a signal: EINTR; ETIMEDOUT) is
        normal: callers re-read the word and their stop flag in a loop.
        """
        ts = Timespec.of(timeout_s)
        _syscall(SYS_FUTEX, self._addr, FUTEX_WAIT, ctypes.c_uint32(expected & 0xFFFFFFFF),
                 ctypes.byref(ts), None, 0)

    def wake(self, count: int = 1) -> int:
        """Wake up to ``count`` waiters; the number woken."""
        return int(_syscall(SYS_FUTEX, self._addr, FUTEX_WAKE, count, None, None, 0))


def set_deadline(runtime_ns: int, deadline_ns: int, period_ns: int, pid: int = 0) -> None:
    """Make ``pid`` (0: the caller) SCHED_DEADLINE; raises OSError with the kernel's errno.

    RESET_ON_FORK is set: a deadline task may not fork otherwise (EAGAIN), and its
    children must not inherit a bandwidth reservation they never asked for.
    """
    attr = SchedAttr(
        size=ctypes.sizeof(SchedAttr), sched_policy=SCHED_DEADLINE,
        sched_flags=SCHED_FLAG_RESET_ON_FORK, sched_runtime=runtime_ns,
        sched_deadline=deadline_ns, sched_period=period_ns,
    )
    if _syscall(SYS_SCHED_SETATTR, pid, ctypes.byref(attr), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_timer_slack(ns: int) -> None:
    """Timer slack of the caller (default 50 us): short sleeps then wake when asked."""
    _libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(max(1, ns)), 0, 0, 0)
