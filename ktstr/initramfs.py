"""Initramfs archives: a pure cpio "newc" writer and compressed output.

The guest boots from one or more cpio archives concatenated back to back (the
kernel unpacks each in turn, later entries overwriting earlier ones), which
lets a large, cached base archive be reused with a small per-run suffix.

Layout of an entry (``newc``, see the kernel's
Documentation/driver-api/early-userspace/buffer-format.rst): a 110-byte ASCII
header ``070701`` + 13 eight-digit hex fields, the NUL-terminated name padded
so that header+name is a multiple of 4, then the data padded to 4. The archive
ends with an entry named ``TRAILER!!!``.

The guest Python runtime (interpreter, libpython, the stdlib modules the guest
init and the test modules import, their extension modules and shared-library
closure, busybox) is packed into a *base* archive cached under
``cache_root()/initramfs/``; each run adds a tiny uncompressed suffix.

Compression (``benchmarks/initramfs.py``, base of 923 files, 30.0 MB raw, this
2-core EPYC host, median of 5):

=========  =======  ==========  ==============
format     size MB  compress s  decompress ms
=========  =======  ==========  ==============
none        29.95     0.00          0
gzip -1     11.70     0.54        159
lz4 -l -1   14.98     0.16         27
zstd -3     10.38     0.21         40
=========  =======  ==========  ==============

The kernel must unpack the cpio either way; decompression is pure extra boot
time, while copying 30 MB into guest RAM costs a few ms. Booted for real (6.12
test kernel, nested KVM in the sandbox, `sh -c true`, two rounds), guest uptime
when init ran was none 10.2/-, lz4 17.8/9.7, zstd 15.0/15.6, gzip 14.4/11.2 s:
the emulated host's noise exceeds any difference between formats. ``none`` is
the default (no decompression work anywhere); the cache holds the bigger file,
which is cheap. The cached lookup (stat of every packed file) takes ~2 ms
natively, ~1 s under the sandbox's emulation.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import json
import modulefinder
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktstr import elf, reap, tools
from ktstr.errors import KtstrError
from ktstr.paths import cache_root

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
COMPRESSIONS = ("none", "gzip", "lz4", "zstd")


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` holds the file type bits as well as permissions."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    @classmethod
    def file(cls, name: str, data: bytes, mode: int = 0o644) -> CpioEntry:
        return cls(_clean(name), stat.S_IFREG | (mode & 0o7777), data)

    @classmethod
    def directory(cls, name: str, mode: int = 0o755) -> CpioEntry:
        return cls(_clean(name), stat.S_IFDIR | (mode & 0o7777))

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(_clean(name), stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, mode: int = 0o600) -> CpioEntry:
        return cls(_clean(name), stat.S_IFCHR | (mode & 0o7777), b"", rdev_major=major,
                   rdev_minor=minor)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _clean(name: str) -> str:
    """Archive names are relative, normalised, without '..' (the kernel rejects nothing)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise KtstrError(f"initramfs: invalid member name {name!r}")
    return "/".join(parts)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _header(entry: CpioEntry, ino: int, name_bytes: bytes) -> bytes:
    nlink = 2 if entry.is_dir else 1
    fields = (
        ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, len(name_bytes) + 1, 0,
    )
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise KtstrError(f"initramfs: {entry.name!r}: field value {value} out of range")
    return NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)


def encode_entry(entry: CpioEntry, ino: int) -> bytes:
    """One entry's bytes: header, padded name, padded data."""
    name_bytes = entry.name.encode()
    head = _header(entry, ino, name_bytes) + name_bytes + b"\0"
    return b"".join((head, b"\0" * _pad4(len(head)), entry.data, b"\0" * _pad4(len(entry.data))))


def iter_newc(entries: Iterable[CpioEntry], first_ino: int = 1) -> Iterator[bytes]:
    """Chunks of a newc archive, trailer included (streaming form of :func:`encode_newc`)."""
    ino = first_ino
    for entry in entries:
        yield encode_entry(entry, ino)
        ino += 1
    trailer = CpioEntry(TRAILER, 0)
    yield encode_entry(trailer, 0)


