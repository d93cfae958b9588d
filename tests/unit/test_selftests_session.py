"""The `selftests` nox session's command line (the session itself boots VMs)."""

from __future__ import annotations

from ktstr.cli import build_parser
from ktstr.sessions.selftests import command, kernel_of


def test_the_kernel_comes_from_posargs_or_the_catalog_default() -> None:
    assert kernel_of([], "6.12") == "6.12"
    assert kernel_of(["-t", "minimal", "--kernel", "7.0"], "6.12") == "7.0"
    assert kernel_of(["--kernel=7.0"], "6.12") == "7.0"


def test_the_command_never_dispatches_to_the_sandbox_itself() -> None:
    argv = command(["-t", "minimal", "--sandbox", "always", "--kernel", "7.0"], "7.0")
    assert argv[:4] == ["python", "-m", "ktstr", "selftests"]
    args = build_parser(argv[3:]).parse_args(argv[3:])
    assert args.sandbox == "never" and args.kernel == "7.0" and args.tests == ["minimal"]
    args = build_parser(argv[3:]).parse_args(command([], "6.12")[3:])
    assert args.kernel == "6.12" and args.tests == [] and args.sandbox == "never"
