"""ELF dynamic-dependency parsing and shared-library closure, in pure Python.

Packing a host binary into the guest means packing what the dynamic loader
will open for it: the ``PT_INTERP`` loader and every ``DT_NEEDED`` library,
recursively. We resolve names the way glibc's ld.so does:

1. ``DT_RPATH`` of the object and of the objects that loaded it (only when
   the object has no ``DT_RUNPATH``),
2. ``DT_RUNPATH`` of the object itself,
3. ``/etc/ld.so.cache``,
4. the default directories (multiarch first, as Debian's loader does).

``$ORIGIN`` (and ``${ORIGIN}``) expand to the directory of the object that
carries the path. ``LD_LIBRARY_PATH`` is deliberately ignored: the guest
does not inherit the host's environment.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ktstr.errors import KtstrError

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_SONAME = 14
DT_RPATH = 15
DT_RUNPATH = 29

DEFAULT_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
LD_SO_CACHE = "/etc/ld.so.cache"
_CACHE_MAGIC_NEW = b"glibc-ld.so.cache1.1"
_CACHE_MAGIC_OLD = b"ld.so-1.7.0"
# file_entry flags for x86-64 libc6 libraries (FLAG_ELF_LIBC6 | FLAG_X8664_LIB64).
_CACHE_FLAGS_X8664 = 0x0303


class ElfError(KtstrError):
    """A file is not an ELF object we can parse."""


@dataclass(frozen=True)
class ElfInfo:
    """The dynamic-linking facts of one ELF object."""

    path: str
    interp: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    soname: str | None

    @property
    def is_dynamic(self) -> bool:
        return self.interp is not None or bool(self.needed)


def is_elf(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def parse_elf(data: bytes, path: str = "<bytes>") -> ElfInfo:
    """Parse the program headers and dynamic section of a 64-bit little-endian ELF image."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path}: only 64-bit little-endian ELF is supported")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if phentsize < 56 or phoff + phnum * phentsize > len(data):
        raise ElfError(f"{path}: program header table out of bounds")
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    interp = None
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_offset + p_filesz > len(data):
            raise ElfError(f"{path}: segment {i} out of bounds")
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_INTERP:
            interp = data[p_offset:p_offset + p_filesz].split(b"\0", 1)[0].decode()
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return ElfInfo(path, interp, (), (), (), None)

    tags: list[tuple[int, int]] = []
    off, size = dynamic
    for pos in range(off, off + size - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == DT_NULL:
            break
        tags.append((tag, val))
    strtab_vaddr = next((v for t, v in tags if t == DT_STRTAB), None)
    if strtab_vaddr is None:
        raise ElfError(f"{path}: dynamic section without DT_STRTAB")
    strtab = _vaddr_to_offset(loads, strtab_vaddr, path)

    def string(index: int) -> str:
        start = strtab + index
        if start >= len(data):
            raise ElfError(f"{path}: string index {index} out of bounds")
        end = data.find(b"\0", start)
        return data[start:end if end >= 0 else len(data)].decode(errors="surrogateescape")

    def paths(tag: int) -> tuple[str, ...]:
        out: list[str] = []
        for t, v in tags:
            if t == tag:
                out.extend(p for p in string(v).split(":") if p)
        return tuple(out)

    return ElfInfo(
        path=path,
        interp=interp,
        needed=tuple(string(v) for t, v in tags if t == DT_NEEDED),
        rpath=paths(DT_RPATH),
        runpath=paths(DT_RUNPATH),
        soname=next((string(v) for t, v in tags if t == DT_SONAME), None),
    )


def _vaddr_to_offset(loads: list[tuple[int, int, int]], vaddr: int, path: str) -> int:
    for seg_vaddr, seg_off, seg_size in loads:
        if seg_vaddr <= vaddr < seg_vaddr + seg_size:
            return seg_off + (vaddr - seg_vaddr)
    raise ElfError(f"{path}: address {vaddr:#x} is in no loadable segment")


def read_elf(path: str | os.PathLike[str]) -> ElfInfo:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ElfError(f"{path}: cannot read: {err.strerror}") from err
    return parse_elf(data, str(path))


def parse_ld_so_cache(data: bytes) -> dict[str, str]:
    """soname -> path for x86-64 entries of a glibc ``ld.so.cache`` (first entry wins)."""
    base = 0
    if data.startswith(_CACHE_MAGIC_OLD):
        # Old-format header (magic + u32 nlibs + 12-byte entries), then the new one, 8-aligned.
        nlibs_old, = struct.unpack_from("<I", data, len(_CACHE_MAGIC_OLD) + 1)
        base = len(_CACHE_MAGIC_OLD) + 1 + 4 + nlibs_old * 12
        base = (base + 7) & ~7
    if data[base:base + len(_CACHE_MAGIC_NEW)] != _CACHE_MAGIC_NEW:
        return {}
    nlibs, = struct.unpack_from("<I", data, base + 20)
    out: dict[str, str] = {}
    entries = base + 48
    str_base = base  # new-format string offsets are relative to the new header

    def cstr(offset: int) -> str:
        start = str_base + offset
        end = data.find(b"\0", start)
        return data[start:end].decode(errors="surrogateescape")

    for i in range(nlibs):
        pos = entries + i * 24
        if pos + 24 > len(data):
            break
        flags, key, value = struct.unpack_from("<iII", data, pos)
        if flags & 0xFFFF != _CACHE_FLAGS_X8664:
            continue
        out.setdefault(cstr(key), cstr(value))
    return out


_ld_cache: dict[str, str] | None = None


def ld_so_cache() -> dict[str, str]:
    global _ld_cache
    if _ld_cache is None:
        try:
            _ld_cache = parse_ld_so_cache(Path(LD_SO_CACHE).read_bytes())
        except OSError:
            _ld_cache = {}
    return _ld_cache


def _expand(entry: str, origin: str) -> str:
    return entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)


