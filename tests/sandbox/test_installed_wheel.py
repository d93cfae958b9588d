"""The README's "Test your own scheduler" walkthrough, booting a VM for real.

ktstr is installed from its wheel into a venv inside the user's own repository
(outside this checkout, not a git tree), the README's test file is the user's
`tests/`, and the README's sandbox command runs it with the user's binary as the
scheduler under test (the cached scx_simple, copied to `build/scx_mine`). Only the
kernel cache is shared with this checkout's runs: it holds the kernels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from wheelbuild import BuiltWheel, checked, make_venv, readme_test_file, user_env

from ktstr.kernel import ensure_kernel
from ktstr.kernel.catalog import load_catalog
from ktstr.sandbox.kernel import sandbox_kernel

pytestmark = pytest.mark.sandbox

RUN_TIMEOUT_S = 900


def test_readme_walkthrough_runs_a_vm_test_from_the_installed_wheel(
        ktstr_wheel: BuiltWheel, tmp_path: Path) -> None:
    default = load_catalog().default
    entry = ensure_kernel(default, flavour="test")   # from the cache (built on a cold one)
    sandbox_kernel()   # built here, not inside the user's first sandbox run
    repo = tmp_path / "my-scheduler"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_mine.py").write_text(readme_test_file())
    (repo / "build").mkdir()
    shutil.copy2(entry.schedulers["scx_simple"], repo / "build" / "scx_mine")
    venv = repo / ".venv"
    make_venv(venv)
    # The kernel cache is the only setting shared with this run; no checkout venv leaks in.
    env = user_env(keep=("KTSTR_CACHE_DIR",))
    env.pop("VIRTUAL_ENV", None)

    def run(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True,
                              check=False, timeout=timeout)

    checked(run(str(venv / "bin" / "pip"), "install", "-q", str(ktstr_wheel.wheel), "pytest"))
    listed = checked(run(".venv/bin/ktstr", "kernel", "list", "--json")).stdout
    assert entry.key in {json.loads(line)["key"] for line in listed.splitlines()}, listed

    # The README's command, as written there.
    proc = run(".venv/bin/ktstr", "sandbox", "run", "--retries", "2", "--",
               ".venv/bin/python", "-m", "pytest",
               "tests", "--ktstr-scheduler", "./build/scx_mine", timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "1 passed" in proc.stdout, proc.stdout[-2000:]
    (sidecar,) = (repo / "ktstr-results").glob("*/*.json")
    record = json.loads(sidecar.read_text())
    assert record["verdict"] == "pass", record.get("reason")
    assert "scx_mine" in json.dumps(record.get("scheduler")), record.get("scheduler")
    assert record["summary"]["work_units.min"] > 0
    package = checked(run(".venv/bin/python", "-c", "import ktstr; print(ktstr.__file__)"))
    assert Path(package.stdout.strip()).is_relative_to(venv)
