"""The version `ktstr --version` reports."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import metadata

import ktstr


def version() -> str:
    """The installed distribution's version, else the source's (a checkout run from
    PYTHONPATH has no distribution metadata)."""
    try:
        return metadata.version("ktstr")
    except metadata.PackageNotFoundError:
        return ktstr.__version__


class VersionAction(argparse.Action):
    """``--version``, looked up only when asked for: the metadata lookup scans every
    ``sys.path`` entry, a round trip per directory where ktstr runs from 9p (the sandbox)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "print ktstr's version and exit"
                 ) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()
