"""Event-driven wake-ups: epoll over many eventfds, queued real-time signals."""

from __future__ import annotations

import os
import select
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ktstr.scenario.work.base import (
    POLL_S,
    Line,
    SharedLines,
    Work,
    check_range,
    group_member,
    shared_mapping,
    spin,
    wait_fd,
)

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime


@dataclass(frozen=True)
class EpollStorm(Work):
    """Pairs: a waiter sleeps in epoll_wait on ``fds`` eventfds; its partner signals
    ``burst`` of them at random each round and waits for the waiter's ack (another
    eventfd) before the next.

    The waiter records the latency from the round's first signal to its wake-up and
    acks once it has drained all ``burst`` of them: one unit on each side.
    """

    name: ClassVar[str] = "epoll_storm"
    group_size: ClassVar[int] = 2
    fds: int = 32
    burst: int = 8
    iterations: int = 100

    def __post_init__(self) -> None:
        check_range(self, "fds", 1, 1024)
        check_range(self, "burst", 1, self.fds)
        check_range(self, "iterations", 0)

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        pairs = [(tuple(os.eventfd(0, flags) for _ in range(self.fds)), os.eventfd(0, flags))
                 for _ in range(workers // 2)]
        return (shared_mapping(workers // 2), pairs)

    def run(self, rt: WorkerRuntime) -> None:
        pair, role = group_member(rt, self)
        mm, pairs = rt.shared
        fds, ack = pairs[pair]
        stamp = Line(mm, pair).q
        if role == 1:
            self._signal(rt, list(fds), ack, stamp)
        else:
            self._wait(rt, fds, ack, stamp)

    def _signal(self, rt: WorkerRuntime, fds: list[int], ack: int, stamp: memoryview) -> None:
        while True:
            spin(self.iterations)
            picks = rt.rng.sample(fds, self.burst)
            stamp[0] = time.monotonic_ns()
            for fd in picks:
                os.eventfd_write(fd, 1)
            if not wait_fd(rt, ack):
                return
            os.eventfd_read(ack)
            if not rt.tick():
                return

    def _wait(self, rt: WorkerRuntime, fds: tuple[int, ...], ack: int,
              stamp: memoryview) -> None:
        ep = select.epoll(len(fds))
        try:
            for fd in fds:
                ep.register(fd, select.EPOLLIN)
            got = 0
            while True:
                events = ep.poll(POLL_S)
                if not events:
                    if not rt.poll():
                        return
                    continue
                if got == 0:
                    rt.record_latency(time.monotonic_ns() - stamp[0])
                for fd, _ in events:
                    try:
                        os.eventfd_read(fd)
                        got += 1
                    except BlockingIOError:
                        pass
                if got >= self.burst:
                    got = 0
                    spin(self.iterations)
                    os.eventfd_write(ack, 1)
                    if not rt.tick():
                        return
        finally:
            ep.close()


@dataclass(frozen=True)
class SignalStorm(SharedLines):
    """Pairs exchange bursts of ``burst`` queued real-time signals (SIGRTMIN, sent
    through a pidfd so a recycled pid is never signalled), each side collecting them
    with sigtimedwait before answering with its own burst.

    The receiver of a burst records the latency from the sender's stamp to the
    first signal it takes; one burst received is one unit.
    """

    name: ClassVar[str] = "signal_storm"
    group_size: ClassVar[int] = 2
    burst: int = 4
    iterations: int = 100

    def __post_init__(self) -> None:
        check_range(self, "burst", 1, 64)
        check_range(self, "iterations", 0)

    def run(self, rt: WorkerRuntime) -> None:
        pair, role = group_member(rt, self)
        q = Line(rt.shared, pair).q  # [0], [1]: the pair's pids; [2 + r]: stamp for role r
        sig = signal.SIGRTMIN
        signal.pthread_sigmask(signal.SIG_BLOCK, {sig})  # before the partner can see our pid
        q[role] = os.getpid()
        while not q[1 - role]:
            time.sleep(0.001)
            if not rt.poll():
                return
        pidfd = os.pidfd_open(q[1 - role])
        try:
            if role == 0 and not self._send(q, 1, pidfd, sig):
                return
            while True:
                for n in range(self.burst):
                    while signal.sigtimedwait({sig}, POLL_S) is None:
                        if not rt.poll():
                            return
                    if n == 0:
                        rt.record_latency(time.monotonic_ns() - q[2 + role])
                spin(self.iterations)
                if not rt.tick() or not self._send(q, 1 - role, pidfd, sig):
                    return
        finally:
            os.close(pidfd)

    def _send(self, q: memoryview, to: int, pidfd: int, sig: int) -> bool:
        """Stamp and send a burst to role ``to``; False when the partner is gone."""
        q[2 + to] = time.monotonic_ns()
        try:
            for _ in range(self.burst):
                signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return False
        return True
