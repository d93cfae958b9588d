"""Scheduler definitions: what runs in the guest, with which flags, on which kernels.

A :class:`Scheduler` names a binary (the kernel's own EEVDF/CFS, a sched_ext
scheduler discovered by name, or an explicit path), its fixed arguments, and
optional *flags*. Flags combine into *profiles*: the power set of the flags,
minus combinations that break a flag's ``requires``. Profiles are named
``default`` (no flags) or the sorted flag names joined by ``+`` so that
gauntlet ids and result sidecars are deterministic.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ktstr.errors import KtstrError
from ktstr.wire.request import SchedulerSpec

if TYPE_CHECKING:
    from ktstr.checks import Checks

DEFAULT_WATCHDOG_TIMEOUT = 4.0
"""Seconds the kernel's sched_ext watchdog waits for a runnable task before ejecting."""

SCHEDULER_DIR_ENV = "KTSTR_SCHEDULER_DIR"


class _Eevdf:
    """Marker for "no scheduler binary": the kernel's built-in fair class (EEVDF, or CFS)."""

    _instance: _Eevdf | None = None

    def __new__(cls) -> _Eevdf:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "EEVDF"

    def __reduce__(self) -> str:
        return "EEVDF"


EEVDF = _Eevdf()


@dataclass(frozen=True)
class Discover:
    """Find the binary called ``name`` at run time (scheduler dir, kernel build, PATH)."""

    name: str

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise KtstrError(
                f"Discover({self.name!r}): give a bare binary name such as 'scx_simple'; "
                "use a Path for an explicit location"
            )


Binary = _Eevdf | Discover | Path


class _HasSchedulers(Protocol):
    """The slice of ``ktstr.kernel.KernelEntry`` that binary discovery needs."""

    @property
    def schedulers(self) -> Mapping[str, Path]: ...


@dataclass(frozen=True)
class FlagSpec:
    """One optional scheduler flag: the arguments it adds and the flags it needs."""

    args: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists from users; store tuples so the spec stays hashable.
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "requires", tuple(self.requires))