def encode_newc(entries: Iterable[CpioEntry], first_ino: int = 1) -> bytes:
    """A complete newc archive ending with ``TRAILER!!!``.

    ``first_ino`` lets concatenated archives keep inode numbers distinct (the
    kernel only uses them to detect hard links, which we never create).
    """
    return b"".join(iter_newc(entries, first_ino))


def decode_newc(blob: bytes) -> list[CpioEntry]:
    """Parse a newc archive back into entries (stops at the trailer). For tests and tooling."""
    out: list[CpioEntry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(blob):
            raise ValueError(f"cpio: truncated header at offset {pos}")
        if blob[pos:pos + 6] != NEWC_MAGIC:
            raise ValueError(f"cpio: bad magic at offset {pos}")
        f = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, mtime, filesize = f[1], f[2], f[3], f[5], f[6]
        namesize = f[11]
        name_start = pos + HEADER_SIZE
        name = blob[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize
        data_start += _pad4(data_start)
        data = blob[data_start:data_start + filesize]
        if len(data) != filesize:
            raise ValueError(f"cpio: truncated data for {name!r}")
        pos = data_start + filesize + _pad4(filesize)
        if name == TRAILER:
            return out
        out.append(CpioEntry(name, mode, data, uid, gid, mtime, f[9], f[10]))


class Archive:
    """An ordered set of entries with parent directories created on demand.

    Adding a name twice replaces the earlier entry (last one wins, like the kernel).
    """

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return _clean(name) in self._entries

    def get(self, name: str) -> CpioEntry | None:
        return self._entries.get(_clean(name))

    @property
    def entries(self) -> list[CpioEntry]:
        return list(self._entries.values())

    def add(self, entry: CpioEntry) -> None:
        self._parents(entry.name)
        self._entries[entry.name] = entry

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = CpioEntry.directory(parent)
            elif not existing.is_dir:
                raise KtstrError(f"initramfs: {parent!r} is not a directory (needed for {name!r})")

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        if _clean(name) not in self._entries:
            self.add(CpioEntry.directory(name, mode))

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(CpioEntry.file(name, data, mode))

    def add_host_file(self, name: str, path: Path | str, mode: int | None = None) -> None:
        """Copy a host file's content (symlinks followed) with its permission bits."""
        st = os.stat(path)
        self.add_file(name, Path(path).read_bytes(), st.st_mode & 0o7777 if mode is None else mode)

    def add_symlink(self, name: str, target: str) -> None:
        self.add(CpioEntry.symlink(name, target))

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(CpioEntry.chardev(name, major, minor, mode))

    def encode(self, first_ino: int = 1) -> bytes:
        return encode_newc(self._entries.values(), first_ino)


def compress(data: bytes, compression: str) -> bytes:
    """Compress an archive in a format the kernel's initramfs unpacker accepts.

    lz4 must be the *legacy* frame format (``lz4 -l``): the kernel's
    decompressor does not read the modern LZ4 frame.
    """
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if compression == "lz4":
        return _pipe(["lz4", "-l", "-1", "-c", "-q"], data, "lz4")
    if compression == "zstd":
        # The kernel's zstd needs a bounded window; -19 without --long is fine, but
        # level 3 is the speed/size sweet spot for build time.
        return _pipe(["zstd", "-3", "-c", "-q", "-T0"], data, "zstd")
    raise KtstrError(f"initramfs: unknown compression {compression!r}; use one of "
                     f"{', '.join(COMPRESSIONS)}")


def _pipe(argv: list[str], data: bytes, tool: str) -> bytes:
    tools.require(argv[0], why=f"initramfs {tool} compression needs it; or choose another "
                               "compression")
    proc = subprocess.run(argv, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise KtstrError(f"initramfs: {argv[0]} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def atomic_write(path: Path | str, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = reap.mkstemp("write", path.parent, suffix=f".{path.name}", hidden=True)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_archive(path: Path | str, entries: Iterable[CpioEntry] | Archive,
                  compression: str = "none", first_ino: int = 1) -> Path:
    """Encode ``entries`` as newc, compress, and write atomically to ``path``."""
    items = entries.entries if isinstance(entries, Archive) else entries
    blob = compress(encode_newc(items, first_ino), compression)
    atomic_write(path, blob)
    return Path(path)


# --- host paths mirrored into the guest ----------------------------------------------------


BUSYBOX_INIT_PREAMBLE = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
"""
"""The first lines of a :func:`busybox_archive` /init: applets on PATH, /dev /proc /sys."""


def busybox_archive(busybox: Path, init: str, binaries: Iterable[Path | str] = ()) -> Archive:
    """A minimal boot archive: static busybox at /bin/busybox, ``init`` as /init, the host
    ``binaries`` with their shared-library closure at their host paths, /proc /sys /dev /tmp
    and /dev/console. For one-shot guests (reports, mkfs, benchmarks) that need no Python."""
    if not busybox.is_file():
        raise KtstrError(f"{busybox} not found: {tools.install_hint('busybox')}")
    names = [str(b) for b in binaries]
    archive = Archive()
    archive.add_host_file("bin/busybox", busybox, 0o755)
    if names:
        closure = elf.library_closure(names)
        if closure.missing:
            raise KtstrError(f"{', '.join(names)}: shared libraries not found: "
                             f"{sorted(closure.missing)}")
        for name in (*names, *closure.files):
            add_host_path(archive, name)
    archive.add_file("init", init.encode(), 0o755)
    for d in ("proc", "sys", "dev", "tmp"):
        archive.add_dir(d)
    archive.add_chardev("dev/console", 5, 1)
    return archive


def add_host_path(archive: Archive, path: str, data: bytes | None = None,
                  mtime: int | None = None, _depth: int = 0) -> str:
    """Pack host ``path`` at the same absolute path in the guest, mirroring symlinks.

    Symlinked components (Debian's ``/lib -> usr/lib``) become the same
    symlinks in the archive, so a loader or interpreter that finds a file by
    some path on the host finds it by that path in the guest. Returns the
    real path packed. ``data`` overrides the file content (e.g. stripped).
    """
    if _depth > 40:
        raise KtstrError(f"initramfs: too many symlinks resolving {path}")
    parts = Path(os.path.abspath(path)).parts[1:]
    cur = "/"
    for i, part in enumerate(parts):
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            existing = archive.get(nxt)
            if existing is None or not stat.S_ISLNK(existing.mode):
                archive.add_symlink(nxt, target)
            resolved = target if os.path.isabs(target) else os.path.join(cur, target)
            rest = os.path.join(os.path.normpath(resolved), *parts[i + 1:])
            return add_host_path(archive, rest, data, mtime, _depth + 1)
        cur = nxt
    st = os.stat(cur)
    if stat.S_ISDIR(st.st_mode):
        archive.add_dir(cur, st.st_mode & 0o7777)
    else:
        content = Path(cur).read_bytes() if data is None else data
        entry = CpioEntry.file(cur, content, st.st_mode & 0o7777)
        if mtime is not None:
            entry = CpioEntry(entry.name, entry.mode, entry.data, mtime=mtime)
        archive.add(entry)
    return cur


# --- the guest Python runtime (cached base archive) ----------------------------------------

FORMAT_VERSION = 1
DEFAULT_COMPRESSION = "none"
GUEST_MODULE = "ktstr.guest.init"
KTSTR_DIR = Path(__file__).resolve().parent
MODULE_EXCLUDES = (
    "tkinter", "_tkinter", "idlelib", "lib2to3", "test", "ensurepip", "turtledemo", "turtle",
    "pydoc_data", "distutils", "venv",
)
"""Never needed in the guest and large (GUI, test suites, installers)."""
SOFT_EXCLUDES = ("pdb", "pydoc", "doctest", "xmlrpc", "http.server", "webbrowser")
"""Debugging and documentation tools that modulefinder reaches only through imports inside
functions (e.g. ``inspect`` -> ``pydoc`` -> ``http.server`` -> ``ssl`` -> libcrypto);
packed only when named in ``BaseSpec.modules``."""
ALWAYS_PACKAGES = ("encodings",)
"""Imported by the interpreter at startup, or dynamically by name (modulefinder misses them)."""
GUEST_DIRS = ("proc", "sys", "dev", "tmp", "run", "root", "etc", "mnt", "ktstr/bin")
GUEST_PATH_DIR = "ktstr/bin"
INTERP_FLAGS = "-SIBu"
"""No site (paths are explicit), isolated (no env vars, no cwd on sys.path), no .pyc
writes, unbuffered output to the console."""


@dataclass(frozen=True)
class BaseSpec:
    """What goes into the cached base archive."""

    test_files: tuple[Path, ...] = ()
    binaries: tuple[Path, ...] = ()
    """Extra executables (scheduler, mkfs.btrfs, ...) packed at their host paths with
    their shared-library closure."""
    modules: tuple[str, ...] = ()
    """Extra module names to pack (imported dynamically by the scenario)."""
    busybox: Path | None = None
    compression: str = DEFAULT_COMPRESSION
    strip: bool = True
    """Strip debug info from the interpreter and shared libraries (not from `binaries`)."""


@dataclass(frozen=True)
class BaseArchive:
    path: Path
    key: str
    size: int
    """Bytes on disk (compressed)."""
    cached: bool
    seconds: float
    files: int
    python: str
    """Guest path of the interpreter."""
    sys_path: tuple[str, ...]


def _stat_sig(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, -1, -1]
    return [path, st.st_size, st.st_mtime_ns]


def default_busybox() -> Path | None:
    found = shutil.which("busybox")
    return Path(found) if found else None


def search_path(spec: BaseSpec) -> list[str]:
    """Where the guest's modules are looked up: ktstr, the test files' directories, the
    interpreter's stdlib and site-packages. Deliberately not ``sys.path``, which also
    holds the invoking script's directory and whatever pytest inserted, so the same
    request yields the same archive from any caller."""
    paths = sysconfig.get_paths()
    stdlib = paths["stdlib"]
    candidates = [
        str(KTSTR_DIR.parent),
        *(str(Path(t).resolve().parent) for t in spec.test_files),
        stdlib,
        os.path.join(stdlib, "lib-dynload"),
        paths["platstdlib"],
        *site.getsitepackages(),
        paths["purelib"],
        paths["platlib"],
    ]
    return list(dict.fromkeys(os.path.abspath(p) for p in candidates if os.path.isdir(p)))


def _cache_key(spec: BaseSpec, python: str) -> str:
    """Names what is asked for; whether the packed files changed is the manifest's job."""
    roots = [python, *(str(p) for p in spec.test_files), *(str(p) for p in spec.binaries)]
    if spec.busybox:
        roots.append(str(spec.busybox))
    blob = json.dumps({
        "v": FORMAT_VERSION,
        "roots": [os.path.abspath(r) for r in roots],
        "search": search_path(spec),
        # The packer's own code: a change to how archives are built invalidates them.
        "packer": [_stat_sig(str(Path(__file__).resolve())), _stat_sig(elf.__file__)],
        "modules": spec.modules,
        "compression": spec.compression,
        "strip": spec.strip,
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def cache_dir() -> Path:
    return cache_root() / "initramfs"


def build_base(spec: BaseSpec, directory: Path | None = None) -> BaseArchive:
    """The base archive for ``spec``: from the cache when nothing it packs has changed."""
    start = time.monotonic()
    if spec.compression not in COMPRESSIONS:
        raise KtstrError(f"initramfs: unknown compression {spec.compression!r}; use one of "
                         f"{', '.join(COMPRESSIONS)}")
    for p in (*spec.test_files, *spec.binaries):
        if not Path(p).is_file():
            raise KtstrError(f"initramfs: {p} does not exist; check the path")
    python = os.path.realpath(sys.executable)
    key = _cache_key(spec, python)
    directory = directory or cache_dir()
    ext = {"none": "", "gzip": ".gz", "lz4": ".lz4", "zstd": ".zst"}[spec.compression]
    archive_path = directory / f"base-{key}.cpio{ext}"
    manifest_path = directory / f"base-{key}.json"
    manifest = _load_manifest(manifest_path)
    if manifest is not None and archive_path.is_file() and all(
        _stat_sig(dep[0]) == dep for dep in manifest["deps"]
    ):
        return BaseArchive(archive_path, key, archive_path.stat().st_size, True,
                           time.monotonic() - start, manifest["files"], manifest["python"],
                           tuple(manifest["sys_path"]))
    archive, deps, guest_path = pack_runtime(spec, python)
    blob = compress(archive.encode(), spec.compression)
    atomic_write(archive_path, blob)
    atomic_write(manifest_path, json.dumps({
        "deps": [_stat_sig(d) for d in sorted(deps)], "files": len(archive),
        "python": python, "sys_path": guest_path,
    }).encode())
    return BaseArchive(archive_path, key, len(blob), False, time.monotonic() - start,
                       len(archive), python, tuple(guest_path))


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "deps" in data else None


class _Finder(modulefinder.ModuleFinder):
    """modulefinder limited to the stdlib, ktstr and the test files' own directories.

    Third-party packages (anything under a site-packages directory) are not
    scanned: their static import graph is enormous (pytest reaches numpy,
    IPython, cryptography through optional imports inside functions). They
    are packed from what importing the test modules actually loads (see
    :func:`trace_imports`). Namespace packages (no loader) count as not found
    instead of crashing modulefinder.
    """

    def __init__(self, path: list[str], excludes: list[str], blocked: list[str]) -> None:
        super().__init__(path=path, excludes=excludes)
        self.blocked = [b.rstrip("/") + "/" for b in blocked]

    def find_module(self, name: str, path: Any, parent: Any = None) -> Any:
        try:
            found = super().find_module(name, path, parent)
        except AttributeError as err:
            raise ImportError(f"{name}: {err}") from err
        top = parent.__name__.split(".")[0] if parent is not None else name
        pathname = found[1]
        if top != "ktstr" and pathname and any(
                os.path.abspath(pathname).startswith(b) for b in self.blocked):
            if found[0] is not None:
                found[0].close()
            raise ImportError(f"{name}: third-party, packed from the import trace")
        return found


_TRACE = """
import importlib, importlib.util, json, os, sys
paths, files, names = json.loads(sys.argv[1])
sys.path[:0] = paths
for name in names:
    importlib.import_module(name)
for i, f in enumerate(files):
    sys.path.insert(0, os.path.dirname(f))
    spec = importlib.util.spec_from_file_location("_ktstr_trace_%d" % i, f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
out = {}
for name, mod in list(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if f and not name.startswith("_ktstr_trace_") and name != "__main__":
        out[name] = f
print(json.dumps(out))
"""


def trace_imports(files: Iterable[Path], path: list[str], names: Iterable[str]
                  ) -> dict[str, str]:
    """module -> file for everything importing ``names`` and then ``files`` loads (host run)."""
    arg = json.dumps([path, [str(f) for f in files], list(names)])
    proc = subprocess.run([sys.executable, "-c", _TRACE, arg], capture_output=True, text=True,
                          check=False, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise KtstrError("initramfs: importing the test modules on the host failed; fix "
                         f"them first:\n{proc.stderr[-3000:]}")
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def find_modules(scripts: Iterable[Path], path: list[str], extra: Iterable[str] = ()
                 ) -> dict[str, str]:
    """module name -> host file for what the guest will import.

    Static (modulefinder, imports inside functions included) over the stdlib,
    ktstr and the test files' directories; plus whatever actually importing
    ``extra`` and the test modules loads (third-party packages).
    """
    scripts = list(scripts)
    extra = tuple(extra)
    soft = [m for m in SOFT_EXCLUDES if m not in extra]
    blocked = [p for p in path if os.path.basename(p) in ("site-packages", "dist-packages")]
    finder = _Finder(path, [*MODULE_EXCLUDES, *soft], blocked)
    for script in scripts:
        finder.run_script(str(script))
    for name in (*extra, *ALWAYS_PACKAGES, sysconfig_data_module()):
        # Third-party names fail here; the trace below finds them.
        with contextlib.suppress(ImportError):
            finder.import_hook(name)
    out: dict[str, str] = {}
    for name, mod in finder.modules.items():
        file = getattr(mod, "__file__", None)
        if file and name != "__main__":
            out[name] = file
    for name, file in trace_imports(scripts, path, extra).items():
        if name.split(".")[0] not in MODULE_EXCLUDES:
            out.setdefault(name, file)
    for pkg in ALWAYS_PACKAGES:
        pkg_dir = Path(out[pkg]).parent
        for f in pkg_dir.glob("*.py"):
            out.setdefault(f"{pkg}.{f.stem}", str(f))
    return out


def sysconfig_data_module() -> str:
    return sysconfig._get_sysconfigdata_name()  # type: ignore[attr-defined]


def pyc_bytes(source_path: str) -> bytes | None:
    """The .pyc to ship with a source file.

    The host's own cached .pyc is reused when it matches the source's size
    and mtime (we pack the source with the same mtime, so it stays valid);
    otherwise an unchecked hash-based .pyc is compiled, which the guest
    never revalidates.
    """
    st = os.stat(source_path)
    try:
        cached = Path(importlib.util.cache_from_source(source_path)).read_bytes()
        if (cached[:4] == importlib.util.MAGIC_NUMBER
                and int.from_bytes(cached[4:8], "little") == 0
                and int.from_bytes(cached[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(cached[12:16], "little") == st.st_size & 0xFFFFFFFF):
            return cached
    except (OSError, ValueError):
        pass
    source = Path(source_path).read_bytes()
    try:
        code = compile(source, source_path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    from importlib import _bootstrap_external

    return bytes(_bootstrap_external._code_to_hash_pyc(  # type: ignore[attr-defined]
        code, importlib.util.source_hash(source), checked=False))


def _stripped(path: str) -> bytes | None:
    tool = shutil.which("objcopy")
    if tool is None:
        return None
    with reap.temporary_directory("strip") as tmp:
        out = os.path.join(tmp, "stripped")
        proc = subprocess.run([tool, "--strip-debug", path, out], capture_output=True,
                              check=False)
        if proc.returncode != 0:
            return None
        return Path(out).read_bytes()


def pack_runtime(spec: BaseSpec, python: str) -> tuple[Archive, set[str], list[str]]:
    """Build the base archive in memory: (archive, host files packed, guest sys.path)."""
    archive = Archive()
    for d in GUEST_DIRS:
        archive.add_dir(d)
    archive.add_chardev("dev/console", 5, 1, 0o600)
    archive.add_chardev("dev/null", 1, 3, 0o666)
    deps: set[str] = set()

    search = search_path(spec)
    modules = find_modules(spec.test_files, search, (GUEST_MODULE, *spec.modules))

    elf_files: list[str] = []
    used_dirs: dict[str, None] = {}
    for name, host_file in sorted(modules.items()):
        host_file = os.path.abspath(host_file)
        root = _module_root(host_file, name)
        if root is not None:
            used_dirs[root] = None
        if host_file.endswith(".py"):
            mtime = int(os.stat(host_file).st_mtime)
            real = add_host_path(archive, host_file, mtime=mtime)
            deps.add(host_file)
            pyc = pyc_bytes(real)
            if pyc is not None:
                add_host_path(archive, os.path.dirname(real))
                archive.add_file(importlib.util.cache_from_source(real), pyc, 0o644)
        elif host_file.endswith(".so"):
            elf_files.append(host_file)
    for test in spec.test_files:
        add_host_path(archive, str(Path(test).resolve()),
                      mtime=int(os.stat(test).st_mtime))
        deps.add(str(Path(test).resolve()))

    # The interpreter finds its prefix from the landmark lib/pythonX.Y/os.py and its
    # exec prefix from lib-dynload; both must exist even if no extension is packed.
    stdlib = sysconfig.get_paths()["stdlib"]
    add_host_path(archive, os.path.join(stdlib, "lib-dynload"))

    binaries = [python, *elf_files]
    user_bins = [os.path.abspath(b) for b in spec.binaries]
    if spec.busybox:
        user_bins.append(os.path.abspath(spec.busybox))
    closure = elf.library_closure([*binaries, *user_bins])
    if closure.missing:
        missing = ", ".join(f"{lib} (needed by {by})" for lib, by in closure.missing.items())
        raise KtstrError(f"initramfs: shared libraries not found: {missing}; install them")
    for f in [*binaries, *closure.files]:
        data = _stripped(f) if spec.strip and elf.is_elf(f) else None
        add_host_path(archive, f, data=data)
        deps.add(f)
    for f in user_bins:
        add_host_path(archive, f)
        deps.add(f)

    if spec.busybox:
        _add_busybox(archive, os.path.abspath(spec.busybox))

    # Search order first; then roots only the import trace knew (.pth-added paths).
    guest_path = [p for p in search if p in used_dirs]
    guest_path += [p for p in used_dirs if p not in guest_path]
    init = (f"#!{python} {INTERP_FLAGS}\n"
            "import sys\n"
            f"sys.path[:0] = {guest_path!r}\n"
            "try:\n"
            "    from ktstr.guest.init import main\n"
            "except BaseException:\n"
            "    import ctypes, os, traceback\n"
            "    traceback.print_exc()\n"
            "    os.sync()\n"
            "    ctypes.CDLL(None).reboot(0x4321FEDC)\n"
            "main()\n")
    archive.add_file("init", init.encode(), 0o755)
    return archive, deps, guest_path


def _module_root(host_file: str, module: str) -> str | None:
    """The sys.path entry ``module`` lives under (``a.b`` in ``R/a/b.py`` -> ``R``).

    None for aliases whose file does not sit at their name's place
    (``os.path`` is posixpath.py, ``_frozen_importlib`` is importlib/_bootstrap.py).
    """
    parts = module.split(".")
    base = os.path.basename(host_file)
    if base.startswith("__init__."):
        parts.append("__init__")
    here = os.path.dirname(host_file)
    if base.split(".")[0] != parts[-1]:
        return None
    for part in reversed(parts[:-1]):
        if os.path.basename(here) != part:
            return None
        here = os.path.dirname(here)
    return here


def _add_busybox(archive: Archive, busybox: str) -> None:
    proc = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=False)
    for applet in proc.stdout.split():
        if "/" not in applet:
            archive.add_symlink(f"{GUEST_PATH_DIR}/{applet}", busybox)
    sh = os.path.join(os.path.realpath("/bin"), "sh")
    if sh.lstrip("/") not in archive:
        archive.add_symlink(sh, busybox)


def build_suffix(files: dict[str, bytes], compression: str = "none",
                 first_ino: int = 1 << 24) -> bytes:
    """The small per-run archive, placed *before* the base in the initrd.

    Uncompressed by default. It must not follow an lz4 base: the kernel's lz4
    reader (legacy frames carry no end marker) consumes whatever follows.
    """
    archive = Archive()
    for name, data in files.items():
        archive.add_file(name, data, 0o644)
    return compress(archive.encode(first_ino), compression)
