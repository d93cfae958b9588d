"""Test disks: what a test declares, the cached formatted templates, the per-test clones.

``config`` is the declaration (validated before any VM starts), ``template`` the
cache of formatted images built once in a VM, ``clones`` the per-run FICLONE copies
as VM devices (``device``). The declaration types are re-exported here; the heavier
modules are imported where used.
"""

from __future__ import annotations

from ktstr.disks.config import (
    DiskConfig,
    DiskThrottle,
    Filesystem,
    mount_specs,
    validate_disks,
)

__all__ = ["DiskConfig", "DiskThrottle", "Filesystem", "mount_specs", "validate_disks"]
