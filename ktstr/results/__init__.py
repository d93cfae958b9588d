"""Test results: one JSON sidecar per VM test under ``ktstr-results/<run-id>/``.

:mod:`ktstr.results.sidecar` writes and reads sidecars, :mod:`.compare`
diffs two runs metric by metric, :mod:`.cli` is ``ktstr stats`` and
:mod:`.report` draws per-run timelines (needs the ``report`` extra).
"""

from __future__ import annotations

from ktstr.results.sidecar import (
    RESULTS_DIR_ENV,
    SCHEMA_VERSION,
    load_run,
    resolve_run,
    results_root,
    summarize_workers,
    write_sidecar,
)
from ktstr.runid import RUN_ID_ENV, new_run_id, run_id

__all__ = [
    "RESULTS_DIR_ENV",
    "RUN_ID_ENV",
    "SCHEMA_VERSION",
    "load_run",
    "new_run_id",
    "resolve_run",
    "results_root",
    "run_id",
    "summarize_workers",
    "write_sidecar",
]
