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
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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


class CorruptEntry(KtstrError):
    """An entry whose metadata or files are unusable (reason in the message).

    Readers rebuild or skip such an entry; one that reaches the user is a
    one-line error like any other KtstrError.
    """


@dataclass(frozen=True)
class BadEntry:
    """An entry directory that cannot be used, and why (for `kernel list` and clean)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class FileRecord:
    """What install recorded about one file; check_file compares against it."""

    size: int
    sha256: str
    mtime_ns: int | None = None  # STAMPED files only
    edge_sha256: str | None = None  # STAMPED files only

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"size": self.size, "sha256": self.sha256}
        if self.mtime_ns is not None:
            data["mtime_ns"] = self.mtime_ns
        if self.edge_sha256 is not None:
            data["edge_sha256"] = self.edge_sha256
        return data


@dataclass(frozen=True)
class Metadata:
    """A validated metadata.json: read_metadata is the one way to get one."""

    id: str
    flavour: str
    key: str
    version: str
    built_at: float
    features: dict[str, bool]
    artifacts: dict[str, FileRecord]
    schedulers: dict[str, tuple[str, FileRecord]]  # name -> (path in the entry, record)
    source_tree: str | None
    phases: dict[str, float]
    raw: dict[str, object]  # the whole document, so a rewrite keeps its other fields


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
    """The build lock of `key` (exclusive while it is built, given schedulers or removed)."""
    return kernels_dir(root) / ".locks" / f"{key}.lock"


def use_lock_path(root: Path, key: str) -> Path:
    """The use lock of `key`: held shared by every process using the entry."""
    return kernels_dir(root) / ".locks" / f"{key}.use"


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


def describe_file(path: Path, *, stamped: bool) -> FileRecord:
    st = path.stat()
    if stamped:
        return FileRecord(st.st_size, _sha256(path), st.st_mtime_ns, _edge_sha256(path))
    return FileRecord(st.st_size, _sha256(path))


def check_file(path: Path, info: FileRecord, *, stamped: bool) -> str | None:
    """None if `path` matches `info`, else why not."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            return f"{path.name} is not a regular file"
        if st.st_size != info.size:
            return f"{path.name} has {st.st_size} bytes, expected {info.size}"
        if stamped:
            if st.st_mtime_ns != info.mtime_ns:
                return f"{path.name} was modified after install"
            if _edge_sha256(path) != info.edge_sha256:
                return f"{path.name} content changed"
        elif _sha256(path) != info.sha256:
            return f"{path.name} sha256 mismatch"
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as err:
        return f"{path.name} is unreadable: {err.strerror}"
    return None


# --------------------------------------------------------------------------- load

METADATA_LIMIT = 1 << 20  # a real one is a few KiB
_HEX = frozenset("0123456789abcdef")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def _bad(what: str, expected: str, value: object) -> CorruptEntry:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return CorruptEntry(f"metadata.json: {what} must be {expected}, not {shown}")


def _get(obj: dict[str, object], name: str, where: str) -> object:
    if name not in obj:
        raise CorruptEntry(f"metadata.json: {where}{name} is missing")
    return obj[name]


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _bad(what, "an object", value)
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(what, "a non-empty string", value)
    return value


def _count(value: object, what: str) -> int:
    if type(value) is not int:  # bool is an int subclass, not a count
        raise _bad(what, "an integer", value)
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise _bad(what, "a finite number", value)
    return float(value)


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise _bad(what, "64 lowercase hex digits", value)
    return value


def _file_record(value: object, what: str, *, stamped: bool) -> FileRecord:
    info = _object(value, what)
    size = _count(_get(info, "size", f"{what}."), f"{what}.size")
    if size < 0:
        raise _bad(f"{what}.size", "a size (>= 0)", size)
    sha = _digest(_get(info, "sha256", f"{what}."), f"{what}.sha256")
    if not stamped:
        return FileRecord(size, sha)
    return FileRecord(size, sha, _count(_get(info, "mtime_ns", f"{what}."), f"{what}.mtime_ns"),
                      _digest(_get(info, "edge_sha256", f"{what}."), f"{what}.edge_sha256"))


def _inside(rel: str) -> bool:
    """Whether `rel` names a file below the entry (no absolute path, no `..`)."""
    path = PurePosixPath(rel)
    return not path.is_absolute() and bool(path.parts) and ".." not in path.parts \
        and "\0" not in rel


