"""Nox sessions for ktstr. Declarations only: the logic lives in ktstr.sessions."""

from __future__ import annotations

import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent))

from ktstr.sessions import checks, kernels, vm
from ktstr.sessions import selftests as kselftests

nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = True
# No default selection: `nox -l --json` lists every session (it is the CI matrix source).
# Name a session to run one: `nox -s tests`, `nox -s vm_tests`.


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests (no VM), then the VM smoke tests (through the sandbox where KVM is unusable)."""
    checks.tests(session)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    checks.lint(session)


# `nox -s build_kernel` builds only the catalog default (posargs: --source PATH,
# --flavour sandbox, --defconfig). nox selects every parametrization of a
# session by its bare name, so the per-id sessions are declared by name instead
# of @nox.parametrize: they read the same, `nox -s "build_kernel(kernel='6.1')"`.
@nox.session
def build_kernel(session: nox.Session) -> None:
    """Build (or reuse) the default test kernel and its sched_ext schedulers."""
    kernels.build_kernel(session)


for _kernel_id in kernels.catalog_ids():
    nox.session(name=f"build_kernel(kernel='{_kernel_id}')")(kernels.build_kernel_for(_kernel_id))


@nox.session
def build_schedulers(session: nox.Session) -> None:
    """Build the sched_ext example schedulers for a cached kernel (posargs: ID, --flavour)."""
    kernels.build_schedulers(session)


# `nox -s vm_tests` runs the default kernel x every scheduler (the parametrized
# session); the other catalog kernels' combinations are named sessions, e.g.
# `nox -s "vm_tests(kernel='6.1', scheduler='eevdf')"`, and need
# KTSTR_VM_KERNELS=6.1 (or all). Combinations that cannot work skip with the reason.
_VM_DEFAULT, _VM_KERNELS = vm.catalog()


@nox.session
@nox.parametrize(
    ("kernel", "scheduler"),
    [nox.param(k, s, id=f"kernel='{k}', scheduler='{s}'")
     for k, s in vm.combinations([_VM_DEFAULT])],
)
def vm_tests(session: nox.Session, kernel: str, scheduler: str) -> None:
    """VM test suite for one kernel x scheduler (through the sandbox where KVM is unusable)."""
    vm.vm_tests(session, kernel, scheduler)


for _k, _s in vm.combinations([k for k in _VM_KERNELS if k != _VM_DEFAULT]):
    nox.session(name=vm.session_name(_k, _s))(vm.vm_tests_for(_k, _s))


@nox.session
def vm_catalog(session: nox.Session) -> None:
    """Every catalog scenario as a VM test (through the sandbox where KVM is unusable)."""
    vm.vm_catalog(session)


@nox.session
def gauntlet(session: nox.Session) -> None:
    """Suite x topology presets x flag profiles; `-- --budget SECONDS` picks a covering subset."""
    vm.gauntlet(session)


@nox.session
def selftests(session: nox.Session) -> None:
    """The kernel's sched_ext selftests in a VM; posargs go to `ktstr selftests`."""
    kselftests.selftests(session)
