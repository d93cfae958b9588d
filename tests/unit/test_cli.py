"""The command line: every command registers, and running one loads only its module."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ktstr.cli import COMMANDS, build_parser, main


def test_help_lists_every_command() -> None:
    help_text = build_parser().format_help()
    for command in COMMANDS:
        assert command in help_text


def test_running_a_command_imports_only_its_module() -> None:
    code = (
        "import sys; from ktstr.cli import build_parser; build_parser(['list']); "
        "print(sorted(m for m in sys.modules if m.endswith('.cli') or m == 'ktstr.shell'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['ktstr.cli', 'ktstr.scenario.cli']"


def test_user_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such-scenario"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ktstr: error:") and "\n" not in err
