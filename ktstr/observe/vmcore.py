"""Guest RAM as an ELF core file in the kdump layout, for ``drgn -c`` and ``crash``.

The file looks like the kernel's /proc/vmcore (fs/proc/vmcore.c, the headers from
kernel/crash_core.c): an ELF64 x86-64 ``ET_CORE`` whose first program header is
one ``PT_NOTE`` (``p_align`` 4) holding a ``VMCOREINFO`` note, followed by one
``PT_LOAD`` per RAM region with ``p_paddr`` = guest-physical address and
``p_vaddr`` = its direct-map address. drgn takes the ``VMCOREINFO`` note as the
sign of a kernel dump: it then trusts ``p_paddr`` even where it is 0 and reads
the note's ``KEY=VALUE`` lines (each must end in a newline; it needs at least
``OSRELEASE``, ``PAGESIZE`` and ``SYMBOL(swapper_pg_dir)``).

A guest touches a small part of its RAM, so the file is sparse: all-zero pages
are never written, and the file is extended to its full size so that they read
back as zeros. The PT_NOTE carries no NT_PRSTATUS notes (the vCPUs' registers).
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ktstr import reap

PAGE_SIZE = 0x1000
"""The x86-64 page, the unit of segment offsets and of the zero-page test."""
DIRECT_MAP = 0xFFFF888000000000
"""x86-64 ``PAGE_OFFSET`` with 4-level paging and no KASLR: virtual = DIRECT_MAP + physical."""
CHUNK_SIZE = 1 << 20
"""Guest RAM is scanned and written through windows this large, never all of it at once."""

ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ET_CORE, EM_X86_64 = 2, 1, 1, 4, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
NOTE_ALIGN = 4
"""ELF64 notes still pad to 4 bytes (gABI); a PT_NOTE with p_align 8 would mean 8."""
VMCOREINFO_NAME = b"VMCOREINFO"
VMCOREINFO_TYPE = 0

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")
_U32_MAX = 0xFFFF_FFFF
_PN_XNUM = 0xFFFF
"""e_phnum at or above this means "see section 0", which a core file without sections lacks."""


class RamRegion(Protocol):
    @property
    def gpa(self) -> int: ...

    @property
    def size(self) -> int: ...


class RamSource(Protocol):
    """What a vmcore is written from: ``ktstr.vmm.memory.GuestMemory`` fits as it is."""

    @property
    def regions(self) -> Sequence[RamRegion]: ...

    def view(self, gpa: int, length: int) -> memoryview: ...


@dataclass(frozen=True)
class LoadSegment:
    """One RAM region, one PT_LOAD."""

    gpa: int
    size: int


@dataclass(frozen=True)
class CoreLayout:
    header: bytes
    """Ehdr, Phdrs and notes: the file's first bytes."""
    offsets: tuple[int, ...]
    """File offset of each segment's data, in the order the segments were given."""
    size: int
    """Apparent size of the whole file."""


