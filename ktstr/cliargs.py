"""Command-line options shared by every command that boots a VM (one definition each)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_vm_arguments(parser: argparse.ArgumentParser) -> None:
    """--kernel, --topology, --memory-mb, --console and --sandbox."""
    parser.add_argument("--kernel", required=True,
                        help="catalog id or path to a bzImage / build tree")
    parser.add_argument("--topology", default="1n1l2c1t",
                        help="label like 1n2l4c2t or a preset name")
    parser.add_argument("--memory-mb", type=int, default=2048, help="guest memory (default 2048)")
    parser.add_argument("--console", action="store_true", help="stream the guest console to stderr")
    parser.add_argument("--sandbox", default="auto", choices=("auto", "always", "never"),
                        help="run inside the emulated KVM host: where KVM is unusable (auto), "
                        "always, or never")


def _to_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def console_stream(enabled: bool) -> Callable[[bytes], None] | None:
    """The ``on_console`` callback of a VM command's ``--console``: guest bytes to stderr."""
    return _to_stderr if enabled else None