def parse_metadata(doc: object, key: str) -> Metadata:
    """Validate a decoded metadata.json of the entry directory named `key`.

    Every field a reader uses is checked for its type here, once; anything
    else is a CorruptEntry naming the field, never a Python exception.
    """
    if not isinstance(doc, dict):
        raise _bad("the document", "an object", doc)
    fmt = doc.get("format")
    if type(fmt) is not int or fmt != FORMAT:
        raise CorruptEntry(f"metadata.json has an unknown format ({fmt!r}, expected {FORMAT})")
    fields = {name: _text(_get(doc, name, ""), name) for name in ("id", "flavour", "key",
                                                                 "version")}
    if fields["key"] != key:
        raise CorruptEntry(f"metadata.json: key {fields['key']!r} does not match the "
                           f"directory {key!r}")
    features: dict[str, bool] = {}
    for name, value in _object(doc.get("features", {}), "features").items():
        if type(value) is not bool:
            raise _bad(f"features.{name}", "true or false", value)
        features[name] = value
    artifacts = _object(_get(doc, "artifacts", ""), "artifacts")
    if set(artifacts) != set(ARTIFACTS):
        raise CorruptEntry(f"metadata.json lists the wrong artifacts: {sorted(artifacts)}")
    schedulers: dict[str, tuple[str, FileRecord]] = {}
    for name, value in _object(doc.get("schedulers", {}), "schedulers").items():
        if not _NAME.fullmatch(name):
            raise CorruptEntry(f"metadata.json: scheduler {name!r} is not a file name")
        what = f"schedulers.{name}"
        rel = _text(_get(_object(value, what), "path", f"{what}."), f"{what}.path")
        if not _inside(rel):
            raise CorruptEntry(f"metadata.json: {what}.path {rel!r} points outside the entry")
        schedulers[name] = (rel, _file_record(value, what, stamped=False))
    source_tree = doc.get("source_tree")
    if source_tree is not None and not isinstance(source_tree, str):
        raise _bad("source_tree", "a string", source_tree)
    phases = {name: _number(value, f"phases.{name}")
              for name, value in _object(doc.get("phases", {}), "phases").items()}
    return Metadata(
        id=fields["id"], flavour=fields["flavour"], key=fields["key"],
        version=fields["version"],
        built_at=_number(_get(doc, "built_at", ""), "built_at"),
        features=features,
        artifacts={name: _file_record(artifacts[name], f"artifacts.{name}",
                                      stamped=name in STAMPED) for name in ARTIFACTS},
        schedulers=schedulers, source_tree=source_tree, phases=phases, raw=doc,
    )


def read_metadata(path: Path) -> Metadata:
    """The validated metadata.json of the entry at `path`; CorruptEntry if unusable."""
    try:
        with (path / "metadata.json").open("rb") as fh:
            data = fh.read(METADATA_LIMIT + 1)
        if len(data) > METADATA_LIMIT:
            raise CorruptEntry(f"metadata.json is larger than {METADATA_LIMIT} bytes")
        doc = json.loads(data)
    except FileNotFoundError:
        raise CorruptEntry("metadata.json is missing") from None
    except OSError as err:
        raise CorruptEntry(f"metadata.json is unreadable: {err.strerror}") from None
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8; absurd nesting
        raise CorruptEntry(f"metadata.json is unreadable: {err}") from None
    return parse_metadata(doc, path.name)


def entry_from_metadata(path: Path, meta: Metadata) -> KernelEntry:
    return KernelEntry(
        id=meta.id, flavour=meta.flavour, key=meta.key, version=meta.version, path=path,
        bzimage=path / "bzImage", vmlinux=path / "vmlinux", config=path / ".config",
        system_map=path / "System.map", features=dict(meta.features),
        schedulers={name: path / rel for name, (rel, _) in meta.schedulers.items()},
    )


def load_entry(path: Path, *, verify: bool = True) -> KernelEntry:
    """The entry at `path`; with verify, raise CorruptEntry if any file changed."""
    meta = read_metadata(path)
    if verify:
        for name, info in meta.artifacts.items():
            if problem := check_file(path / name, info, stamped=name in STAMPED):
                raise CorruptEntry(problem)
        for name, (rel, info) in meta.schedulers.items():
            if problem := check_file(path / rel, info, stamped=False):
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
            artifacts[name] = describe_file(tmp / name, stamped=name in STAMPED).to_json()
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
            records[name] = dict(describe_file(tmp / name, stamped=False).to_json(),
                                 path=f"schedulers/{name}")
        _fsync_path(tmp)
        final = entry.path / "schedulers"
        discard(final)
        os.rename(tmp, final)
        _fsync_path(entry.path)
        write_json_atomic(entry.path / "metadata.json",
                          dict(read_metadata(entry.path).raw, schedulers=records))
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


def scan_entries(root: Path) -> tuple[list[KernelEntry], list[BadEntry]]:
    """Installed entries newest first, and the unusable ones (metadata only: no hashing)."""
    base = kernels_dir(root)
    found: list[tuple[float, KernelEntry]] = []
    bad: list[BadEntry] = []
    if base.is_dir():
        for path in sorted(base.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                meta = read_metadata(path)
            except CorruptEntry as err:
                bad.append(BadEntry(path, str(err)))
                continue
            found.append((meta.built_at, entry_from_metadata(path, meta)))
    return [entry for _, entry in sorted(found, key=lambda item: -item[0])], bad


def list_entries(root: Path) -> list[KernelEntry]:
    """Installed, readable entries, newest first (metadata only: listing does not hash)."""
    return scan_entries(root)[0]


def in_use_message(pids: list[int]) -> str:
    if not pids:
        return "in use by another process"
    return f"in use by pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"


def clean(root: Path, keep: int = 0) -> list[Path]:
    """Remove all but the `keep` newest entries, their build trees and leftovers.

    Unreadable entries are never kept. Entries being built (build lock held)
    or in use by another process (use lock held) are skipped with a note.
    """
    from ktstr.kernel.locks import exclusive_unless_shared, file_lock, lock_holders

    if keep < 0:
        raise KtstrError(f"--keep must be >= 0, got {keep}")
    base = kernels_dir(root)
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    kept = {e.key for e in list_entries(root)[:keep]}
    for path in sorted(base.iterdir()):
        if path.name == ".locks" or not path.is_dir() or path.name in kept:
            continue
        key = "" if path.name.startswith(".") else path.name  # "": a leftover
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
            elif key:
                use = use_lock_path(root, key)
                with exclusive_unless_shared(use) as unused:
                    if not unused:
                        print(f"ktstr: skipping {key}: {in_use_message(lock_holders(use))}",
                              file=sys.stderr)
                        continue
                    discard(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
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
