"""CPU-bound work: interpreter spinning, ALU mixing, cache-line ping-pong, IPC phases."""

from __future__ import annotations

import os
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ktstr.scenario.work.base import (
    Line,
    SharedLines,
    Work,
    check_range,
    group_cpus,
    group_member,
    set_affinity,
    spin,
)

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime

_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class CpuSpin(Work):
    name: ClassVar[str] = "cpu_spin"
    iterations: int = 2000

    def run(self, rt: WorkerRuntime) -> None:
        n = self.iterations
        while True:
            spin(n)
            if not rt.tick():
                return


@dataclass(frozen=True)
class YieldHeavy(Work):
    name: ClassVar[str] = "yield_heavy"
    iterations: int = 200

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            spin(self.iterations)
            os.sched_yield()
            if not rt.tick():
                return


@dataclass(frozen=True)
class Mixed(Work):
    """Spin, with a yield every 4th unit and a 200 us sleep every 16th."""

    name: ClassVar[str] = "mixed"
    iterations: int = 2000

    def run(self, rt: WorkerRuntime) -> None:
        i = 0
        while True:
            spin(self.iterations)
            i += 1
            if i % 16 == 0:
                time.sleep(200e-6)
            elif i % 4 == 0:
                os.sched_yield()
            if not rt.tick():
                return


@dataclass(frozen=True)
class Bursty(Work):
    """``on_ms`` of spinning (many units), then ``off_ms`` asleep."""

    name: ClassVar[str] = "bursty"
    on_ms: float = 50.0
    off_ms: float = 100.0
    iterations: int = 1000

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            end = time.monotonic() + self.on_ms / 1000
            while time.monotonic() < end:
                spin(self.iterations)
                if not rt.tick():
                    return
            time.sleep(self.off_ms / 1000)
            if not rt.poll():
                return


def alu_mix(x: int, rounds: int) -> int:
    """``rounds`` of a 64-bit hash finaliser (shift-xor, multiply): each step needs the last."""
    for _ in range(rounds):
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & _M64
        x ^= x >> 29
    return x


@dataclass(frozen=True)
class AluHot(Work):
    """Integer multiply/xor/shift mixing, ``iterations`` rounds per unit.

    Unlike CpuSpin's growing sum of squares the values stay 64-bit and each round
    depends on the previous one: a dependent multiply chain on a few registers, no
    memory traffic. The kind of task SMT siblings and frequency scaling slow down.
    """

    name: ClassVar[str] = "alu_hot"
    iterations: int = 1000

    def __post_init__(self) -> None:
        check_range(self, "iterations", 1)

    def run(self, rt: WorkerRuntime) -> None:
        x = rt.rng.getrandbits(64) | 1
        n = self.iterations
        while True:
            x = alu_mix(x, n)
            if not rt.tick():
                return


@dataclass(frozen=True)
class SmtSiblingSpin(SharedLines):
    """Pairs hand a turn word in one shared cache line back and forth by busy-waiting.

    The line bounces between the pair's CPUs on every hand-off, so a pair is fast
    only while both run at once and close together. With ``pin`` each pair pins
    itself to the two hardware threads of one core when the cpuset offers SMT
    siblings (from the topology the runner passes), else it runs unpinned and says
    so in the scenario's notes. A waiter yields every ``yield_every`` polls, so a pair
    sharing one CPU still progresses. One unit = ``handoffs`` hand-offs.
    """

    name: ClassVar[str] = "smt_sibling_spin"
    group_size: ClassVar[int] = 2
    handoffs: int = 8
    yield_every: int = 64
    pin: bool = True

    def __post_init__(self) -> None:
        check_range(self, "handoffs", 1)
        check_range(self, "yield_every", 1)

    def _pin(self, rt: WorkerRuntime, pair: int, role: int) -> None:
        cores = [c for c in group_cpus(rt, rt.allowed_cpus(), lambda p: p.core)
                 if len(c) >= 2] if rt.places else []
        if not cores:
            rt.note("smt_sibling_spin: no SMT siblings among the allowed CPUs; pairs unpinned")
            return
        set_affinity({cores[pair % len(cores)][role]})

    def run(self, rt: WorkerRuntime) -> None:
        pair, role = group_member(rt, self)
        if self.pin:
            self._pin(rt, pair, role)
        turn = Line(rt.shared, pair).q
        other = 1 - role
        every = self.yield_every
        while True:
            for _ in range(self.handoffs):
                polls = 0
                while turn[0] != role:
                    polls += 1
                    if polls % every == 0:
                        os.sched_yield()
                        if not rt.poll():
                            turn[0] = other  # release a partner still spinning
                            return
                turn[0] = other
            if not rt.tick():
                turn[0] = other
                return


# A full-period LCG modulo a power of two (a = 1 mod 4, c odd): as a "next" table it is
# one cycle through every slot, each hop far from the last.
_LCG_A, _LCG_C = 1103515245, 12345


@dataclass(frozen=True)
class IpcVariance(Work):
    """Alternating phases: ``high_ms`` of ALU mixing (high IPC), then ``low_ms`` of
    pointer chasing through a ``chase_kb`` table (each load depends on the last and
    misses the caches: low IPC). One unit = ``iterations`` rounds or hops.

    A scheduler that samples a task's behaviour (utilisation, IPC, cache footprint)
    sees it change under it every phase.
    """

    name: ClassVar[str] = "ipc_variance"
    high_ms: float = 20.0
    low_ms: float = 20.0
    chase_kb: int = 4096
    iterations: int = 500

    def __post_init__(self) -> None:
        check_range(self, "high_ms", 0.1)
        check_range(self, "low_ms", 0.1)
        check_range(self, "chase_kb", 4, 1 << 20)
        check_range(self, "iterations", 1)

    def run(self, rt: WorkerRuntime) -> None:
        slots = 1 << ((self.chase_kb * 1024 // 4).bit_length() - 1)
        mask = slots - 1
        table = array("I")
        for start in range(0, slots, 16384):  # a unit per chunk: building it is work too
            upto = min(slots, start + 16384)
            table.extend((i * _LCG_A + _LCG_C) & mask for i in range(start, upto))
            if not rt.tick():
                return
        n = self.iterations
        x = rt.rng.getrandbits(64) | 1
        cur = 0
        phases = ((True, int(self.high_ms * 1e6)), (False, int(self.low_ms * 1e6)))
        while True:
            for high, length in phases:
                end = time.monotonic_ns() + length
                while time.monotonic_ns() < end:
                    if high:
                        x = alu_mix(x, n)
                    else:
                        for _ in range(n):
                            cur = table[cur]
                    if not rt.tick():
                        return

