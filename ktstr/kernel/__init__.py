"""Kernels for ktstr: catalog, source, configure, build, cache, sched_ext schedulers.

The public API (see docs/architecture.md) is re-exported here; the modules
behind it each do one job.
"""

from __future__ import annotations

from ktstr.kernel.cache import KernelEntry
from ktstr.kernel.catalog import DEFAULT_KERNEL
from ktstr.kernel.pipeline import (
    FLAVOURS,
    ResolvedKernel,
    clean,
    ensure_kernel,
    ensure_schedulers,
    list_entries,
    release,
    resolve_kernel,
    scan_entries,
)

__all__ = [
    "DEFAULT_KERNEL",
    "FLAVOURS",
    "KernelEntry",
    "ResolvedKernel",
    "clean",
    "ensure_kernel",
    "ensure_schedulers",
    "list_entries",
    "release",
    "resolve_kernel",
    "scan_entries",
]
