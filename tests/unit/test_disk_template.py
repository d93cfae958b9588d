"""Template cache, atomic install, locking and FICLONE clones on a real loop-mounted btrfs.

Needs root, losetup and mkfs.btrfs (the development and CI machines have them).
The template builder here is the host's mkfs run directly on the image: these
tests are about the cache; the template-build VM is covered by tests/vm.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from owners import Child

from ktstr.disks import DiskConfig, Filesystem, clones
from ktstr.disks import template as dt
from ktstr.errors import KtstrError

BTRFS = DiskConfig(capacity_mb=128, filesystem=Filesystem.BTRFS)


@pytest.fixture(scope="module")
def btrfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (losetup, mount)")
    with dt.loop_btrfs(tmp_path_factory.mktemp("loop")) as mnt:
        yield mnt


@pytest.fixture
def cache(btrfs_dir: Path, request: pytest.FixtureRequest) -> Path:
    d = btrfs_dir / request.node.name
    d.mkdir()
    return d


def host_mkfs(image: Path, fs: Filesystem, mkfs: Path) -> None:
    subprocess.run([str(mkfs), *dt._MKFS_ARGS[fs], str(image)], check=True, capture_output=True)


def test_reflink_refused_on_ext4(tmp_path: Path) -> None:
    assert dt.fs_type(tmp_path) != "btrfs"  # / (and /tmp) is ext4 here
    with pytest.raises(KtstrError) as exc:
        dt.verify_cache_dir_supports_reflink(tmp_path / "cache")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "KTSTR_DISK_CACHE_DIR" in msg and "KTSTR_CACHE_DIR" in msg and "btrfs" in msg
    assert not list((tmp_path / "cache").iterdir())  # the probe files are gone


def test_reflink_accepted_on_btrfs(cache: Path) -> None:
    assert dt.fs_type(cache) == "btrfs"
    assert dt.verify_cache_dir_supports_reflink(cache) == cache.resolve()
    assert not list(cache.iterdir())


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KTSTR_DISK_CACHE_DIR", str(tmp_path / "d"))
    assert dt.disk_cache_dir() == tmp_path / "d"
    monkeypatch.delenv("KTSTR_DISK_CACHE_DIR")
    monkeypatch.setenv("KTSTR_CACHE_DIR", str(tmp_path / "c"))
    assert dt.disk_cache_dir() == tmp_path / "c" / "disks"


def test_ficlone_shares_then_diverges(cache: Path) -> None:
    src, dest = cache / "src", cache / "dest"
    data = os.urandom(1 << 20)
    src.write_bytes(data)
    clones.clone_to_per_test(src, dest)
    assert dest.read_bytes() == data
    with open(dest, "r+b") as f:
        f.write(b"changed")
    assert src.read_bytes() == data  # the template is untouched
    with pytest.raises(KtstrError, match="cannot reflink"):
        clones.clone_to_per_test(src, dest)  # never overwrites


def test_locate_mkfs() -> None:
    assert dt.locate_host_mkfs(Filesystem.BTRFS).name == "mkfs.btrfs"
    with pytest.raises(KtstrError, match="apt-get install btrfs-progs"):
        dt.locate_host_mkfs(Filesystem.BTRFS, search="/nonexistent")
    with pytest.raises(KtstrError, match="e2fsprogs"):
        dt.locate_host_mkfs(Filesystem.EXT4, search="/nonexistent")
    version = dt.mkfs_version(Filesystem.BTRFS, dt.locate_host_mkfs(Filesystem.BTRFS))
    assert "btrfs-progs" in version


def test_key_depends_on_fs_capacity_and_version() -> None:
    k = dt.TemplateKey(Filesystem.BTRFS, 256, "btrfs-progs v6.2")
    assert k.name.startswith("btrfs-256M-")
    assert k.name != dt.TemplateKey(Filesystem.BTRFS, 256, "btrfs-progs v6.3").name
    assert k.name != dt.TemplateKey(Filesystem.BTRFS, 512, "btrfs-progs v6.2").name
    assert k.name != dt.TemplateKey(Filesystem.EXT4, 256, "btrfs-progs v6.2").name


def test_sparse_sha256(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with open(a, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"hello")
    dense = tmp_path / "dense"
    dense.write_bytes(a.read_bytes())  # same content, every block allocated
    assert dt.sparse_sha256(a) == dt.sparse_sha256(dense)
    empty = tmp_path / "empty"
    with open(empty, "wb") as f:
        f.truncate(64 << 20)
    assert dt.sparse_sha256(a) != dt.sparse_sha256(empty)
    with open(dense, "r+b") as f:
        f.seek(40 << 20)
        f.write(b"x")
    assert dt.sparse_sha256(a) != dt.sparse_sha256(dense)


def test_store_atomic_needs_same_directory(tmp_path: Path, cache: Path) -> None:
    tmp = tmp_path / "x.tmp"
    tmp.write_bytes(b"x")
    with pytest.raises(ValueError):
        dt.store_atomic(tmp, cache / "x.img", {})


def test_ensure_template_builds_once(cache: Path) -> None:
    calls: list[Path] = []

    def builder(image: Path, fs: Filesystem, mkfs: Path) -> None:
        calls.append(image)
        assert image.parent == cache and image.name.endswith(".tmp")
        assert image.stat().st_size == BTRFS.capacity_bytes
        host_mkfs(image, fs, mkfs)

    assert dt.cached_template(BTRFS, cache) is None
    first = dt.ensure_template(BTRFS, cache_dir=cache, builder=builder)
    second = dt.ensure_template(BTRFS, cache_dir=cache, builder=builder)
    assert first == second == dt.cached_template(BTRFS, cache)
    assert len(calls) == 1
    assert first.stat().st_size == BTRFS.capacity_bytes
    # the image is a btrfs filesystem: magic "_BHRfS_M" at 64 KiB + 0x40
    with open(first, "rb") as f:
        f.seek(0x10040)
        assert f.read(8) == b"_BHRfS_M"
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_entry_is_rebuilt(cache: Path) -> None:
    image = dt.ensure_template(BTRFS, cache_dir=cache, builder=host_mkfs)
    with open(image, "r+b") as f:
        f.seek(0x10040)
        f.write(b"garbage!")
    assert dt.cached_template(BTRFS, cache) is None
    calls = []
    dt.ensure_template(BTRFS, cache_dir=cache, builder=lambda *a: (calls.append(1), host_mkfs(*a)))
    assert calls == [1]


def test_builder_failure_leaves_no_entry(cache: Path) -> None:
    def broken(image: Path, fs: Filesystem, mkfs: Path) -> None:
        raise KtstrError("mkfs failed")

    with pytest.raises(KtstrError, match="mkfs failed"):
        dt.ensure_template(BTRFS, cache_dir=cache, builder=broken)
    assert dt.cached_template(BTRFS, cache) is None
    assert not [p for p in cache.iterdir() if p.suffix in (".img", ".tmp")]


def test_ensure_without_kernel_on_miss(cache: Path) -> None:
    with pytest.raises(KtstrError, match="no kernel was given"):
        dt.ensure_template(BTRFS, cache_dir=cache)


# --- concurrency and crashes (real processes) ---------------------------------------------

_CHILD = r"""
import sys, time
from pathlib import Path
from ktstr.disks import DiskConfig, Filesystem
from ktstr.disks import clones
from ktstr.disks import template as dt
import subprocess

