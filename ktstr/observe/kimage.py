"""Where the guest kernel's image sits in guest RAM, and the VMCOREINFO drgn needs for it.

drgn reads a kernel through its VMCOREINFO text (``KEY=VALUE`` lines). Our kernels have
no ``CONFIG_VMCORE_INFO`` (and a rebuild to add it would change every cache key), so the
host writes that text itself from the entry's ``System.map`` plus a few values read from
guest RAM: the same keys the kernel's ``crash_save_vmcoreinfo`` would have written.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

START_KERNEL_MAP = 0xFFFFFFFF80000000
"""x86-64 ``__START_KERNEL_map``: kernel image symbols are ``phys + this - phys_base``."""
PAGE_SIZE = 4096
NT_GNU_BUILD_ID = 3

SYMBOLS = ("init_top_pgt", "init_uts_ns", "linux_banner", "__start_notes", "__stop_notes",
           "__pgtable_l5_enabled", "page_offset_base", "phys_base")
"""What the host needs from ``System.map``; the first four are required (``init_top_pgt``
is x86-64's ``swapper_pg_dir``)."""
REQUIRED = SYMBOLS[:4]
BANNER = b"Linux version "
MAX_NOTES = 4096
MAX_BANNER = 512


class ObserveError(Exception):
    """The observer cannot look at this guest (one line: why)."""


class PhysReader(Protocol):
    """Guest-physical reads, bounds-checked by the implementation (``GuestMemory``)."""

    def read(self, gpa: int, length: int) -> bytes: ...


def read_symbols(system_map: Path, names: Iterable[str] = SYMBOLS) -> dict[str, int]:
    """The addresses of ``names`` in a ``System.map`` (``ADDR TYPE NAME`` lines)."""
    try:
        data = system_map.read_bytes()
    except OSError as err:
        raise ObserveError(f"cannot read {system_map}: {err.strerror}") from None
    # A search per name, not a Python loop over the map's tens of thousands of lines:
    # on an emulated host that loop was most of the observer's CPU.
    found: dict[str, int] = {}
    for name in set(names):
        at = data.find(b" " + name.encode() + b"\n")
        if at < 0:
            continue
        parts = data[data.rfind(b"\n", 0, at) + 1:at].split()
        if len(parts) == 2:
            try:
                found[name] = int(parts[0], 16)
            except ValueError:
                continue
    missing = [n for n in REQUIRED if n not in found]
    if missing:
        raise ObserveError(f"{system_map} lacks {', '.join(missing)}: not an x86-64 kernel map")
    return found


def build_id_from_notes(notes: bytes) -> bytes | None:
    """The GNU build id in a run of ELF notes (a vmlinux's ``.notes``), if any."""
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        name_end = off + 12 + ((namesz + 3) & ~3)
        desc_end = name_end + ((descsz + 3) & ~3)
        if desc_end > len(notes) or namesz > 256 or descsz > 1024:
            return None
        if ntype == NT_GNU_BUILD_ID and notes[off + 12:off + 12 + namesz].rstrip(b"\0") == b"GNU":
            return notes[name_end:name_end + descsz]
        off = desc_end
    return None


PT_LOAD, PT_NOTE = 1, 4


@dataclass(frozen=True)
class _Segment:
    ptype: int
    offset: int
    vaddr: int
    filesz: int


def _segments(fh: BinaryIO, vmlinux: Path) -> list[_Segment]:
    ehdr = fh.read(64)
    if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
        raise ObserveError(f"{vmlinux} is not an ELF64 file")
    phoff, = struct.unpack_from("<Q", ehdr, 32)
    phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
    fh.seek(phoff)
    phdrs = fh.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        ptype, _flags, offset, vaddr, _p, filesz = struct.unpack_from("<IIQQQQ", phdrs,
                                                                       i * phentsize)
        out.append(_Segment(ptype, offset, vaddr, filesz))
    return out


def _read_vmlinux(vmlinux: Path, read: Callable[[BinaryIO, list[_Segment]], bytes | None],
                  ) -> bytes | None:
    try:
        with vmlinux.open("rb") as fh:
            return read(fh, _segments(fh, vmlinux))
    except OSError as err:
        raise ObserveError(f"cannot read {vmlinux}: {err.strerror}") from None
    except struct.error:
        raise ObserveError(f"{vmlinux} has a truncated ELF header") from None


def vmlinux_build_id(vmlinux: Path) -> bytes | None:
    """The GNU build id in ``vmlinux``'s note segments (ELF64 little-endian)."""
    def read(fh: BinaryIO, segments: list[_Segment]) -> bytes | None:
        for seg in segments:
            if seg.ptype == PT_NOTE and seg.filesz <= MAX_NOTES:
                fh.seek(seg.offset)
                found = build_id_from_notes(fh.read(seg.filesz))
                if found:
                    return found
        return None
    return _read_vmlinux(vmlinux, read)


def vmlinux_banner(vmlinux: Path, banner_vaddr: int) -> str | None:
    """``linux_banner`` as ``vmlinux`` holds it (its address from ``System.map``)."""
    def read(fh: BinaryIO, segments: list[_Segment]) -> bytes | None:
        for seg in segments:
            if seg.ptype == PT_LOAD and seg.vaddr <= banner_vaddr < seg.vaddr + seg.filesz:
                fh.seek(seg.offset + banner_vaddr - seg.vaddr)
                return fh.read(min(MAX_BANNER, seg.vaddr + seg.filesz - banner_vaddr))
        return None
    raw = _read_vmlinux(vmlinux, read)
    if raw is None:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def banner_mismatch(banner: str | None, image_version: str | None) -> str | None:
    """Why a vmlinux whose ``linux_banner`` is ``banner`` cannot be the kernel whose bzImage
    carries ``image_version`` (:func:`ktstr.bzimage.kernel_version`), or None if it can.

    The banner is ``Linux version RELEASE (user@host) (compiler) UTS_VERSION``; the
    image's string is ``RELEASE (user@host) UTS_VERSION``. Release and ``UTS_VERSION``
    (build number, flags and build time) together tell two builds of one tree apart.
    Unknown on either side (an image without the string) is not a mismatch."""
    if banner is None or image_version is None:
        return None
    text = banner.strip()
    if not text.startswith(BANNER.decode()):
        return f"its linux_banner is not a kernel banner ({text[:60]!r})"
    release = image_version.split(" ", 1)[0]
    uts_at = image_version.rfind(") #")
    uts_version = image_version[uts_at + 2:].strip() if uts_at != -1 else ""
    if text[len(BANNER):].split(" ", 1)[0] != release or (
            uts_version and not text.endswith(uts_version)):
        return f"the booted bzImage is {image_version!r}; the vmlinux is {text!r}"
    return None


def kernel_phys(vaddr: int, phys_base: int = 0) -> int:
    """The guest-physical address of a kernel-image symbol."""
    return vaddr - START_KERNEL_MAP + phys_base


@dataclass(frozen=True)
class KernelImage:
    """What the host learnt of the running kernel image; :meth:`vmcoreinfo` for drgn."""

    osrelease: str
    build_id: bytes | None
    symbols: Mapping[str, int]
    phys_base: int
    pgtable_l5: bool
    page_offset: int

    def vmcoreinfo(self) -> str:
        lines = [f"OSRELEASE={self.osrelease}", f"PAGESIZE={PAGE_SIZE}",
                 "KERNELOFFSET=0",
                 f"SYMBOL(swapper_pg_dir)={self.symbols['init_top_pgt']:x}",
                 f"NUMBER(phys_base)={self.phys_base}",
                 f"NUMBER(pgtable_l5_enabled)={int(self.pgtable_l5)}"]
        if self.build_id:
            lines.append(f"BUILD-ID={self.build_id.hex()}")
        return "\n".join(lines) + "\n"


def _u64(mem: PhysReader, vaddr: int, phys_base: int) -> int:
    return int.from_bytes(mem.read(kernel_phys(vaddr, phys_base), 8), "little")


def locate(mem: PhysReader, symbols: Mapping[str, int], build_id: bytes | None) -> KernelImage:
    """Find the booted kernel in guest RAM and check it is the one ``symbols`` describe.

    Raises :class:`ObserveError` while the image is not in place yet (still compressed,
    or not this kernel: its build id or banner differ)."""
    phys_base = 0  # our VMM boots with nokaslr; a relocated image shows in the banner check
    try:
        banner = mem.read(kernel_phys(symbols["linux_banner"], phys_base), 256)
        if "phys_base" in symbols:
            phys_base = _u64(mem, symbols["phys_base"], 0)
            banner = mem.read(kernel_phys(symbols["linux_banner"], phys_base), 256)
    except Exception as err:  # GuestMemoryError: the symbol lies outside guest RAM
        raise ObserveError(f"the kernel image is not in guest RAM where System.map puts it "
                           f"({err})") from None
    if not banner.startswith(BANNER):
        raise ObserveError("the guest kernel's banner is not in place (not booted yet, or a "
                           "relocated kernel)")
    release = banner[len(BANNER):].split(b" ", 1)[0].decode(errors="replace")
    if build_id is not None:
        start, stop = symbols["__start_notes"], symbols.get("__stop_notes", 0)
        length = stop - start if 0 < stop - start <= MAX_NOTES else MAX_NOTES
        running = build_id_from_notes(mem.read(kernel_phys(start, phys_base), length))
        if running != build_id:
            raise ObserveError(
                f"the booted kernel (build id {running.hex() if running else 'none'}) is not "
                f"the vmlinux given (build id {build_id.hex()})")
    l5 = False
    if "__pgtable_l5_enabled" in symbols:
        raw = mem.read(kernel_phys(symbols["__pgtable_l5_enabled"], phys_base), 4)
        l5 = int.from_bytes(raw, "little") != 0
    page_offset = 0xFF11000000000000 if l5 else 0xFFFF888000000000
    if "page_offset_base" in symbols:
        page_offset = _u64(mem, symbols["page_offset_base"], phys_base) or page_offset
    return KernelImage(osrelease=release, build_id=build_id, symbols=dict(symbols),
                       phys_base=phys_base, pgtable_l5=l5, page_offset=page_offset)