@dataclass(frozen=True)
class VmcoreStats:
    path: Path
    size: int
    """Apparent size of the file."""
    data_written: int
    """Guest RAM bytes actually written; the rest are holes."""
    seconds: float


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def elf_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note: Nhdr, ``name`` plus its NUL, ``desc``, each padded to 4 bytes."""
    if b"\0" in name:
        raise ValueError(f"ELF note name {name!r} contains a NUL (the encoder adds it)")
    if not 0 <= ntype <= _U32_MAX:
        raise ValueError(f"ELF note type {ntype} does not fit in 32 bits")
    if len(desc) > _U32_MAX:
        raise ValueError(f"ELF note desc of {len(desc)} bytes does not fit a 32-bit size")
    namez = name + b"\0"
    return b"".join((
        _NHDR.pack(len(namez), len(desc), ntype),
        namez.ljust(_align(len(namez), NOTE_ALIGN), b"\0"),
        desc.ljust(_align(len(desc), NOTE_ALIGN), b"\0"),
    ))


def _check_segments(segments: Sequence[LoadSegment], page_offset: int) -> None:
    if not segments:
        raise ValueError("a vmcore needs at least one RAM region")
    if len(segments) + 1 >= _PN_XNUM:
        raise ValueError(f"{len(segments)} RAM regions are more than an ELF core can list")
    if page_offset < 0 or page_offset % PAGE_SIZE:
        raise ValueError(f"page_offset 0x{page_offset:x} is not a page-aligned address")
    end = 0
    for seg in segments:
        if seg.gpa < 0 or seg.size <= 0 or (seg.gpa | seg.size) % PAGE_SIZE:
            raise ValueError(f"RAM region gpa=0x{seg.gpa:x} size=0x{seg.size:x} is not "
                             "a non-empty run of whole pages")
        if seg.gpa < end:
            raise ValueError(f"RAM region at 0x{seg.gpa:x} overlaps or precedes the one "
                             f"ending at 0x{end:x} (regions must ascend without overlap)")
        end = seg.gpa + seg.size
    if page_offset + end > 1 << 64:
        raise ValueError(f"RAM up to 0x{end:x} does not fit the 64-bit address space above "
                         f"page_offset 0x{page_offset:x}")


def core_header(segments: Sequence[LoadSegment], notes: bytes, *,
                page_offset: int = DIRECT_MAP) -> CoreLayout:
    """The header of a vmcore holding ``segments`` and the ready-made ``notes``.

    The notes follow the program headers; segment data starts at the next page and
    runs back to back (whole pages each, so every offset stays page aligned).
    """
    _check_segments(segments, page_offset)
    if len(notes) % NOTE_ALIGN:
        raise ValueError(f"notes of {len(notes)} bytes are not a whole number of 4-byte words")
    phnum = 1 + len(segments)
    notes_at = _EHDR.size + phnum * _PHDR.size
    offsets: list[int] = []
    at = _align(notes_at + len(notes), PAGE_SIZE)
    for seg in segments:
        offsets.append(at)
        at += seg.size
    ident = b"\x7fELF" + bytes((ELFCLASS64, ELFDATA2LSB, EV_CURRENT))
    ehdr = _EHDR.pack(ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, _EHDR.size, 0, 0,
                      _EHDR.size, _PHDR.size, phnum, 0, 0, 0)
    phdrs = [_PHDR.pack(PT_NOTE, 0, notes_at, 0, 0, len(notes), len(notes), NOTE_ALIGN)]
    phdrs += [_PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, off, page_offset + seg.gpa, seg.gpa,
                         seg.size, seg.size, PAGE_SIZE)
              for seg, off in zip(segments, offsets, strict=True)]
    return CoreLayout(b"".join((ehdr, *phdrs, notes)), tuple(offsets), at)


def vmcoreinfo_note(vmcoreinfo: str) -> bytes:
    """The ``VMCOREINFO`` note, as /sys/kernel/vmcoreinfo's: the text without a NUL."""
    if not vmcoreinfo.isascii() or "\0" in vmcoreinfo:
        raise ValueError("vmcoreinfo must be ASCII text without NUL bytes")
    if not vmcoreinfo.endswith("\n"):
        raise ValueError("vmcoreinfo must be KEY=VALUE lines each ending in a newline "
                         "(drgn ignores an unterminated last line)")
    return elf_note(VMCOREINFO_NAME, VMCOREINFO_TYPE, vmcoreinfo.encode("ascii"))


def nonzero_runs(chunk: memoryview, zeros: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` byte ranges of ``chunk`` covering its pages that are not all zero.

    ``zeros`` is a zero buffer at least as long as ``chunk``: ``bytes.startswith``
    takes a buffer and compares with memcmp, so no page is copied or looped over in Python.
    """
    if zeros.startswith(chunk):
        return
    start: int | None = None
    for off in range(0, chunk.nbytes, PAGE_SIZE):
        if zeros.startswith(chunk[off : off + PAGE_SIZE]):
            if start is not None:
                yield start, off
                start = None
        elif start is None:
            start = off
    if start is not None:
        yield start, chunk.nbytes


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _copy_segment(fd: int, memory: RamSource, seg: LoadSegment, file_offset: int,
                  zeros: bytes) -> int:
    written = 0
    for at in range(0, seg.size, CHUNK_SIZE):
        length = min(CHUNK_SIZE, seg.size - at)
        chunk = memory.view(seg.gpa + at, length)
        if chunk.nbytes != length:
            raise ValueError(f"RAM view at 0x{seg.gpa + at:x} has {chunk.nbytes} bytes, "
                             f"not the {length} asked for")
        for start, end in nonzero_runs(chunk, zeros):
            _pwrite_all(fd, chunk[start:end], file_offset + at + start)
            written += end - start
    return written


def write_vmcore(path: Path, memory: RamSource, vmcoreinfo: str, *,
                 page_offset: int = DIRECT_MAP) -> VmcoreStats:
    """Write ``memory`` (its vCPUs stopped) as a vmcore at ``path``, atomically.

    The data goes to an owned temporary file beside ``path`` (``reap.mkstemp``: a
    SIGKILL leaves it to the next reaper), is fsynced, and is renamed into place, so
    ``path`` never names a half-written core. On any error the temporary file is
    removed and ``path`` is untouched. The file is mode 0600: guest RAM holds secrets
    (keys, test data) as readily as anything.
    """
    started = time.monotonic()
    path = Path(path)
    segments = [LoadSegment(r.gpa, r.size) for r in memory.regions]
    layout = core_header(segments, vmcoreinfo_note(vmcoreinfo), page_offset=page_offset)
    zeros = bytes(CHUNK_SIZE)
    fd, tmp = reap.mkstemp("vmcore", path.parent, suffix=f".{path.name}", hidden=True)
    try:
        try:
            _pwrite_all(fd, memoryview(layout.header), 0)
            written = sum(_copy_segment(fd, memory, seg, off, zeros)
                          for seg, off in zip(segments, layout.offsets, strict=True))
            os.ftruncate(fd, layout.size)  # the zero pages after the last write, as a hole
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return VmcoreStats(path, layout.size, written, time.monotonic() - started)
