"""Wake-up work between partners: pipes and futex words, pairs, rings, queues.

Every type records wake latency (from the waker's timestamp to the woken worker
running) with ``rt.record_latency``.
"""

from __future__ import annotations

import os
import struct
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
    nonblocking_pipe,
    read_exact,
    spin,
    wait_change,
    write_all,
)

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime

_STAMP = struct.Struct("<Q")


def _pipe_pairs(workers: int, size: int | None = None) -> list[tuple[tuple[int, int], ...]]:
    """Two pipes per pair (a->b, b->a)."""
    return [(nonblocking_pipe(size), nonblocking_pipe(size)) for _ in range(workers // 2)]


def _ends(rt: WorkerRuntime, work: Work) -> tuple[int, int]:
    """(read end, write end) of this pair member."""
    pair, role = group_member(rt, work)
    ab, ba = rt.shared[pair]
    return (ba[0], ab[1]) if role == 0 else (ab[0], ba[1])


@dataclass(frozen=True)
class PipeIo(Work):
    """Pairs bounce an 8-byte timestamp over two pipes; wake latency = receive - send."""

    name: ClassVar[str] = "pipe_io"
    group_size: ClassVar[int] = 2
    iterations: int = 100

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        return _pipe_pairs(workers)

    def run(self, rt: WorkerRuntime) -> None:
        rx, tx = _ends(rt, self)
        if rt.member % 2 == 0:
            os.write(tx, _STAMP.pack(time.monotonic_ns()))
        while True:
            data = read_exact(rt, rx, 8)
            if data is None:
                return
            rt.record_latency(time.monotonic_ns() - _STAMP.unpack(data)[0])
            spin(self.iterations)
            if not rt.tick():
                return
            os.write(tx, _STAMP.pack(time.monotonic_ns()))


@dataclass(frozen=True)
class FutexPingPong(SharedLines):
    """Pairs hand a turn word back and forth with FUTEX_WAIT/FUTEX_WAKE on shared memory.

    Wake latency = time from the partner's FUTEX_WAKE to this worker running again.
    """

    name: ClassVar[str] = "futex_pingpong"
    group_size: ClassVar[int] = 2
    iterations: int = 100

    def run(self, rt: WorkerRuntime) -> None:
        pair, role = group_member(rt, self)
        line = Line(rt.shared, pair)
        turn, stamp = line.word, line.q
        while True:
            while turn.value != role:
                turn.wait(1 - role, POLL_S)
                if not rt.poll():
                    return
            sent = stamp[0]
            if sent:
                rt.record_latency(time.monotonic_ns() - sent)
            spin(self.iterations)
            if not rt.tick():
                turn.value = 1 - role  # let the partner notice the stop too
                turn.wake(1)
                return
            stamp[0] = time.monotonic_ns()
            turn.value = 1 - role
            turn.wake(1)


@dataclass(frozen=True)
class CachePipe(Work):
    """Pairs pass a ``size_kb`` buffer (about a cache's worth) back and forth through
    pipes, reading every cache line of it before sending it back.

    The data moves between the pair's caches every hand-off; latency = from the
    sender's first byte to the receiver holding the whole buffer.
    """

    name: ClassVar[str] = "cache_pipe"
    group_size: ClassVar[int] = 2
    size_kb: int = 256

    def __post_init__(self) -> None:
        check_range(self, "size_kb", 1, 16 * 1024)

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        return _pipe_pairs(workers, self.size_kb * 1024)

    def run(self, rt: WorkerRuntime) -> None:
        rx, tx = _ends(rt, self)
        size = self.size_kb * 1024
        buf = bytearray(os.urandom(size))
        if rt.member % 2 == 0:
            _STAMP.pack_into(buf, 0, time.monotonic_ns())
            if not write_all(rt, tx, buf):
                return
        while True:
            data = read_exact(rt, rx, size)
            if data is None:
                return
            rt.record_latency(time.monotonic_ns() - _STAMP.unpack_from(data, 0)[0])
            buf[:] = data
            sum(buf[::64])  # read every line of it
            if not rt.tick():
                return
            _STAMP.pack_into(buf, 0, time.monotonic_ns())
            if not write_all(rt, tx, buf):
                return


@dataclass(frozen=True)
class AsymmetricWaker(SharedLines):
    """Pairs: a heavy worker spins ``heavy_iterations`` per unit, then wakes its light
    partner (a futex), which runs ``light_iterations`` and sleeps again.

    The waker never waits for the wakee: a wake-affine scheduler pulls the light task
    onto the busy waker's CPU, a spreading one keeps them apart. The light worker
    records its wake latency; posts it has not consumed yet coalesce.
    """

    name: ClassVar[str] = "asymmetric_waker"
    group_size: ClassVar[int] = 2
    heavy_iterations: int = 5000
    light_iterations: int = 100

    def __post_init__(self) -> None:
        check_range(self, "heavy_iterations", 1)
        check_range(self, "light_iterations", 1)

    def run(self, rt: WorkerRuntime) -> None:
        pair, role = group_member(rt, self)
        line = Line(rt.shared, pair)
        post, stamp = line.word, line.q
        if role == 0:
            gen = 0
            while True:
                spin(self.heavy_iterations)
                stamp[0] = time.monotonic_ns()
                gen += 1
                post.value = gen
                post.wake(1)
                if not rt.tick():
                    return
        seen = post.value
        while True:
            if not wait_change(rt, post, seen):
                return
            seen = post.value
            rt.record_latency(time.monotonic_ns() - stamp[0])
            spin(self.light_iterations)
            if not rt.tick():
                return


@dataclass(frozen=True)
class WakeChain(SharedLines):
    """Rings of ``length`` workers pass one token around: worker i wakes worker i+1
    (a futex word each), so exactly one member of a ring runs at a time.

    Every member records the latency from its predecessor's wake; a ring is as fast
    as its slowest hand-off, so one member left waiting stalls all of them.
    """

    name: ClassVar[str] = "wake_chain"
    length: int = 4
    iterations: int = 200

    def __post_init__(self) -> None:
        check_range(self, "length", 2, 256)
        check_range(self, "iterations", 0)

    def group(self) -> int:
        return self.length

    def lines(self, workers: int) -> int:
        return workers  # one per member

    def run(self, rt: WorkerRuntime) -> None:
        ring, idx = group_member(rt, self)
        base = ring * self.length
        mine = Line(rt.shared, base + idx)
        nxt = Line(rt.shared, base + (idx + 1) % self.length)
        seen = sent = 0
        first = idx == 0  # the first member starts with the token
        while True:
            if not first:
                if not wait_change(rt, mine.word, seen):
                    return
                seen = mine.word.value
                rt.record_latency(time.monotonic_ns() - mine.q[0])
            first = False
            spin(self.iterations)
            going = rt.tick()
            nxt.q[0] = time.monotonic_ns()
            sent += 1
            nxt.word.value = sent  # passed on even when stopping: the ring must not stall
            nxt.word.wake(1)
            if not going:
                return


_ITEM = 64  # a queue item: a timestamp and padding (<= PIPE_BUF, so writes are atomic)


@dataclass(frozen=True)
class ProducerConsumerImbalance(Work):
    """Groups of ``producers`` fast producers and ``consumers`` slow consumers share
    one small pipe (``pipe_kb``). A producer spends ``produce_iterations`` per
    64-byte item, a consumer ``consume_iterations``: the pipe fills, producers block
    on it and are woken as consumers drain it.

    Consumers record each item's latency from its production (queueing + wake-up).
    Members ``0 .. producers-1`` of a group produce, the rest consume.
    """

    name: ClassVar[str] = "producer_consumer_imbalance"
    producers: int = 2
    consumers: int = 1
    produce_iterations: int = 100
    consume_iterations: int = 3000
    pipe_kb: int = 4

    def __post_init__(self) -> None:
        check_range(self, "producers", 1, 256)
        check_range(self, "consumers", 1, 256)
        check_range(self, "produce_iterations", 0)
        check_range(self, "consume_iterations", 0)
        check_range(self, "pipe_kb", 4, 1024)

    def group(self) -> int:
        return self.producers + self.consumers

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        super().make_shared(workers, scratch_dir)
        return [nonblocking_pipe(self.pipe_kb * 1024) for _ in range(workers // self.group())]

    def run(self, rt: WorkerRuntime) -> None:
        grp, idx = group_member(rt, self)
        rx, tx = rt.shared[grp]
        item = bytearray(_ITEM)
        if idx < self.producers:
            while True:
                spin(self.produce_iterations)
                _STAMP.pack_into(item, 0, time.monotonic_ns())
                if not write_all(rt, tx, item) or not rt.tick():
                    return
        while True:
            data = read_exact(rt, rx, _ITEM)
            if data is None:
                return
            rt.record_latency(time.monotonic_ns() - _STAMP.unpack_from(data, 0)[0])
            spin(self.consume_iterations)
            if not rt.tick():
                return