@dataclass
class Closure:
    """Everything the loader opens for a set of objects.

    ``files`` are absolute host paths as the loader would open them (symlinks
    not resolved, so the guest can mirror the same names).
    """

    files: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # library name -> needed by


def resolve_library(name: str, obj: ElfInfo, rpath_chain: Iterable[tuple[str, str]]) -> str | None:
    """Where ld.so finds ``name`` for ``obj``; None when nowhere.

    ``rpath_chain`` is (rpath entry, origin dir) pairs from the objects that
    loaded ``obj`` (DT_RPATH is inherited; DT_RUNPATH is not).
    """
    if "/" in name:
        return name if os.path.isfile(name) else None
    origin = os.path.dirname(os.path.realpath(obj.path))
    search: list[str] = []
    if not obj.runpath:
        search += [_expand(p, origin) for p in obj.rpath]
        search += [_expand(p, o) for p, o in rpath_chain]
    search += [_expand(p, origin) for p in obj.runpath]
    for directory in search:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and _is_x86_64(candidate):
            return candidate
    cached = ld_so_cache().get(name)
    if cached and os.path.isfile(cached):
        return cached
    for directory in DEFAULT_DIRS:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and _is_x86_64(candidate):
            return candidate
    return None


def _is_x86_64(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and head[4] == 2 and head[18:20] == b"\x3e\x00"


def library_closure(paths: Iterable[str | os.PathLike[str]]) -> Closure:
    """The loader and shared libraries needed by ``paths`` (the objects themselves excluded).

    Non-ELF files (scripts) and static binaries contribute nothing.
    """
    closure = Closure()
    seen: set[str] = set()
    # Work items: (path, inherited rpath chain).
    todo: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    roots: set[str] = set()
    for p in paths:
        sp = os.path.abspath(os.fspath(p))
        roots.add(os.path.realpath(sp))
        if is_elf(sp):
            todo.append((sp, ()))
    while todo:
        path, chain = todo.pop()
        info = read_elf(path)
        if info.interp and os.path.realpath(info.interp) not in seen:
            if not os.path.isfile(info.interp):
                closure.missing[info.interp] = path
            else:
                seen.add(os.path.realpath(info.interp))
                closure.files.append(info.interp)
        origin = os.path.dirname(os.path.realpath(path))
        child_chain = chain if info.runpath else chain + tuple((r, origin) for r in info.rpath)
        for name in info.needed:
            found = resolve_library(name, info, chain)
            if found is None:
                closure.missing.setdefault(name, path)
                continue
            real = os.path.realpath(found)
            if real in seen or real in roots:
                continue
            seen.add(real)
            closure.files.append(found)
            todo.append((found, child_chain))
    return closure
