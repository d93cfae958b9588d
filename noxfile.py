"""Nox sessions for ktstr. Declarations only: the logic lives in ktstr.sessions."""

from __future__ import annotations

import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent))

from ktstr.sessions import checks  # noqa: E402

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
