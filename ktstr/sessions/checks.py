"""The `tests` and `lint` sessions."""

from __future__ import annotations

import nox

from ktstr.paths import repo_root
from ktstr.sessions import vm

UNIT_SUITES = tuple(s for s in ("tests/unit", "tests/kvm", "tests/fuzz")
                    if (repo_root() / s).is_dir())
"""No kernel boots: encoders, parsers, caches, tiny guests through /dev/kvm, fuzzers.
Only the suites this checkout has: pytest fails on a path that does not exist."""
SANDBOX_SUITE = "tests/sandbox"
"""Starts the emulated KVM host itself (only meaningful where KVM is unusable)."""


def tests(session: nox.Session) -> None:
    """Unit and tiny-guest tests, then the VM smoke tests on the default kernel.

    posargs go to the unit-test pytest run. The VM part builds (or reuses) the
    default kernel and its schedulers on the host first, then runs the `smoke`
    VM tests in one sandbox where KVM cannot boot a kernel here.
    """
    vm.install(session)
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "-ra",
                *UNIT_SUITES, *session.posargs)
    default, _ids = vm.catalog()
    vm.prepare(session, default)
    native = vm.kvm_usable(session)
    if not native:
        # Built here, with its progress shown, rather than inside the first sandbox test.
        session.run("python", "-m", "ktstr", "kernel", "build", default, "--flavour", "sandbox")
        session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "-ra", SANDBOX_SUITE)
    argv = vm.pytest_argv(default, None, 1, ["-m", "smoke", vm.SUITE])
    session.run(*(argv if native else vm.sandboxed(argv)),
                env={"KTSTR_RUN_ID": vm.run_id(default, "smoke")})


def lint(session: nox.Session) -> None:
    vm.install(session)
    session.run("ruff", "check", "ktstr", "tests", "noxfile.py", "benchmarks")
    session.run("mypy")
