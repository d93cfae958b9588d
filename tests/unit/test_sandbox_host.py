"""Host-side sandbox plumbing that needs no VM: shares, checkout, disk cache, dispatch, CLI."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest
from owners import Child

from ktstr import reap
from ktstr.cli import main
from ktstr.errors import KtstrError
from ktstr.sandbox import dispatch
from ktstr.sandbox.diskcache import LOCK_NAME, PERSISTENT_NAME, disk_cache
from ktstr.sandbox.run import RUNDIR_KIND, checkout_dir, run_in_sandbox, writable_shares
from ktstr.sandbox.tsc import host_tsc_khz


def test_nested_shares_fold_into_their_parent(tmp_path: Path) -> None:
    co = tmp_path / "co"
    cache = co / ".cache"
    scratch = tmp_path / "run" / "share"
    for p in (cache, scratch):
        p.mkdir(parents=True)
    shares = writable_shares([co, cache], scratch)
    assert [s.host_path for s in shares] == [co, scratch]
    assert [s.tag for s in shares] == ["kt0", "kt1"]
    assert shares[1].cache == "none"            # scratch: status file must be coherent
    assert shares[0].guest_path == str(co)


def test_shares_are_ordered_parents_first(tmp_path: Path) -> None:
    scratch = tmp_path / "a"
    deep = tmp_path / "b" / "c" / "d"
    for p in (scratch, deep):
        p.mkdir(parents=True)
    shares = writable_shares([deep], scratch)
    assert [s.host_path for s in shares] == [scratch, deep]


def test_root_cannot_be_shared_writable(tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match="cannot share /"):
        writable_shares([Path("/")], tmp_path)


def test_checkout_dir(tmp_path: Path) -> None:
    sub = tmp_path / "repo" / "a" / "b"
    sub.mkdir(parents=True)
    assert checkout_dir(sub) == sub
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    assert checkout_dir(sub) == tmp_path / "repo"


def test_disk_cache_persistent_then_temporary_when_locked(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run1 = tmp_path / "run1"
    run2 = tmp_path / "run2"
    run1.mkdir()
    run2.mkdir()
    with disk_cache(cache, run1) as first:
        assert first.persistent and first.path == cache / PERSISTENT_NAME
        assert first.path.stat().st_size == 8 << 30
        assert first.path.stat().st_blocks * 512 < 64 << 20     # sparse
        with open(first.path, "rb") as f:
            f.seek(0x10040)
            assert f.read(8) == b"_BHRfS_M"                      # btrfs superblock magic
        with disk_cache(cache, run2) as second:
            assert not second.persistent and second.path.parent == run2
        # The lock is held by the first run for its whole duration.
        fd = os.open(cache / LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    inode = (cache / PERSISTENT_NAME).stat().st_ino
    with disk_cache(cache, run1) as again:
        assert again.persistent and again.path.stat().st_ino == inode   # reused, not remade
    assert not (cache / (PERSISTENT_NAME + ".partial")).exists()


def test_dispatch_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KtstrError, match="not one of"):
        dispatch("sometimes", ["true"])
    assert dispatch("never", ["true"]) is None
    monkeypatch.setenv("KTSTR_IN_SANDBOX", "1")
    assert dispatch("always", ["true"]) is None
    assert dispatch("auto", ["true"]) is None
    with pytest.raises(KtstrError, match="already inside"):
        run_in_sandbox(["true"])


def test_cli_run_without_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "run", "--"]) == 2
    assert "no command given" in capsys.readouterr().err


def test_cli_status_has_four_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["KVM", "sandbox", "sandbox kernel", "QEMU"]


def test_host_tsc_frequency_is_plausible() -> None:
    khz = host_tsc_khz()
    assert khz is not None and 100_000 < khz < 10_000_000


def test_run_dirs_of_killed_runs_are_reaped(tmp_path: Path) -> None:
    """A `ktstr sandbox run` killed outright leaves its run dir; the next run removes it."""
    script = f"from ktstr import reap\nprint(reap.mkdtemp({RUNDIR_KIND!r}))"
    with Child(script, tmp_path) as killed, Child(script, tmp_path) as alive:
        stale, kept = Path(killed.lines[0]), Path(alive.lines[0])
        killed.kill()
        assert stale.parent == tmp_path and stale.is_dir()
        assert stale.name.startswith(f"ktstr-{RUNDIR_KIND}-{killed.pid}.")
        # What run_in_sandbox does first: a run dir of its own, sweeping the place.
        mine = reap.mkdtemp(RUNDIR_KIND, tmp_path)
        assert not stale.exists()
        assert kept.is_dir() and mine.is_dir()
