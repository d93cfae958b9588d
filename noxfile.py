"""Nox sessions for ktstr. Declarations only: the logic lives in ktstr.sessions."""

from __future__ import annotations

import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent))

from ktstr.sessions import checks, kernels  # noqa: E402

nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]


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
