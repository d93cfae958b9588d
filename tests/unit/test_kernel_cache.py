"""Cache keys, atomic installs, checksums on use, listing and cleaning."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ktstr.kernel import cache
from ktstr.kernel.cache import CorruptEntry


def key(**changes: str) -> str:
    args = {"kernel_id": "6.12", "flavour": "test", "base": "tinyconfig",
            "source_digest": "a" * 64, "fragment_digest": "b" * 64}
    args.update(changes)
    return cache.make_key(**args)


def test_key_is_stable_and_readable() -> None:
    assert key() == key()
    assert key().startswith("6.12-test-tinyconfig-")


@pytest.mark.parametrize(
    "change",
    [{"kernel_id": "6.1"}, {"flavour": "sandbox"}, {"base": "defconfig"},
     {"source_digest": "c" * 64}, {"fragment_digest": "d" * 64}],
)
def test_key_changes_with_every_input(change: dict[str, str]) -> None:
    assert key(**change) != key()


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "build"
    src.mkdir()
    files = {}
    for name, size in (("bzImage", 300_000), ("vmlinux", 3 << 20), (".config", 2000),
                       ("System.map", 5000)):
        path = src / name.strip(".")
        path.write_bytes(os.urandom(size))
        files[name] = path
    return files


def install(root: Path, files: dict[str, Path], k: str = "k1") -> cache.KernelEntry:
    meta = {"id": "6.12", "flavour": "test", "version": "6.12.0-test",
            "features": {"sched_ext": True}, "built_at": 1.0}
    return cache.install_entry(root, k, files, meta)


def test_install_then_load_verifies(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    entry = install(tmp_path / "root", artifacts)
    loaded = cache.load_entry(entry.path)
    assert loaded == entry
    assert loaded.sched_ext and loaded.version == "6.12.0-test"
    assert loaded.bzimage.read_bytes() == artifacts["bzImage"].read_bytes()
    meta = json.loads((entry.path / "metadata.json").read_text())
    assert set(meta["artifacts"]) == {"bzImage", "vmlinux", ".config", "System.map"}
    assert len(meta["artifacts"]["vmlinux"]["sha256"]) == 64
    assert [p.name for p in cache.kernels_dir(tmp_path / "root").iterdir()] == ["k1"]
    assert entry.path.stat().st_mode & 0o777 == 0o755


def test_failed_install_leaves_no_partial_entry(tmp_path: Path,
                                                artifacts: dict[str, Path]) -> None:
    root = tmp_path / "root"
    broken = dict(artifacts)
    broken["System.map"] = tmp_path / "does-not-exist"  # fails after three copies
    with pytest.raises(FileNotFoundError):
        install(root, broken)
    assert list(cache.kernels_dir(root).iterdir()) == []


def test_reinstall_replaces_the_entry(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    root = tmp_path / "root"
    install(root, artifacts)
    artifacts["bzImage"].write_bytes(b"new image")
    entry = install(root, artifacts)
    assert cache.load_entry(entry.path).bzimage.read_bytes() == b"new image"
    assert sorted(p.name for p in cache.kernels_dir(root).iterdir()) == ["k1"]


def test_truncated_bzimage_is_detected(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    entry = install(tmp_path / "root", artifacts)
    with entry.bzimage.open("r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(CorruptEntry, match="bzImage has 1000 bytes"):
        cache.load_entry(entry.path)


def test_same_size_bzimage_change_is_detected(tmp_path: Path,
                                              artifacts: dict[str, Path]) -> None:
    entry = install(tmp_path / "root", artifacts)
    data = bytearray(entry.bzimage.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.bzimage.write_bytes(bytes(data))
    with pytest.raises(CorruptEntry, match="bzImage sha256 mismatch"):
        cache.load_entry(entry.path)


def test_vmlinux_overwrite_is_detected_even_with_restored_mtime(
        tmp_path: Path, artifacts: dict[str, Path]) -> None:
    entry = install(tmp_path / "root", artifacts)
    st = entry.vmlinux.stat()
    with entry.vmlinux.open("r+b") as fh:
        fh.write(b"\0" * 64)
    os.utime(entry.vmlinux, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorruptEntry, match="vmlinux content changed"):
        cache.load_entry(entry.path)


def test_vmlinux_touch_is_detected(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    entry = install(tmp_path / "root", artifacts)
    os.utime(entry.vmlinux, ns=(0, 12345))
    with pytest.raises(CorruptEntry, match="modified after install"):
        cache.load_entry(entry.path)


def test_missing_metadata_is_corrupt(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    entry = install(tmp_path / "root", artifacts)
    (entry.path / "metadata.json").unlink()
    with pytest.raises(CorruptEntry, match=r"metadata\.json is missing"):
        cache.load_entry(entry.path)


def test_install_schedulers_records_checksums(tmp_path: Path,
                                              artifacts: dict[str, Path]) -> None:
    entry = install(tmp_path / "root", artifacts)
    binary = tmp_path / "scx_simple"
    binary.write_bytes(b"\x7fELF fake")
    binary.chmod(0o755)
    entry = cache.install_schedulers(entry, {"scx_simple": binary})
    assert entry.schedulers == {"scx_simple": entry.path / "schedulers" / "scx_simple"}
    assert os.access(entry.schedulers["scx_simple"], os.X_OK)
    assert cache.load_entry(entry.path).schedulers == entry.schedulers
    entry.schedulers["scx_simple"].write_bytes(b"\x7fELF evil")
    with pytest.raises(CorruptEntry, match="scheduler scx_simple"):
        cache.load_entry(entry.path)


def test_list_newest_first_and_clean_keep(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    root = tmp_path / "root"
    for i, k in enumerate(("old", "mid", "new")):
        meta = {"id": "6.12", "flavour": "test", "version": "v", "built_at": float(i)}
        cache.install_entry(root, k, artifacts, meta)
        (root / "build" / k).mkdir(parents=True)
    (cache.kernels_dir(root) / ".tmp-gone-abc").mkdir()  # leftover of a killed install
    assert [e.key for e in cache.list_entries(root)] == ["new", "mid", "old"]
    removed = cache.clean(root, keep=1)
    assert {p.name for p in removed} == {"mid", "old", ".tmp-gone-abc"}
    assert [e.key for e in cache.list_entries(root)] == ["new"]
    assert sorted(p.name for p in (root / "build").iterdir()) == ["new"]
    cache.clean(root, keep=0)
    assert cache.list_entries(root) == []


# --------------------------------------------------------------------------- metadata validation


def _with_scheduler(tmp_path: Path, artifacts: dict[str, Path]) -> cache.KernelEntry:
    entry = install(tmp_path / "root", artifacts)
    binary = tmp_path / "scx_simple"
    binary.write_bytes(b"\x7fELF fake")
    return cache.install_schedulers(entry, {"scx_simple": binary})


def _set(*keys: str, value: object) -> Callable[[dict[str, Any]], object]:
    def change(meta: dict[str, Any]) -> object:
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return meta
    return change


def _drop(*keys: str) -> Callable[[dict[str, Any]], object]:
    def change(meta: dict[str, Any]) -> object:
        target = meta
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
        return meta
    return change


# Each still-valid JSON document is wrong in one way; the reason names the field.
BAD_METADATA = [
    (_set("artifacts", value=5), "artifacts must be an object"),
    (_drop("id"), "id is missing"),
    (_set("schedulers", value=[]), "schedulers must be an object"),
    (_set("built_at", value="yesterday"), "built_at must be a finite number"),
    (_set("built_at", value=float("nan")), "built_at must be a finite number"),
    (_set("features", "sched_ext", value="yes"), "features.sched_ext must be true or false"),
    (_set("features", value=[]), "features must be an object"),
    (_set("artifacts", "bzImage", "sha256", value=5), "artifacts.bzImage.sha256"),
    (_set("artifacts", "bzImage", "size", value="300000"), "artifacts.bzImage.size"),
    (_set("artifacts", "bzImage", "size", value=True), "artifacts.bzImage.size"),
    (_drop("artifacts", "vmlinux", "mtime_ns"), "artifacts.vmlinux.mtime_ns is missing"),
    (_drop("artifacts", "System.map"), "wrong artifacts"),
    (_set("schedulers", "scx_simple", value="x"), "schedulers.scx_simple must be an object"),
    (_set("schedulers", "scx_simple", "path", value="../../../etc/passwd"), "outside the entry"),
    (_set("schedulers", "scx_simple", "path", value="/etc/passwd"), "outside the entry"),
    (_set("schedulers", "scx_simple", "path", value=7), "schedulers.scx_simple.path"),
    (_set("schedulers", "../x", value={}), "not a file name"),
    (_set("format", value=True), "unknown format"),
    (_set("key", value="other"), "does not match"),
    (_set("version", value=6), "version must be a non-empty string"),
    (_set("id", value=""), "id must be a non-empty string"),
    (_set("phases", value=[1]), "phases must be an object"),
    (_set("phases", value={"make": "slow"}), "phases.make must be a finite number"),
    (_set("source_tree", value=5), "source_tree must be a string"),
    (lambda meta: [meta], "must be an object"),
    (lambda meta: None, "must be an object"),
]


@pytest.mark.parametrize(("change", "reason"), BAD_METADATA,
                         ids=[f"{i}-{reason}" for i, (_, reason) in enumerate(BAD_METADATA)])
def test_wrong_types_in_metadata_are_corrupt(
        tmp_path: Path, artifacts: dict[str, Path],
        change: Callable[[dict[str, Any]], object], reason: str) -> None:
    entry = _with_scheduler(tmp_path, artifacts)
    meta_path = entry.path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(change(meta)))
    for verify in (True, False):
        with pytest.raises(CorruptEntry, match=reason):
            cache.load_entry(entry.path, verify=verify)
    root = tmp_path / "root"
    good, bad = cache.scan_entries(root)
    assert good == [] and [b.path for b in bad] == [entry.path]
    assert re.search(reason, bad[0].reason)
    assert cache.list_entries(root) == []
    assert cache.clean(root, keep=1) == [entry.path]  # a corrupt entry is never kept
    assert not entry.path.exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"[" * 100_000, "unreadable"), (b"\xff\xfe{}", "unreadable"), (b"{", "unreadable")],
    ids=["deep", "not-utf8", "truncated"],
)
def test_unparsable_metadata_is_corrupt(tmp_path: Path, artifacts: dict[str, Path],
                                        content: bytes, reason: str) -> None:
    entry = install(tmp_path / "root", artifacts)
    (entry.path / "metadata.json").write_bytes(content)
    with pytest.raises(CorruptEntry, match=reason):
        cache.load_entry(entry.path)
    assert cache.list_entries(tmp_path / "root") == []


def test_one_bad_entry_does_not_hide_the_others(tmp_path: Path,
                                                artifacts: dict[str, Path]) -> None:
    root = tmp_path / "root"
    good = install(root, artifacts, "good")
    bad = install(root, artifacts, "bad")
    meta = json.loads((bad.path / "metadata.json").read_text())
    meta["features"] = {"sched_ext": 1}
    (bad.path / "metadata.json").write_text(json.dumps(meta))
    assert cache.list_entries(root) == [good]
    assert {p.name for p in cache.clean(root, keep=1)} == {"bad"}
    assert cache.list_entries(root) == [good]


def test_no_assert_validates_in_the_kernel_package() -> None:
    # `python -O` strips asserts: a check that matters must be an if and a raise.
    import ast

    package = Path(cache.__file__).parent
    asserts = [f"{path.name}:{node.lineno}" for path in sorted(package.glob("*.py"))
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert asserts == []
