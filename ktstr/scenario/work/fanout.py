"""One-to-many wake-ups: a leader posts a round to N followers and joins them.

Group layout in the shared mapping (``followers + 1`` lines per group): line 0 is the
broadcast word (round number, post timestamp); line ``1 + i`` is follower i's: the
round posted to it (``word``), the round it finished (``ack``), and in ``q`` its post
timestamp, its work item, and when it finished. Every word has one writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ktstr.scenario.syscalls import WAKE_ALL
from ktstr.scenario.work.base import (
    Line,
    SharedLines,
    check_range,
    group_member,
    spin,
    wait_change,
    wait_value,
)

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime

_STAMP, _ITEM, _DONE = 0, 1, 2  # q words of a follower's line


@dataclass(frozen=True)
class _Gather(SharedLines):
    """Member 0 of a group leads: posts a round, runs its own share, waits for every
    follower's ack (one unit). Followers wait for the round, record their wake latency,
    run their item, ack (one unit). The leader records the latency of its own wake
    by the last ack."""

    broadcast: ClassVar[bool] = False
    """One FUTEX_WAKE of everyone on the broadcast word, instead of one per follower."""

    def width(self) -> int:
        """Followers per group."""
        raise NotImplementedError

    def item(self, rt: WorkerRuntime) -> int:
        """Iterations a follower runs this round."""
        raise NotImplementedError

    def leader_share(self) -> int:
        """Iterations the leader runs between posting a round and joining it."""
        raise NotImplementedError

    def group(self) -> int:
        return self.width() + 1

    def lines(self, workers: int) -> int:
        return workers  # followers + 1 per group

    def run(self, rt: WorkerRuntime) -> None:
        grp, idx = group_member(rt, self)
        base = grp * self.group()
        bcast = Line(rt.shared, base)
        lines = [Line(rt.shared, base + 1 + i) for i in range(self.width())]
        if idx == 0:
            self._lead(rt, bcast, lines)
        else:
            self._follow(rt, bcast, lines[idx - 1])

    def _lead(self, rt: WorkerRuntime, bcast: Line, lines: list[Line]) -> None:
        rnd = 0
        while True:
            rnd = rnd % 0xFFFFFFFF + 1  # never 0: followers start out having seen 0
            for ln in lines:
                ln.q[_ITEM] = self.item(rt)
            if self.broadcast:
                bcast.q[_STAMP] = time.monotonic_ns()
                bcast.word.value = rnd
                bcast.word.wake(WAKE_ALL)
            else:
                for ln in lines:
                    ln.q[_STAMP] = time.monotonic_ns()
                    ln.word.value = rnd
                    ln.word.wake(1)
            spin(self.leader_share())
            for ln in lines:
                if not wait_value(rt, ln.ack, rnd):
                    return
            rt.record_latency(time.monotonic_ns() - max(ln.q[_DONE] for ln in lines))
            if not rt.tick():
                return

    def _follow(self, rt: WorkerRuntime, bcast: Line, line: Line) -> None:
        post = bcast if self.broadcast else line
        seen = 0
        while True:
            if not wait_change(rt, post.word, seen):
                return
            seen = post.word.value
            rt.record_latency(time.monotonic_ns() - post.q[_STAMP])
            spin(line.q[_ITEM])
            line.q[_DONE] = time.monotonic_ns()
            line.ack.value = seen
            line.ack.wake(1)
            if not rt.tick():
                return


@dataclass(frozen=True)
class _Waiters(_Gather):
    """A waker and ``waiters`` waiters, each running ``iterations`` per round."""

    waiters: int = 3
    iterations: int = 100

    def __post_init__(self) -> None:
        check_range(self, "waiters", 1, 255)
        check_range(self, "iterations", 0)

    def width(self) -> int:
        return self.waiters

    def item(self, rt: WorkerRuntime) -> int:
        return self.iterations


@dataclass(frozen=True)
class FutexFanOut(_Waiters):
    """Groups of one waker and ``waiters`` waiters, each on its own futex word: every
    round the waker issues one FUTEX_WAKE per waiter in turn, then waits for all.

    Each waiter's latency is its own wake (stamped just before its FUTEX_WAKE); the
    waker's cost of waking them one by one shows in its work rate. ``iterations``
    is each waiter's work per round and the waker's own between rounds.
    """

    name: ClassVar[str] = "futex_fan_out"

    def leader_share(self) -> int:
        return self.iterations


@dataclass(frozen=True)
class ThunderingHerd(_Waiters):
    """Groups of one waker and ``waiters`` waiters all asleep on one futex word; one
    FUTEX_WAKE wakes the whole herd at once, each runs ``iterations`` and acks, and the
    waker waits for every ack before the next round.

    Every waiter is woken exactly once per round; the latencies show how long the
    last of a herd waits for a CPU.
    """

    name: ClassVar[str] = "thundering_herd"
    broadcast: ClassVar[bool] = True
    waiters: int = 7
    iterations: int = 200

    def leader_share(self) -> int:
        return 0


@dataclass(frozen=True)
class FanOutCompute(_Gather):
    """Fork-join: a leader hands one work item to each of ``followers`` followers, runs
    its own share, and waits for all of them before the next round.

    Items vary by ``skew`` around ``iterations`` (0.5: 50-150 %), so each round is
    as long as its slowest follower: a scheduler that leaves one follower waiting
    for a CPU stalls the whole group.
    """

    name: ClassVar[str] = "fan_out_compute"
    followers: int = 3
    iterations: int = 2000
    skew: float = 0.5

    def __post_init__(self) -> None:
        check_range(self, "followers", 1, 255)
        check_range(self, "iterations", 1)
        check_range(self, "skew", 0.0, 0.99)

    def width(self) -> int:
        return self.followers

    def item(self, rt: WorkerRuntime) -> int:
        return max(1, int(self.iterations * (1 + self.skew * (2 * rt.rng.random() - 1))))

    def leader_share(self) -> int:
        return self.iterations
