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
from ktstr.version import VersionAction

# Subcommand -> the module that registers it, in help order. Only the module of
# the command being run is imported: imports are slow where files sit on a
# network or 9p filesystem (inside the sandbox every stat is a round trip).
COMMANDS = {
    "kernel": "ktstr.kernel.cli",
    "stats": "ktstr.results.cli",
    "replay": "ktstr.results.replay",
    "sandbox": "ktstr.sandbox.cli",
    "boot": "ktstr.boot",
    "shell": "ktstr.shell",
    "selftests": "ktstr.selftests.cli",
    "list": "ktstr.scenario.cli",
    "run": "ktstr.scenario.cli",
    "doctor": "ktstr.doctor",
    "locks": "ktstr.locks",
    "verifier": "ktstr.verifier.cli",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv`` naming a known command, only that command's module loads."""
    parser = argparse.ArgumentParser(
        prog="ktstr", description="Test harness for Linux process schedulers."
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    first = next((a for a in argv or () if not a.startswith("-")), None)
    modules = [COMMANDS[first]] if first in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser(argv).parse_args(argv)
            from ktstr.reap import reap_stale_all

            reap_stale_all()  # what a SIGKILLed earlier run left, by owner pid
            return int(args.func(args) or 0)
        except KtstrError as err:
            print(f"ktstr: error: {err}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:
            print("ktstr: interrupted", file=sys.stderr)
            return 130
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not in interpreter shutdown
    except BrokenPipeError:
        # The reader left (`ktstr list | head -1`): end quietly, as a tool killed by
        # SIGPIPE would. Output still buffered goes to /dev/null, so the flush at
        # exit cannot fail again.
        import os
        import signal

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