@dataclass(frozen=True)
class FlagProfile:
    """A set of enabled flags; ``name`` is ``default`` or ``a+b`` (sorted)."""

    flags: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.flags) if self.flags else "default"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class AttachPolicy:
    """How many times the guest restarts a scheduler that fails to attach, and for what.

    A retry happens only when the failed attempt's scheduler output or sched_ext
    message matches one of ``transient`` (regular expressions): a failure the scheduler
    is known to hit by chance, e.g. a race in its own init. Any other attach failure
    fails the test at once. Every failed attempt is recorded with its reason.
    """

    retries: int = 0
    transient: tuple[str, ...] = ()
    init_cpu: int | None = None
    """The CPU the scheduler's ops.init must run on. On kernels that run the enable in a
    helper kthread (``scx_ops_enable_helper``, 6.12) the guest pins that kthread there
    before each attempt it already exists for (so every retry, at least)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "transient", tuple(self.transient))
        if self.init_cpu is not None and (not isinstance(self.init_cpu, int)
                                          or self.init_cpu < 0):
            raise KtstrError(f"attach init_cpu must be a CPU number, got {self.init_cpu!r}")
        if not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise KtstrError(f"attach retries must be an integer 0..10, got {self.retries!r}")
        if self.retries and not self.transient:
            raise KtstrError("attach retries need the transient failures they are for "
                             "(transient=(regex, ...)): an unconditional retry hides bugs")
        for pattern in self.transient:
            try:
                re.compile(pattern)
            except re.error as err:
                raise KtstrError(f"attach transient pattern {pattern!r}: {err}") from None


@dataclass(frozen=True)
class KnownIssue:
    """A failure this scheduler is known to produce: a bug of its own (or of the kernel it
    ships with) that a test rightly catches, documented where ``reason`` says.

    A failed test whose failure text matches ``pattern`` (a regular expression, searched
    in what failed the run: the guest's classified failure with the scheduler's exit
    report, else the failed checks), on a test whose name matches one of ``tests``
    (``fnmatch`` globs; empty: any test), is reported as an expected failure that names
    the issue: never a pass, and never a hidden one. Any other failure fails as usual.
    """

    pattern: str
    reason: str
    tests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tests", tuple(self.tests))
        if not self.reason.strip():
            raise KtstrError("a known issue needs its reason (what the bug is, where it is "
                             "documented)")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise KtstrError(f"known issue pattern {self.pattern!r}: {err}") from None

    def matches(self, test_name: str, failure: str) -> bool:
        """Whether ``failure`` of test ``test_name`` (its name, parameters included) is
        this issue."""
        base = test_name.split("[", 1)[0]
        if self.tests and not any(fnmatch.fnmatchcase(base, glob) for glob in self.tests):
            return False
        return re.search(self.pattern, failure) is not None


@dataclass(frozen=True)
class Scheduler:
    """A scheduler under test.

    ``checks`` (a :class:`ktstr.checks.Checks`) overrides the default
    thresholds for every test run under this scheduler; a test's own
    ``checks=`` wins over it. ``watchdog_timeout`` is handed to the guest,
    which applies it to the kernel's sched_ext watchdog. ``known_issues`` are its
    documented bugs that tests catch (:class:`KnownIssue`).
    """

    name: str
    binary: Binary = EEVDF
    args: tuple[str, ...] = ()
    flags: Mapping[str, FlagSpec] = field(default_factory=dict)
    sysctls: Mapping[str, str] = field(default_factory=dict)
    kargs: tuple[str, ...] = ()
    checks: Checks | Mapping[str, Any] | None = None
    watchdog_timeout: float = DEFAULT_WATCHDOG_TIMEOUT
    attach: AttachPolicy = field(default_factory=AttachPolicy)
    known_issues: tuple[KnownIssue, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "known_issues", tuple(self.known_issues))
        object.__setattr__(self, "kargs", tuple(self.kargs))
        object.__setattr__(self, "flags", dict(self.flags))
        object.__setattr__(self, "sysctls", {str(k): str(v) for k, v in self.sysctls.items()})
        if not self.name or any(c.isspace() for c in self.name) or "@" in self.name:
            raise KtstrError(
                f"scheduler name {self.name!r}: use a non-empty name without spaces or '@'"
            )
        if isinstance(self.binary, str):
            raise KtstrError(
                f"scheduler {self.name}: binary={self.binary!r} is a string; use "
                f"Discover({self.binary!r}) to look it up or Path({self.binary!r}) for a file"
            )
        if not isinstance(self.binary, _Eevdf | Discover | Path):
            raise KtstrError(
                f"scheduler {self.name}: binary must be EEVDF, Discover(name) or a Path, "
                f"got {type(self.binary).__name__}"
            )
        if not isinstance(self.watchdog_timeout, int | float) or self.watchdog_timeout <= 0:
            raise KtstrError(
                f"scheduler {self.name}: watchdog_timeout must be a positive number of "
                f"seconds, got {self.watchdog_timeout!r}"
            )
        for flag, spec in self.flags.items():
            if not isinstance(spec, FlagSpec):
                raise KtstrError(
                    f"scheduler {self.name}: flag {flag!r} must be a FlagSpec(args, requires)"
                )
            if not flag or "+" in flag or flag == "default":
                raise KtstrError(
                    f"scheduler {self.name}: flag name {flag!r} is reserved or contains '+'"
                )
            for needed in spec.requires:
                if needed not in self.flags:
                    raise KtstrError(
                        f"scheduler {self.name}: flag {flag!r} requires unknown flag "
                        f"{needed!r} (known: {', '.join(sorted(self.flags))})"
                    )
                if needed == flag:
                    raise KtstrError(f"scheduler {self.name}: flag {flag!r} requires itself")
        if not isinstance(self.attach, AttachPolicy):
            raise KtstrError(f"scheduler {self.name}: attach must be an AttachPolicy")
        if not all(isinstance(k, KnownIssue) for k in self.known_issues):
            raise KtstrError(f"scheduler {self.name}: known_issues must be KnownIssue(...)s")
        if self.binary is EEVDF and self.flags:
            raise KtstrError(
                f"scheduler {self.name}: the kernel's built-in scheduler takes no flags"
            )

    @property
    def sched_ext(self) -> bool:
        """True when this scheduler is a sched_ext program (needs CONFIG_SCHED_CLASS_EXT)."""
        return self.binary is not EEVDF

    def profiles(self) -> list[FlagProfile]:
        """Every valid flag combination, ``default`` first, then by size and name."""
        names = sorted(self.flags)
        out: list[FlagProfile] = []
        for size in range(len(names) + 1):
            for combo in itertools.combinations(names, size):
                chosen = set(combo)
                if all(set(self.flags[f].requires) <= chosen for f in combo):
                    out.append(FlagProfile(tuple(combo)))
        return out

    def profile(self, name: str) -> FlagProfile:
        """The profile called ``name`` (``default`` or ``a+b``, any order)."""
        if name in ("", "default"):
            return FlagProfile(())
        wanted = tuple(sorted(part.strip() for part in name.split("+")))
        for prof in self.profiles():
            if prof.flags == wanted:
                return prof
        unknown = [f for f in wanted if f not in self.flags]
        if unknown:
            raise KtstrError(
                f"scheduler {self.name}: unknown flag(s) {', '.join(unknown)}; known flags: "
                f"{', '.join(sorted(self.flags)) or 'none'}"
            )
        raise KtstrError(
            f"scheduler {self.name}: flag profile {name!r} breaks a 'requires' rule; valid "
            f"profiles: {', '.join(p.name for p in self.profiles())}"
        )

    def command_args(self, profile: FlagProfile | str | None = None) -> list[str]:
        """Arguments for the binary: fixed ``args`` then each flag's args in profile order."""
        prof = self.profile(profile) if isinstance(profile, str) else profile
        out = list(self.args)
        for flag in prof.flags if prof else ():
            out.extend(self.flags[flag].args)
        return out

    def with_args(self, *extra: str, name: str | None = None) -> Scheduler:
        """A copy with extra fixed arguments (e.g. fault knobs for negative tests)."""
        return replace(self, name=name or self.name, args=(*self.args, *extra))

    def known_issue(self, test_name: str, failure: str) -> KnownIssue | None:
        """The first of :attr:`known_issues` that ``failure`` of ``test_name`` is."""
        return next((k for k in self.known_issues if k.matches(test_name, failure)), None)

    def guest_spec(self, binary: Path, profile: FlagProfile, *, extra_args: Sequence[str] = (),
                   watchdog_timeout: float | None = None) -> SchedulerSpec:
        """What the guest starts: the one conversion to the run request's scheduler.

        ``binary`` is :meth:`resolve_binary`'s; ``watchdog_timeout`` (seconds) is a test's
        own, which wins over this scheduler's.
        """
        watchdog = watchdog_timeout or self.watchdog_timeout
        return SchedulerSpec(
            binary=str(binary),
            args=[*self.command_args(profile), *extra_args],
            watchdog_timeout_ms=int(watchdog * 1000),
            attach_retries=self.attach.retries,
            attach_transient=list(self.attach.transient),
            attach_init_cpu=self.attach.init_cpu,
        )

    def resolve_binary(self, kernel: _HasSchedulers | None = None) -> Path | None:
        """The host path of the binary to copy into the guest; ``None`` for EEVDF."""
        binary = self.binary
        if isinstance(binary, _Eevdf):
            return None
        if isinstance(binary, Path):
            path = binary.expanduser()
            if not path.is_file():
                raise KtstrError(f"scheduler {self.name}: binary {path} does not exist")
            if not os.access(path, os.X_OK):
                raise KtstrError(f"scheduler {self.name}: binary {path} is not executable")
            return path.resolve()
        return discover(binary.name, kernel)


