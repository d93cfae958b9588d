"""The kernel cache: keys, entries, checksums, atomic installs.

Layout under `<cache_root>/kernels/`:

    <key>/                 one entry: bzImage vmlinux .config System.map
                           metadata.json [schedulers/]
    .locks/<key>.lock      fcntl lock held while <key> is built
    .tmp-<key>-*           an install in progress (renamed to <key> when complete)

An entry directory appears only by `rename` of a complete, fsynced temporary
directory, so a reader sees a whole entry or none. Each use re-checks the
checksums recorded at install; vmlinux (~130 MB with debug info) is checked by
size, mtime and the sha256 of its first and last MiB, which keeps a warm hit
far below a second while still catching truncation and overwrites.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktstr.errors import KtstrError

FORMAT = 1
ARTIFACTS = {  # name in entry -> path in the build tree (relative to O=)
    "bzImage": "arch/x86/boot/bzImage",
    "vmlinux": "vmlinux",
    ".config": ".config",
    "System.map": "System.map",
}
STAMPED = frozenset({"vmlinux"})  # too big to hash on every use
EDGE = 1 << 20


@dataclass(frozen=True)
class KernelEntry:
    id: str
    flavour: str
    key: str
    version: str
    path: Path
    bzimage: Path
    vmlinux: Path
    config: Path
    system_map: Path
    features: dict[str, bool] = field(default_factory=dict)
    schedulers: dict[str, Path] = field(default_factory=dict)

    @property
    def sched_ext(self) -> bool:
        return bool(self.features.get("sched_ext"))


class CorruptEntry(Exception):
    """An entry whose files do not match its metadata (reason in the message)."""


def make_key(kernel_id: str, flavour: str, base: str, source_digest: str,
             fragment_digest: str) -> str:
    """Readable prefix for `ls`, hash of everything that changes the build."""
    ident = json.dumps({"format": FORMAT, "id": kernel_id, "flavour": flavour, "base": base,
                        "source": source_digest, "fragments": fragment_digest}, sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    safe_id = "".join(c if c.isalnum() or c in ".-_" else "_" for c in kernel_id)
    return f"{safe_id}-{flavour}-{base}-{digest}"


def kernels_dir(root: Path) -> Path:
    return root / "kernels"


def lock_path(root: Path, key: str) -> Path:
    return kernels_dir(root) / ".locks" / f"{key}.lock"


# --------------------------------------------------------------------------- checksums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _edge_sha256(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(EDGE))
        if size > EDGE:
            fh.seek(max(EDGE, size - EDGE))
            digest.update(fh.read(EDGE))
    return digest.hexdigest()


def describe_file(path: Path, *, stamped: bool) -> dict[str, object]:
    st = path.stat()
    info: dict[str, object] = {"size": st.st_size, "sha256": _sha256(path)}
    if stamped:
        info["mtime_ns"] = st.st_mtime_ns
        info["edge_sha256"] = _edge_sha256(path)
    return info


def check_file(path: Path, info: dict[str, object], *, stamped: bool) -> str | None:
    """None if `path` matches `info`, else why not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path.name} is missing"
    if st.st_size != info.get("size"):
        return f"{path.name} has {st.st_size} bytes, expected {info.get('size')}"
    if stamped:
        if st.st_mtime_ns != info.get("mtime_ns"):
            return f"{path.name} was modified after install"
        if _edge_sha256(path) != info.get("edge_sha256"):
            return f"{path.name} content changed"
    elif _sha256(path) != info.get("sha256"):
        return f"{path.name} sha256 mismatch"
    return None