cache, log, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

def builder(image, fs, mkfs):
    with open(log, "a") as f:
        f.write(f"build {image.name}\n")
    time.sleep(delay)
    subprocess.run([str(mkfs), "-f", "-q", str(image)], check=True, capture_output=True)

print(dt.ensure_template(DiskConfig(capacity_mb=128, filesystem=Filesystem.BTRFS),
                         cache_dir=cache, builder=builder))
"""


def _child(cache: Path, log: Path, delay: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(cache), str(log), str(delay)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_concurrent_builders_build_once(cache: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    procs = [_child(cache, log, 1.0) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(set(outs)) == 1 and Path(outs[0]).is_file()
    assert len(log.read_text().splitlines()) == 1


def test_killed_build_leaves_no_entry(cache: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    proc = _child(cache, log, 30.0)
    deadline = time.monotonic() + 20
    while not log.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert dt.cached_template(BTRFS, cache) is None
    debris = [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert debris  # the build was really in progress
    # The next builder takes the (released) lock, removes the debris and builds.
    image = dt.ensure_template(BTRFS, cache_dir=cache, builder=host_mkfs)
    assert image.is_file()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


# --- per-test disks -----------------------------------------------------------------------


def test_per_test_disks(cache: Path) -> None:
    configs = [BTRFS, DiskConfig(capacity_mb=64, name="raw"), BTRFS]
    with clones.per_test_disks(configs, cache_dir=cache, builder=host_mkfs) as prepared:
        paths = prepared.paths
        assert [p.stat().st_size for p in paths] == [128 << 20, 64 << 20, 128 << 20]
        template = dt.cached_template(BTRFS, cache)
        assert template is not None
        assert paths[0].parent == cache / "clones" and paths[0] != paths[2]
        assert dt.sparse_sha256(paths[0]) == dt.sparse_sha256(template)
        assert os.stat(paths[1]).st_blocks == 0  # RAW is sparse
        assert [d.index for d in prepared.devices] == [0, 1, 2]  # type: ignore[attr-defined]
        assert [m["mountpoint"] for m in prepared.mounts] == ["/mnt/disk0", "/mnt/disk2"]
    assert not any(p.exists() for p in paths)


def test_per_test_disks_refuses_ext4_cache(tmp_path: Path) -> None:
    with (
        pytest.raises(KtstrError, match="cannot reflink"),
        clones.per_test_disks([BTRFS], cache_dir=tmp_path, builder=host_mkfs),
    ):
        pass


_CLONE_CHILD = r"""
import subprocess, sys
from pathlib import Path
from ktstr.disks import DiskConfig, Filesystem
from ktstr.disks import clones
from ktstr.disks import template as dt

def builder(image, fs, mkfs):
    subprocess.run([str(mkfs), "-f", "-q", str(image)], check=True, capture_output=True)

cm = clones.per_test_disks([DiskConfig(capacity_mb=128, filesystem=Filesystem.BTRFS)],
                       cache_dir=Path(sys.argv[1]), builder=builder)
print(cm.__enter__().paths[0])
"""


def test_clones_of_a_killed_test_are_reaped(cache: Path, tmp_path: Path) -> None:
    with (Child(_CLONE_CHILD, tmp_path, str(cache)) as killed,
          Child(_CLONE_CHILD, tmp_path, str(cache)) as alive):
        stale, kept = Path(killed.lines[0]), Path(alive.lines[0])
        killed.kill()
        assert stale.parent == cache / "clones" and stale.is_file()
        with clones.per_test_disks([BTRFS], cache_dir=cache, builder=host_mkfs) as prepared:
            assert not stale.exists()
            assert kept.exists()  # its test is still running
            assert prepared.paths[0].exists()