def discover(name: str, kernel: _HasSchedulers | None = None) -> Path:
    """Find scheduler binary ``name``: ``$KTSTR_SCHEDULER_DIR``, the kernel's build, PATH."""
    looked: list[str] = []
    sched_dir = os.environ.get(SCHEDULER_DIR_ENV)
    if sched_dir:
        candidate = Path(sched_dir).expanduser() / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
        looked.append(f"${SCHEDULER_DIR_ENV} ({sched_dir})")
    else:
        looked.append(f"${SCHEDULER_DIR_ENV} (unset)")
    if kernel is not None:
        built = dict(getattr(kernel, "schedulers", {}) or {})
        path = built.get(name)
        if path is not None and Path(path).is_file():
            return Path(path).resolve()
        kid = getattr(kernel, "id", "the kernel")
        looked.append(f"schedulers built with kernel {kid} ({', '.join(sorted(built)) or 'none'})")
    found = shutil.which(name)
    if found:
        return Path(found).resolve()
    looked.append("PATH")
    raise KtstrError(
        f"scheduler binary {name!r} not found in {'; '.join(looked)}; build it with "
        f"`ktstr kernel build` (schedulers come with the kernel) or set ${SCHEDULER_DIR_ENV}"
    )


BUILTIN: dict[str, Scheduler] = {
    s.name: s
    for s in (
        Scheduler("eevdf"),
        Scheduler(
            "scx_simple",
            Discover("scx_simple"),
            flags={"fifo": FlagSpec(("-f",))},
        ),
        Scheduler(
            "scx_qmap",
            Discover("scx_qmap"),
            flags={
                "batch": FlagSpec(("-b", "8")),
                "highpri": FlagSpec(("-H",), requires=("batch",)),
                "slice": FlagSpec(("-s", "5000")),
            },
        ),
        Scheduler(
            "scx_central",
            Discover("scx_central"),
            flags={"slice": FlagSpec(("-s", "5000"))},
            # Its ops.init must run on the central CPU (0 unless -c), but 6.12 runs it in
            # the enable helper kthread wherever that is: the first attempt can fail, and
            # a retry succeeds once the guest has pinned the helper to CPU 0.
            attach=AttachPolicy(retries=4, transient=(r"init from non-central CPU",),
                                init_cpu=0),
            known_issues=(KnownIssue(
                r"SCX_DSQ_LOCAL\[_ON\] cannot move migration disabled",
                "dispatch_to_cpu() sends a task to SCX_DSQ_LOCAL_ON | cpu after checking "
                "only p->cpus_ptr, which a migration-disabled task still shows whole until "
                "it is switched out; the kernel then ejects the scheduler (kernel/sched/"
                "ext.c, task_can_run_on_remote_rq: 'the BPF scheduler failing to check "
                "migration disabled state')"),),
        ),
        Scheduler(
            "scx_flatcg",
            Discover("scx_flatcg"),
            flags={"fifo": FlagSpec(("-f",))},
            known_issues=(KnownIssue(
                r"runnable task stall",
                "fcg_enqueue() puts every task with a narrowed cpumask on FALLBACK_DSQ, "
                "which fcg_dispatch() consumes before any cgroup's queue: CPU-bound pinned "
                "tasks keep the CPUs and the cgroups' tasks starve (scx_flatcg.bpf.c: 'This "
                "is ham-fisted')",
                tests=("test_affinity",)),),
        ),
    )
}
"""The schedulers the nox matrix and the gauntlet know by name."""

DEFAULT_SCHEDULER = "eevdf"


def get_scheduler(spec: str | Scheduler | None) -> Scheduler:
    """A scheduler from a built-in name, a path to a binary, or a :class:`Scheduler`."""
    if isinstance(spec, Scheduler):
        return spec
    if spec is None or not str(spec).strip():
        return BUILTIN[DEFAULT_SCHEDULER]
    text = str(spec).strip()
    if text in BUILTIN:
        return BUILTIN[text]
    if "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise KtstrError(f"scheduler {text!r}: no such file; give a built-in name or a path")
        return Scheduler(path.name, path)
    raise KtstrError(
        f"unknown scheduler {text!r}; built-in: {', '.join(BUILTIN)}, or give a path to a "
        "sched_ext binary"
    )


def parse_scheduler_option(spec: str) -> tuple[Scheduler, FlagProfile]:
    """``NAME`` or ``NAME@PROFILE`` (e.g. ``scx_qmap@batch+highpri``) from CLI or env."""
    name, _, prof = spec.partition("@")
    sched = get_scheduler(name)
    return sched, sched.profile(prof or "default")

