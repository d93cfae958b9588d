"""fcntl file locks: one builder per cache key, and who is using an entry, across processes.

Two kinds per key: the build lock (exclusive, held while an entry is built,
gets schedulers, or is removed) and the use lock: every process that uses an
entry holds it shared until it exits (or releases it); removing an entry
needs it exclusive, without waiting, so an entry in use is never deleted.
The kernel drops every lock of a process that dies, so none goes stale.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if needed).

    Yields True when held; with blocking=False yields False instead of waiting
    when another process holds it. The kernel drops the lock if the holder
    dies, so a killed build never leaves a stale lock behind.
    """
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# Use locks this process holds shared: real path of the lock file -> its fd.
_held: dict[str, int] = {}


def _forget_after_fork() -> None:
    # A forked child shares the parent's open lock files; unlocking one would
    # release the parent's hold, closing the child's copy does not.
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def hold_shared(path: Path) -> bool:
    """Hold `path` shared until release_shared or exit; True if newly taken.

    Waits only while another process removes or replaces the entry (a moment).
    Where the lock cannot be had (a read-only cache, a filesystem without
    flock) nothing is held: using an entry never fails for want of a lock.
    """
    key = os.path.realpath(path)
    if key in _held:
        return False
    try:
        fd = _open(path)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)  # flock works on a read-only fd too
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return False
    except BaseException:
        os.close(fd)
        raise
    _held[key] = fd
    return True


def release_shared(path: Path) -> None:
    fd = _held.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    """Let go of every use lock this process holds."""
    for key in list(_held):
        os.close(_held.pop(key))


@contextmanager
def exclusive_unless_shared(path: Path) -> Iterator[bool]:
    """Lock `path` exclusive without waiting: False while another process holds it.

    This process's own shared hold does not count: it is converted for the
    duration and then restored. The caller holds the key's build lock, so the
    only competing holders are shared ones (users).
    """
    own = _held.get(os.path.realpath(path))
    fd = own if own is not None else _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if own is not None:  # a failed conversion has dropped the shared lock
                fcntl.flock(fd, fcntl.LOCK_SH)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_SH if own is not None else fcntl.LOCK_UN)
    finally:
        if own is None:
            os.close(fd)


def lock_holders(path: Path) -> list[int]:
    """Pids of other processes holding a flock on `path` (from /proc/locks; [] if unknown)."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  READ 1234 fe:00:5678 0 EOF"; waiters have "->" after the index
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev \
                and fields[4].isdecimal():
            pids.add(int(fields[4]))
    pids.discard(os.getpid())
    return sorted(pids)
