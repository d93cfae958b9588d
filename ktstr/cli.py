"""The `ktstr` command line: one parser, subcommands registered by their modules.

Each feature module exposes ``register(subparsers)`` that adds its
subcommands with ``set_defaults(func=...)``; a handler returns the exit code.
A :class:`~ktstr.errors.KtstrError` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ktstr.errors import KtstrError

# Modules that contribute subcommands, in help order.
COMMAND_MODULES = (
    "ktstr.kernel.cli",
    "ktstr.results.cli",
    "ktstr.sandbox.cli",
    "ktstr.vmm.cli",
    "ktstr.shell",
    "ktstr.scenario.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktstr", description="Test harness for Linux process schedulers."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KtstrError as err:
        print(f"ktstr: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("ktstr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
