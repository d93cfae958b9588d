"""pyenv shims are resolved on the host, exactly as `pyenv exec` would."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ktstr.sandbox.shims import resolve_shim


def test_plain_programs_are_untouched(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    argv, out_env = resolve_shim(["sh", "-c", "true"], env, tmp_path)
    assert argv == ["sh", "-c", "true"] and out_env == env
    assert resolve_shim(["no-such-program-x"], env, tmp_path)[0] == ["no-such-program-x"]


def test_a_script_in_a_shims_dir_without_pyenv_is_untouched(tmp_path: Path) -> None:
    shims = tmp_path / "shims"
    shims.mkdir()
    tool = shims / "tool"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    argv, _ = resolve_shim(["tool"], {"PATH": str(shims)}, tmp_path)
    assert argv == ["tool"]


@pytest.mark.skipif(not (shutil.which("python3") or "").endswith("/shims/python3"),
                    reason="python3 is not a pyenv shim here")
def test_pyenv_shim_resolves_to_the_same_interpreter(tmp_path: Path) -> None:
    env = dict(os.environ)
    argv, out_env = resolve_shim(["python3", "-c", "pass"], env, tmp_path)
    expected = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"],
                              env=env, cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.strip()
    assert argv[1:] == ["-c", "pass"]
    assert os.path.realpath(argv[0]) == os.path.realpath(expected)
    assert out_env["PATH"].split(os.pathsep)[0] == str(Path(argv[0]).parent)
