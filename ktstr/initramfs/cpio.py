"""The cpio "newc" codec: entries, archives, compression, atomic writes.

The guest boots from one or more cpio archives concatenated back to back (the
kernel unpacks each in turn, later entries overwriting earlier ones), which
lets a large, cached base archive be reused with a small per-run suffix.

Layout of an entry (``newc``, see the kernel's
Documentation/driver-api/early-userspace/buffer-format.rst): a 110-byte ASCII
header ``070701`` + 13 eight-digit hex fields, the NUL-terminated name padded
so that header+name is a multiple of 4, then the data padded to 4. The archive
ends with an entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ktstr import reap, tools
from ktstr.errors import KtstrError

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
