"""The `tests` and `lint` sessions."""

from __future__ import annotations

import nox


def install_dev(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


def tests(session: nox.Session) -> None:
    install_dev(session)
    session.run("pytest", "tests/unit", *session.posargs)


def lint(session: nox.Session) -> None:
    install_dev(session)
    session.run("ruff", "check", "ktstr", "tests", "noxfile.py", "benchmarks")
    session.run("mypy")
