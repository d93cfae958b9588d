"""A run's id: one results directory, shared by every process (and sandbox attempt) of a run."""

from __future__ import annotations

import os
import re
import time

from ktstr.errors import KtstrError

RUN_ID_ENV = "KTSTR_RUN_ID"
UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")
"""Characters a run id (a directory name) and a sidecar name may not hold."""


def new_run_id(now: float | None = None) -> str:
    """A sortable timestamp id, ``YYYYmmdd-HHMMSS``."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))


def run_id() -> str:
    """This process's run id: ``$KTSTR_RUN_ID``, else a timestamp (then exported so that
    child processes such as pytest-xdist workers, or a sandbox's retries, share it)."""
    current = os.environ.get(RUN_ID_ENV)
    if not current:
        current = new_run_id()
        os.environ[RUN_ID_ENV] = current
    if UNSAFE.search(current) or current.startswith("."):
        raise KtstrError(
            f"{RUN_ID_ENV}={current!r}: use letters, digits, '.', '_', '=' or '-' only"
        )
    return current
