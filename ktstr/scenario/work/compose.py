"""Composition: idle phases, sequences of work, and user functions."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ktstr.errors import KtstrError
from ktstr.scenario.work.base import Work

if TYPE_CHECKING:
    from ktstr.scenario.worker import WorkerRuntime


@dataclass(frozen=True)
class Sleep(Work):
    """Sleep in ``slice_ms`` slices, one unit per slice (an idle phase for Sequence)."""

    name: ClassVar[str] = "sleep"
    slice_ms: float = 10.0

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            time.sleep(self.slice_ms / 1000)
            if not rt.tick():
                return


@dataclass(frozen=True)
class Sequence(Work):
    """Run ``phases`` (work, seconds) in order, cycling until stopped."""

    name: ClassVar[str] = "sequence"
    phases: tuple[tuple[Work, float], ...] = ()

    def make_shared(self, workers: int, scratch_dir: str) -> Any:
        if not self.phases:
            raise KtstrError("work sequence: needs at least one (work, seconds) phase")
        return [w.make_shared(workers, scratch_dir) for w, _ in self.phases]

    def check_workers(self, workers: int) -> None:
        for w, _ in self.phases:
            w.check_workers(workers)

    def cgroup_leaves(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(leaf for w, _ in self.phases for leaf in w.cgroup_leaves()))

    def run(self, rt: WorkerRuntime) -> None:
        shared = rt.shared
        while rt.running:
            for i, (work, seconds) in enumerate(self.phases):
                rt.shared = shared[i]
                rt.begin_phase(seconds)
                work.run(rt)
                rt.end_phase()
                if not rt.running:
                    return

    def describe(self) -> str:
        return "sequence(" + ",".join(f"{w.describe()}:{s:g}s" for w, s in self.phases) + ")"


@dataclass(frozen=True)
class Custom(Work):
    """Call ``fn(rt)`` repeatedly; each call is one unit (or ``int`` units if it returns one)."""

    name: ClassVar[str] = "custom"
    fn: Callable[[WorkerRuntime], int | None] = field(default=lambda rt: None)
    label: str = "custom"

    def run(self, rt: WorkerRuntime) -> None:
        while True:
            units = self.fn(rt)
            if not rt.tick(units if isinstance(units, int) and units > 0 else 1):
                return

    def describe(self) -> str:
        return self.label
