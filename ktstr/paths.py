"""Where ktstr keeps its cache: one resolution rule for every component."""

from __future__ import annotations

import os
from pathlib import Path


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
    """The checkout (or installed tree) that holds `kernels/`."""
    return Path(__file__).resolve().parent.parent