# --------------------------------------------------------------------------- load


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "metadata.json").read_text())
    except FileNotFoundError:
        raise CorruptEntry("metadata.json is missing") from None
    except (OSError, ValueError) as err:
        raise CorruptEntry(f"metadata.json is unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptEntry("metadata.json has an unknown format")
    return meta


def entry_from_metadata(path: Path, meta: dict[str, Any]) -> KernelEntry:
    scheds = meta.get("schedulers") or {}
    assert isinstance(scheds, dict)
    features = meta.get("features") or {}
    assert isinstance(features, dict)
    return KernelEntry(
        id=str(meta["id"]), flavour=str(meta["flavour"]), key=str(meta["key"]),
        version=str(meta["version"]), path=path,
        bzimage=path / "bzImage", vmlinux=path / "vmlinux", config=path / ".config",
        system_map=path / "System.map",
        features={str(k): bool(v) for k, v in features.items()},
        schedulers={name: path / str(info["path"]) for name, info in scheds.items()},
    )


def load_entry(path: Path, *, verify: bool = True) -> KernelEntry:
    """The entry at `path`; with verify, raise CorruptEntry if any file changed."""
    meta = read_metadata(path)
    if verify:
        artifacts = meta.get("artifacts")
        if not isinstance(artifacts, dict) or set(artifacts) != set(ARTIFACTS):
            raise CorruptEntry("metadata.json lists the wrong artifacts")
        for name, info in artifacts.items():
            if problem := check_file(path / name, info, stamped=name in STAMPED):
                raise CorruptEntry(problem)
        for name, info in (meta.get("schedulers") or {}).items():
            if problem := check_file(path / info["path"], info, stamped=False):
                raise CorruptEntry(f"scheduler {name}: {problem}")
    return entry_from_metadata(path, meta)


# --------------------------------------------------------------------------- install


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    shutil.copymode(src, dst)
    _fsync_path(dst)


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def discard(path: Path) -> None:
    """Remove an entry (or leftover) so no reader sees it half-deleted."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def install_entry(root: Path, key: str, files: dict[str, Path],
                  metadata: dict[str, object]) -> KernelEntry:
    """Copy `files` (entry name -> source path) into a new entry, atomically.

    The caller holds the key's lock. On any exception, including
    KeyboardInterrupt, the temporary directory is removed and no entry exists.
    """
    base = kernels_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=base))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the kernel from other users
        artifacts: dict[str, object] = {}
        for name, src in files.items():
            _copy_synced(src, tmp / name)
            artifacts[name] = describe_file(tmp / name, stamped=name in STAMPED)
        meta = dict(metadata, format=FORMAT, key=key, artifacts=artifacts)
        meta.setdefault("schedulers", {})
        write_json_atomic(tmp / "metadata.json", meta)
        _fsync_path(tmp)
        final = base / key
        discard(final)
        os.rename(tmp, final)
        _fsync_path(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_entry(final, verify=False)


def install_schedulers(entry: KernelEntry, binaries: dict[str, Path]) -> KernelEntry:
    """Add scheduler binaries to an existing entry (caller holds the key's lock)."""
    tmp = Path(tempfile.mkdtemp(prefix=".schedulers-tmp-", dir=entry.path))
    try:
        tmp.chmod(0o755)
        records: dict[str, object] = {}
        for name, src in sorted(binaries.items()):
            _copy_synced(src, tmp / name)
            info = describe_file(tmp / name, stamped=False)
            info["path"] = f"schedulers/{name}"
            records[name] = info
        _fsync_path(tmp)
        final = entry.path / "schedulers"
        discard(final)
        os.rename(tmp, final)
        _fsync_path(entry.path)
        meta = read_metadata(entry.path)
        meta["schedulers"] = records
        write_json_atomic(entry.path / "metadata.json", meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_entry(entry.path, verify=False)


def remove_leftovers(root: Path, key: str) -> None:
    """Temporary dirs of `key` from a killed install (caller holds the key's lock)."""
    base = kernels_dir(root)
    for leftover in base.glob(f".tmp-{key}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------- list, clean


def list_entries(root: Path) -> list[KernelEntry]:
    """Installed entries, newest first (metadata only: listing does not hash)."""
    base = kernels_dir(root)
    found: list[tuple[float, KernelEntry]] = []
    if base.is_dir():
        for path in base.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                meta = read_metadata(path)
                found.append((float(meta.get("built_at", 0)), entry_from_metadata(path, meta)))
            except (CorruptEntry, KeyError, AssertionError):
                continue
    return [entry for _, entry in sorted(found, key=lambda item: -item[0])]


def clean(root: Path, keep: int = 0) -> list[Path]:
    """Remove all but the `keep` newest entries, their build trees and leftovers.

    Entries being built (lock held) are skipped.
    """
    from ktstr.kernel.locks import file_lock

    if keep < 0:
        raise KtstrError(f"--keep must be >= 0, got {keep}")
    base = kernels_dir(root)
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    entries = list_entries(root)
    doomed = {e.key for e in entries[keep:]}
    kept = {e.key for e in entries[:keep]}
    for path in sorted(base.iterdir()):
        if path.name == ".locks" or not path.is_dir():
            continue
        key = path.name
        if key.startswith((".tmp-", ".trash-", ".")):
            key = ""
        elif key in kept:
            continue
        elif key not in doomed:
            doomed.add(key)  # unreadable metadata: an unusable entry
        lock = lock_path(root, key) if key else base / ".locks" / ".leftovers.lock"
        with file_lock(lock, blocking=False) as held:
            if not held:
                print(f"ktstr: skipping {path.name}: being built", file=sys.stderr)
                continue
            if not key and path.name.startswith(".tmp-"):
                # A leftover of a key whose builder is alive must stay.
                owner = path.name[len(".tmp-"):].rsplit("-", 1)[0]
                with file_lock(lock_path(root, owner), blocking=False) as free:
                    if not free:
                        continue
                    shutil.rmtree(path, ignore_errors=True)
            else:
                discard(path) if key else shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    builds = root / "build"
    if builds.is_dir():
        for tree in sorted(builds.iterdir()):
            if tree.name in kept:
                continue
            with file_lock(lock_path(root, tree.name), blocking=False) as held:
                if held:
                    shutil.rmtree(tree, ignore_errors=True)
                    removed.append(tree)
    return removed
