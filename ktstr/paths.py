"""Where ktstr keeps its cache, and where its data files are: one rule each for every component."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_KERNELS = "_kernels"
"""The wheel's copy of the top-level `kernels/` (setup.py maps the package `ktstr._kernels`
onto that directory), so an installed `ktstr` finds the catalog without a checkout."""


def cache_root() -> Path:
    """`$KTSTR_CACHE_DIR`, else `$XDG_CACHE_HOME/ktstr`, else `~/.cache/ktstr`."""
    explicit = os.environ.get("KTSTR_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "ktstr"
    return Path.home() / ".cache" / "ktstr"


def repo_root() -> Path:
    """The checkout holding this package (for nox sessions and tests, which run from one).

    An installed wheel has no checkout around it: data files come from :func:`kernels_dir`.
    """
    return PACKAGE_DIR.parent


def kernels_dir() -> Path:
    """The kernel catalog (`versions.toml`) and config fragments (`*.kconfig`).

    An installed wheel carries them inside the package; a checkout (editable
    install or PYTHONPATH) has only the top-level `kernels/`, which is then the
    one to read, so an edited fragment takes effect without reinstalling.
    """
    packaged = PACKAGE_DIR / PACKAGED_KERNELS
    return packaged if packaged.is_dir() else repo_root() / "kernels"
