"""Resolve a pyenv shim on the host before the command enters the sandbox.

A shim is a bash script that runs `pyenv exec`, itself a chain of bash
scripts: a few milliseconds natively, but over 9p under TCG every one of those
processes costs, ~10 s for `python -c pass`. Doing on the host what `pyenv
exec` would do inside (same cwd, same environment, so the same version) gives
the same program with the same PATH, minus the cost.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def _is_pyenv_shim(path: Path) -> bool:
    if path.parent.name != "shims":
        return False
    try:
        with path.open("rb") as f:
            head = f.read(1024)
    except OSError:
        return False
    return head.startswith(b"#!") and b"pyenv" in head and b" exec " in head


def resolve_shim(argv: Sequence[str], env: Mapping[str, str],
                 cwd: Path) -> tuple[list[str], dict[str, str]]:
    """`argv` and `env` with a leading pyenv shim replaced as `pyenv exec` would.

    Anything unexpected leaves both unchanged: the shim then simply runs inside.
    """
    argv, env = list(argv), dict(env)
    if not argv:
        return argv, env
    found = shutil.which(argv[0], path=env.get("PATH"))
    if found is None or not _is_pyenv_shim(Path(found)):
        return argv, env
    pyenv_root = env.get("PYENV_ROOT") or str(Path(found).parent.parent)
    pyenv = shutil.which("pyenv", path=env.get("PATH")) or str(Path(pyenv_root) / "bin" / "pyenv")
    try:
        out = subprocess.run([pyenv, "which", Path(argv[0]).name], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return argv, env
    real = out.stdout.strip()
    if out.returncode != 0 or not real or not os.access(real, os.X_OK):
        return argv, env
    bin_dir = str(Path(real).parent)
    # `pyenv exec` puts a non-system version's bin directory first on PATH.
    if Path(real).is_relative_to(Path(pyenv_root) / "versions"):
        env["PATH"] = os.pathsep.join(filter(None, [bin_dir, env.get("PATH")]))
    argv[0] = real
    return argv, env
