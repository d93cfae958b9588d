"""Building ktstr's wheel and venvs to install it in (the packaging and sandbox suites)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ktstr.paths import repo_root

BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "ktstr", "kernels")
"""What the wheel's build reads; the copy it is built from holds nothing else."""
WHEEL_TIMEOUT_S = 300


@dataclass(frozen=True)
class BuiltWheel:
    wheel: Path
    source: Path
    """The copy of the checkout it was built from."""


def checked(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def user_env(keep: tuple[str, ...] = ()) -> dict[str, str]:
    """This environment without the checkout's Python and ktstr settings (but ``keep``),
    as a user's own shell would have it."""
    return {k: v for k, v in os.environ.items()
            if k in keep or not k.startswith(("PYTHON", "KTSTR_"))}


def make_venv(path: Path, *extra: str) -> Path:
    """A fresh venv at ``path``; its python."""
    checked(subprocess.run([sys.executable, "-m", "venv", *extra, str(path)],
                           capture_output=True, text=True, check=False,
                           timeout=WHEEL_TIMEOUT_S))
    return path / "bin" / "python"


def build_wheel(tmp: Path) -> BuiltWheel:
    """``pip wheel`` of a copy of exactly what the build reads, so a file the build needs
    but does not declare fails, and the checkout's own ``build/`` leaves nothing stale."""
    source = tmp / "src"
    source.mkdir()
    for name in BUILD_INPUTS:
        src = repo_root() / name
        if src.is_dir():
            shutil.copytree(src, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, source / name)
    dist = tmp / "dist"
    checked(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(dist), str(source)], capture_output=True, text=True,
                           check=False, timeout=WHEEL_TIMEOUT_S))
    (wheel,) = dist.glob("ktstr-*.whl")
    return BuiltWheel(wheel, source)


def readme_test_file() -> str:
    """The README's "Test your own scheduler" example, as the user copies it."""
    readme = (repo_root() / "README.md").read_text()
    section = readme.split("## Test your own scheduler", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block.startswith("# tests/test_mine.py\n")
    return block
