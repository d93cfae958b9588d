"""The wheel: `pip install .` gives a `ktstr` that works outside a checkout.

Built from a copy of exactly what the build reads (so a file the build needs
but does not declare fails here, and the checkout's own ``build/`` can leave
nothing stale in the wheel), installed into a fresh venv, and run from a
directory that is not the repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from wheelbuild import WHEEL_TIMEOUT_S as TIMEOUT_S
from wheelbuild import BuiltWheel, checked, make_venv, readme_test_file, user_env

import ktstr
from ktstr.kernel.catalog import load_catalog
from ktstr.paths import repo_root
from ktstr.scenario import catalog

ROOT = repo_root()


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    source: Path
    outside: Path
    """A directory outside any checkout: the commands run from here."""

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self) -> dict[str, str]:
        return {**user_env(), "KTSTR_CACHE_DIR": str(self.outside / "cache"),
                "KTSTR_RESULTS_DIR": str(self.outside / "results")}

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv], cwd=self.outside, env=self.env(), capture_output=True,
                              text=True, check=False, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, ktstr_wheel: BuiltWheel) -> Installed:
    tmp = tmp_path_factory.mktemp("packaging")
    venv = tmp / "venv"
    make_venv(venv)
    outside = tmp / "elsewhere"
    outside.mkdir()
    inst = Installed(wheel=ktstr_wheel.wheel, venv=venv, source=ktstr_wheel.source,
                     outside=outside)
    # With its dependencies, as a user would: the wheel's declared requirements must suffice.
    checked(inst.run(inst.bin("pip"), "install", "-q", str(inst.wheel)))
    return inst


def test_wheel_holds_every_module_and_data_file(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    src = installed.source
    modules = {p.relative_to(src).as_posix() for p in (src / "ktstr").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel"
    kernels = {f"ktstr/_kernels/{p.name}" for p in (src / "kernels").iterdir()}
    assert kernels and kernels - names == set(), "kernels/ files missing from the wheel"
    assert "ktstr/sessions/debian-packages.txt" in names
    assert "ktstr/py.typed" in names


def test_installed_ktstr_reads_its_data_from_the_package(installed: Installed) -> None:
    probe = (
        "import json, ktstr\n"
        "from ktstr.paths import kernels_dir\n"
        "from ktstr.kernel.catalog import fragments_dir, load_catalog\n"
        "from ktstr.sessions.system import required_packages\n"
        "print(json.dumps({'package': ktstr.__file__, 'kernels': str(kernels_dir()),\n"
        "                  'fragments': str(fragments_dir()), 'default': load_catalog().default,\n"
        "                  'packages': required_packages()}))\n"
    )
    out = json.loads(checked(installed.run(installed.bin("python"), "-c", probe)).stdout)
    package = Path(out["package"]).parent
    assert package.is_relative_to(installed.venv), out  # not the checkout's ktstr
    assert Path(out["kernels"]) == package / "_kernels" == Path(out["fragments"])
    for src in (ROOT / "kernels").iterdir():
        assert (package / "_kernels" / src.name).read_bytes() == src.read_bytes(), src.name
    assert out["default"] == load_catalog().default
    assert "linux-source-6.12" in out["packages"]


def test_version(installed: Installed) -> None:
    proc = checked(installed.run(installed.bin("ktstr"), "--version"))
    assert proc.stdout.strip() == f"ktstr {ktstr.__version__}"


def test_kernel_list_on_an_empty_cache(installed: Installed) -> None:
    proc = checked(installed.run(installed.bin("ktstr"), "kernel", "list", "--json"))
    assert proc.stdout == ""  # one JSON line per entry: none
    proc = checked(installed.run(installed.bin("ktstr"), "kernel", "list"))
    assert proc.stdout == "" and "no cached kernels" in proc.stderr


def test_scenario_list(installed: Installed) -> None:
    proc = checked(installed.run(installed.bin("ktstr"), "list"))
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert listed == set(catalog.CATALOG)


def test_doctor_runs(installed: Installed) -> None:
    proc = installed.run(installed.bin("ktstr"), "doctor", "--json")
    # 1 is a finding about this host (e.g. no KVM); anything else is the command failing.
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    topics = {f["topic"] for f in report["findings"]}
    assert {"kvm", "tools", "packages"} <= topics, report


def test_editable_install_reads_the_checkout(installed: Installed, tmp_path: Path) -> None:
    """The same lookup in a dev checkout: `pip install -e` reads the top-level kernels/."""
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    make_venv(venv, "--without-pip")
    checked(installed.run(sys.executable, "-m", "pip", "--python", python, "install", "-q",
                         "--no-deps", "-e", str(installed.source)))
    probe = "from ktstr.paths import kernels_dir; print(kernels_dir())"
    out = checked(installed.run(python, "-c", probe)).stdout.strip()
    assert Path(out) == installed.source / "kernels"


def test_readme_walkthrough_collects_with_the_installed_plugin(installed: Installed) -> None:
    repo = installed.outside / "my-scheduler"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_mine.py").write_text(readme_test_file())
    (repo / "build").mkdir()
    binary = repo / "build" / "scx_mine"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    checked(installed.run(installed.bin("pip"), "install", "-q", "pytest"))
    specs = repo / "specs.json"
    proc = subprocess.run(
        [installed.bin("python"), "-m", "pytest", "tests", "--ktstr-scheduler",
         "./build/scx_mine", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--ktstr-dump-specs", str(specs)],
        cwd=repo, env=installed.env(), capture_output=True, text=True, check=False,
        timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (spec,) = json.loads(specs.read_text())
    assert (spec["name"], spec["topology"]) == ("test_llcs_share_fairly", "1n2l2c1t"), spec
