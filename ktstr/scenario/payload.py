"""Payloads: real programs (hackbench, cyclictest, stress-ng, or a user's own) run as
scenario steps, their output parsed into metrics.

A :class:`Payload` names a program, its arguments and a parser; the host packs the
program with its shared-library closure into the guest (``@ktstr_test(payloads=...)``)
and the ops :class:`~ktstr.scenario.model.RunPayload` / ``WaitPayload`` /
``KillPayload`` start, await and stop it. Parsers are pure functions of the
program's output; a parser that finds nothing raises :class:`PayloadOutputError`,
which the run reports as a failed payload, naming it. Standard library only: this
runs inside the guest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ktstr.errors import KtstrError

_LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class PayloadOutputError(ValueError):
    """The output does not hold what the parser looks for."""


@dataclass(frozen=True)
class PayloadMetric:
    """One number a payload's parser returns: its unit and which way is better."""

    name: str
    unit: str
    higher_is_better: bool


@dataclass(frozen=True)
class Payload:
    """A program run inside the guest as a scenario step.

    ``program`` is a name found on the host's PATH (packed at its host path) or an
    absolute path; ``parse(output)`` turns its combined stdout and stderr into the
    ``metrics`` it declares. ``timeout_s`` bounds one run.
    """

    name: str
    program: str
    args: tuple[str, ...] = ()
    parse: Callable[[str], dict[str, float]] | None = None
    metrics: tuple[PayloadMetric, ...] = ()
    timeout_s: float = 60.0
    package: str | None = None
    """The Debian package that installs ``program`` (for the error when it is missing)."""

    def __post_init__(self) -> None:
        if not _LABEL_RE.match(self.name):
            raise KtstrError(f"payload name {self.name!r}: use letters, digits, '_', '-', '.'")
        if not self.program:
            raise KtstrError(f"payload {self.name}: no program")
        if not isinstance(self.args, tuple) or not all(isinstance(a, str) for a in self.args):
            raise KtstrError(f"payload {self.name}: args must be a tuple of strings")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise KtstrError(f"payload {self.name}: timeout_s must be > 0")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise KtstrError(f"payload {self.name}: metric names repeat: {names}")

    def with_args(self, *args: str) -> Payload:
        """The same payload with other arguments."""
        return Payload(self.name, self.program, tuple(args), self.parse, self.metrics,
                       self.timeout_s, self.package)

    def metric(self, name: str) -> PayloadMetric | None:
        return next((m for m in self.metrics if m.name == name), None)


# ---- parsers (pure) ------------------------------------------------------------------


def parse_hackbench(output: str) -> dict[str, float]:
    """``Time: 0.383`` -> {"time_s": 0.383}."""
    m = re.search(r"^Time:\s*([0-9.]+)\s*$", output, re.M)
    if m is None:
        raise PayloadOutputError("no 'Time: SECONDS' line")
    return {"time_s": float(m[1])}


def parse_cyclictest(output: str) -> dict[str, float]:
    """A ``-q -h US`` run: max latency over threads and the p99 of their histogram (us)."""
    maxes = re.search(r"^# Max Latencies:((?:\s+\d+)+)\s*$", output, re.M)
    if maxes is None:
        raise PayloadOutputError("no '# Max Latencies:' line (run it with -q -h US)")
    worst = max(int(v) for v in maxes[1].split())
    buckets: list[tuple[int, int]] = []
    for line in output.splitlines():
        if re.match(r"^\d{6}(\s+\d+)+\s*$", line):
            cols = [int(c) for c in line.split()]
            buckets.append((cols[0], sum(cols[1:])))
    over = re.search(r"^# Histogram Overflows:((?:\s+\d+)+)\s*$", output, re.M)
    overflow = sum(int(v) for v in over[1].split()) if over else 0
    total = sum(n for _, n in buckets) + overflow
    out = {"max_us": float(worst)}
    if total:
        rank, seen = math.ceil(total * 0.99), 0
        p99 = float(worst)  # the overflow tail lies above the histogram
        for us, n in buckets:
            seen += n
            if seen >= rank:
                p99 = float(us)
                break
        out["p99_us"] = p99
    return out


def parse_stress_ng(output: str) -> dict[str, float]:
    """``--metrics-brief``: bogo ops/s (real time) per stressor, as ``<stressor>_bogo_ops_s``."""
    out: dict[str, float] = {}
    for line in output.splitlines():
        m = re.match(r"^stress-ng: (?:metrc|info):\s+\[\d+\]\s+([a-z][\w-]*)\s+(\d+)\s+"
                     r"([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", line)
        if m and m[1] != "stressor":
            out[f"{m[1].replace('-', '_')}_bogo_ops_s"] = float(m[6])
    if not out:
        raise PayloadOutputError("no stressor metrics (run it with --metrics-brief)")
    return out


HACKBENCH = Payload(
    "hackbench", "hackbench", ("-g", "2", "-l", "200", "-s", "100"), parse_hackbench,
    (PayloadMetric("time_s", "s", higher_is_better=False),), package="rt-tests",
)
"""Message passing between groups of processes (wakeup-heavy): lower time is better."""

CYCLICTEST = Payload(
    "cyclictest", "cyclictest", ("-q", "-D", "2", "-t", "2", "-i", "1000", "-h", "10000"),
    parse_cyclictest,
    (PayloadMetric("max_us", "us", higher_is_better=False),
     PayloadMetric("p99_us", "us", higher_is_better=False)),
    package="rt-tests",
)
"""Timer wake-up latency of SCHED_OTHER threads (no -p): the scheduler's wake path."""

STRESS_NG_CPU = Payload(
    "stress-ng", "stress-ng", ("--cpu", "2", "--timeout", "2s", "--metrics-brief"),
    parse_stress_ng, (PayloadMetric("cpu_bogo_ops_s", "ops/s", higher_is_better=True),),
    package="stress-ng",
)
"""CPU stressors' throughput: higher bogo ops/s is better."""

BUILTIN_PAYLOADS: dict[str, Payload] = {p.name: p for p in (HACKBENCH, CYCLICTEST,
                                                              STRESS_NG_CPU)}
