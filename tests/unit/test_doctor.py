"""`ktstr doctor` on this host: a tool hidden from PATH is named with its package; a host
with everything exits 0; each check reports a real bad setting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktstr import doctor, tools
from ktstr.errors import KtstrError
from ktstr.paths import repo_root
from ktstr.sessions import system

HIDDEN = "ld.lld-19"
DISK_CACHE_ENV = "KTSTR_DISK_CACHE_DIR"


def path_without(tmp_path: Path, name: str) -> str:
    """PATH with /usr/bin (and /bin, its usrmerge alias) replaced by symlinks to all but
    `name`."""
    shadow = tmp_path / "usr-bin"
    shadow.mkdir()
    for entry in os.scandir("/usr/bin"):
        if entry.name != name:
            (shadow / entry.name).symlink_to(entry.path)
    usr_bin = os.path.realpath("/usr/bin")
    dirs = [str(shadow) if os.path.realpath(d) == usr_bin else d
            for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    if str(shadow) not in dirs:
        dirs.append(str(shadow))
    path = os.pathsep.join(dict.fromkeys(dirs))
    assert shutil.which(name, path=tools.search_path(path)) is None, f"{name} still on {path}"
    return path


def run_doctor(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != DISK_CACHE_ENV}
    base["KTSTR_CACHE_DIR"] = str(tmp_path / "cache")  # never the user's cache
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ktstr", "doctor", *args],
                          env={**base, **env}, cwd=repo_root(), capture_output=True, text=True,
                          timeout=60, check=False)
    assert time.monotonic() - start < 20, "the doctor must finish in seconds"
    return proc


def test_a_tool_missing_from_path_is_named_with_its_package(tmp_path: Path) -> None:
    proc = run_doctor(tmp_path, PATH=path_without(tmp_path, HIDDEN))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    [missing] = [line for line in lines if line.startswith("missing: ")]
    assert missing.startswith(f"missing: {HIDDEN} (install: apt-get install lld-19)"), lines
    assert lines[-1] == "doctor: 1 problem(s)"


def test_json_names_the_tool_and_package(tmp_path: Path) -> None:
    proc = run_doctor(tmp_path, "--json", PATH=path_without(tmp_path, HIDDEN))
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is False
    missing = [f for f in out["findings"] if f["level"] == "problem" and f["topic"] == "missing"]
    assert [(f["tool"], f["package"]) for f in missing] == [(HIDDEN, "lld-19")]


def test_all_good_host_exits_zero(tmp_path: Path) -> None:
    proc = run_doctor(tmp_path, "--json")
    out = json.loads(proc.stdout)
    bad = [f"{f['topic']}: {f['message']}" for f in out["findings"] if f["level"] == "problem"]
    assert (proc.returncode == 0) == (not bad) == out["ok"], proc.stdout
    if bad:
        pytest.skip("this host lacks: " + " | ".join(bad))
    ok_topics = {f["topic"] for f in out["findings"] if f["level"] == "ok"}
    assert {"kvm", "tools", "packages", "cache", "disk", "memory"} <= ok_topics
    text = run_doctor(tmp_path)
    assert text.returncode == 0
    assert text.stdout.splitlines()[-1] == "ok: this host is ready"


def test_sessions_fail_with_the_doctors_lines(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    system.check_tools()  # everything is here
    monkeypatch.setenv("PATH", path_without(tmp_path, HIDDEN))
    with pytest.raises(KtstrError) as exc:
        system.check_tools()
    assert f"missing: {HIDDEN} (install: apt-get install lld-19)" in str(exc.value)


def test_cache_that_is_a_file_is_a_problem(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "file"))
    [finding] = doctor.check_cache()
    assert finding.level is doctor.Level.PROBLEM and "not a directory" in finding.message
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "new" / "cache"))
    [finding] = doctor.check_cache()
    assert finding.level is doctor.Level.OK and "will be created" in finding.message
    assert not (tmp_path / "new").exists()  # the doctor creates nothing


def test_sandbox_memory_beyond_the_host_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTSTR_SANDBOX_MEMORY_MB", str(1 << 30))
    [finding] = doctor.check_memory(sandbox=True)
    assert finding.level is doctor.Level.PROBLEM
    assert f"the sandbox wants {1 << 30} MB" in finding.message
    monkeypatch.setenv("KTSTR_SANDBOX_MEMORY_MB", "lots")
    [finding] = doctor.check_memory(sandbox=True)
    assert finding.level is doctor.Level.PROBLEM and "KTSTR_SANDBOX_MEMORY_MB" in finding.message


def test_disk_free_space_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path))
    [finding] = doctor.check_disk()
    free_gb = shutil.disk_usage(tmp_path).free / doctor.GB
    expected = (doctor.Level.PROBLEM if free_gb < doctor.MIN_FREE_GB else
                doctor.Level.WARNING if free_gb < doctor.WARN_FREE_GB else doctor.Level.OK)
    assert finding.level is expected and str(tmp_path) in finding.message


@pytest.fixture
def btrfs_dir(tmp_path: Path) -> Iterator[Path]:
    from ktstr.disks.template import loop_btrfs

    if os.geteuid() != 0:
        pytest.fail("needs root (losetup, mount)")
    with loop_btrfs(tmp_path) as mnt:
        yield mnt


def test_disk_cache_without_reflink_is_a_problem(tmp_path: Path) -> None:
    from ktstr.disks.template import fs_type

    if fs_type(tmp_path) in ("btrfs", "xfs"):  # ext4 on our machines
        pytest.skip(f"{tmp_path} is on {fs_type(tmp_path)}, which can reflink")
    proc = run_doctor(tmp_path, **{DISK_CACHE_ENV: str(tmp_path / "disks")})
    assert proc.returncode == 1
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("reflink: ")]
    assert "cannot reflink" in line and DISK_CACHE_ENV in line


def test_disk_cache_on_btrfs_passes(tmp_path: Path, btrfs_dir: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISK_CACHE_ENV, str(btrfs_dir / "disks"))
    [finding] = doctor.check_reflink()
    assert finding.level is doctor.Level.OK and "(btrfs) can reflink" in finding.message
    monkeypatch.delenv(DISK_CACHE_ENV)
    assert doctor.check_reflink() == []
