"""I/O work: synchronous writes, random reads of a shared file, an fsync convoy."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ktstr.errors import KtstrError
from ktstr.scenario.work.base import LINE, Work, check_range, scratch_file, shared_mapping
from ktstr.scenario.work.lock import HandoffLock

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime

_MB = 1 << 20


@dataclass(frozen=True)
class IoSync(Work):
    """64 KB write, fdatasync, 100 us sleep per unit (a scratch file, unlinked at once)."""

    name: ClassVar[str] = "io_sync"
    block: int = 64 * 1024
    sleep_us: int = 100

    def run(self, rt: WorkerRuntime) -> None:
        fd = scratch_file(rt.scratch_dir, "ktstr-io-")
        buf = os.urandom(self.block)
        try:
            while True:
                os.pwrite(fd, buf, 0)
                os.fdatasync(fd)
                time.sleep(self.sleep_us / 1e6)
                if not rt.tick():
                    return
        finally:
            os.close(fd)


@dataclass(frozen=True)
class IoRandRead(Work):
    """``reads`` random ``block``-aligned preads of a ``file_mb`` scratch file per unit.

    The parent writes the file once (all workers of the batch share it); every
    ``drop_every`` units a worker drops it from the page cache (POSIX_FADV_DONTNEED,
    0 = never) so reads go to the device again and the worker blocks in I/O; a kernel
    without fadvise (no CONFIG_ADVISE_SYSCALLS) keeps them cached. Buffered reads:
    O_DIRECT would tie the work to a filesystem that supports it.
    """

    name: ClassVar[str] = "io_rand_read"
    file_mb: int = 16
    block: int = 4096
    reads: int = 16
    drop_every: int = 64

    def __post_init__(self) -> None:
        check_range(self, "file_mb", 1, 4096)
        check_range(self, "block", 512, self.file_mb * _MB)
        if self.block % 512:
            raise KtstrError(f"work {self.name}: block must be a multiple of 512, "
                             f"got {self.block}")
        check_range(self, "reads", 1)
        check_range(self, "drop_every", 0)

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        fd = scratch_file(scratch_dir, "ktstr-rread-")
        try:
            chunk = os.urandom(_MB)
            for i in range(self.file_mb):
                os.pwrite(fd, chunk, i * _MB)
            os.fdatasync(fd)  # clean pages, so DONTNEED really drops them
        except OSError as err:
            os.close(fd)
            raise KtstrError(f"work {self.name}: cannot write its {self.file_mb} MB scratch "
                             f"file in {scratch_dir}: {err.strerror}") from None
        return fd

    def run(self, rt: WorkerRuntime) -> None:
        fd: int = rt.shared
        block = self.block
        blocks = self.file_mb * _MB // block
        rand = rt.rng.randrange
        units = 0
        drop_every = self.drop_every
        while True:
            if drop_every and units % drop_every == 0:
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError as err:
                    # A kernel without CONFIG_ADVISE_SYSCALLS: the reads stay cached.
                    if err.errno != errno.ENOSYS:
                        raise
                    drop_every = 0
            for _ in range(self.reads):
                off = rand(blocks) * block
                got = len(os.pread(fd, block, off))
                if got != block:
                    raise KtstrError(f"work {self.name}: short read at {off}: {got} of {block}")
            units += 1
            if not rt.tick():
                return


@dataclass(frozen=True)
class IoConvoy(Work):
    """Every worker of the batch writes ``block`` bytes to one shared file and
    fdatasyncs it while holding one lock on it: a convoy behind each sync. The lock
    is handed from holder to waiter (:class:`HandoffLock`), so every worker gets its
    turn. Each worker writes its own block (the file stays ``workers * block``).

    A worker that found the lock taken records the hand-off latency: from the
    holder's release to this worker running with the lock.
    """

    name: ClassVar[str] = "io_convoy"
    block: int = 4096
    sync: bool = True

    def __post_init__(self) -> None:
        check_range(self, "block", 1, 16 * _MB)

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        return (scratch_file(scratch_dir, "ktstr-convoy-"),
                shared_mapping(HandoffLock.lines(workers)))

    def run(self, rt: WorkerRuntime) -> None:
        fd, mm = rt.shared
        lock = HandoffLock(fd, mm, 0, len(mm) // LINE - 1, rt.member)  # every line it has
        buf = os.urandom(self.block)
        off = rt.member * self.block
        while True:
            with lock.held() as waited:
                if waited:
                    rt.record_latency(time.monotonic_ns() - lock.released_ns)
                os.pwrite(fd, buf, off)
                if self.sync:
                    os.fdatasync(fd)
            if not rt.tick():
                return
