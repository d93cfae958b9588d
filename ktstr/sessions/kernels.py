"""The `build_kernel` and `build_schedulers` nox sessions.

Each session installs ktstr into its venv and runs `python -m ktstr kernel ...`
so the build's progress bar reaches the terminal and the cache logic is the
same one tests use.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable

import nox

from ktstr.paths import kernels_dir
from ktstr.sessions import system


def catalog_ids() -> list[str]:
    """Catalog ids, default first (read with tomllib: nox's Python has no ktstr deps)."""
    data = tomllib.loads((kernels_dir() / "versions.toml").read_text())
    ids = list(data.get("kernels", {}))
    default = data.get("default")
    return sorted(ids, key=lambda kid: kid != default)


def _install(session: nox.Session) -> None:
    system.prepare_host(session)
    session.install("-e", ".")


def build_kernel(session: nox.Session, kernel: str | None = None) -> None:
    """Build (or reuse) a kernel; posargs go to `ktstr kernel build`.

    `nox -s build_kernel` builds the catalog default; `-- --source PATH`,
    `-- --flavour sandbox` or `-- 6.1` choose otherwise.
    """
    _install(session)
    args = [kernel] if kernel else []
    session.run("python", "-m", "ktstr", "kernel", "build", *args, *session.posargs)


def build_kernel_for(kernel: str) -> Callable[[nox.Session], None]:
    def session_func(session: nox.Session) -> None:
        build_kernel(session, kernel)

    session_func.__doc__ = f"Build (or reuse) the {kernel} test kernel."
    return session_func


def build_schedulers(session: nox.Session) -> None:
    """Build the sched_ext example schedulers for a kernel (default: the catalog default)."""
    _install(session)
    session.run("python", "-m", "ktstr", "kernel", "schedulers", *session.posargs)
