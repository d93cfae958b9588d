"""The vmcore writer: kdump-layout ELF cores of real guest RAM, read back by struct, pyelftools
and drgn."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ktstr.observe import vmcore
from ktstr.observe.vmcore import (
    DIRECT_MAP,
    PAGE_SIZE,
    LoadSegment,
    RamRegion,
    RamSource,
    core_header,
    elf_note,
    nonzero_runs,
    write_vmcore,
)
from ktstr.vmm.memory import GuestMemory, MemRegion

MiB = 1 << 20
HIGH = 0x1_0000_0000
REGIONS = [(0, 16 * MiB), (HIGH, 4 * MiB)]
VMCOREINFO = ("OSRELEASE=6.12.0-ktstr\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82a0c000\n"
              "NUMBER(phys_base)=0\nKERNELOFFSET=0\n")
PATTERNS = {
    0x0: b"first byte of RAM",
    0x1FFF: b"\xaa",  # the last byte of a page: the whole page must still be written
    vmcore.CHUNK_SIZE - 3: b"across a chunk edge",
    0x7F_F000: os.urandom(3 * PAGE_SIZE),
    16 * MiB - 5: b"tail!",  # the region's last bytes
    HIGH: b"above the 32-bit gap",
    HIGH + 0x2345: b"high",
    HIGH + 4 * MiB - PAGE_SIZE: b"\x01" * PAGE_SIZE,
}
TOUCHED_PAGES = {p for gpa, data in PATTERNS.items()
                 for p in range(gpa // PAGE_SIZE, (gpa + len(data) - 1) // PAGE_SIZE + 1)}

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")


def _pad4(n: int) -> int:
    return (n + 3) // 4 * 4


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory(REGIONS) as mem:
        for gpa, data in PATTERNS.items():
            mem.write(gpa, data)
        yield mem


@pytest.fixture
def written(memory: GuestMemory, tmp_path: Path) -> vmcore.VmcoreStats:
    return write_vmcore(tmp_path / "vmcore", memory, VMCOREINFO)


def _phdrs(data: bytes) -> list[tuple[int, ...]]:
    ehdr = _EHDR.unpack_from(data)
    phoff, phnum = ehdr[5], ehdr[10]
    return [_PHDR.unpack_from(data, phoff + i * _PHDR.size) for i in range(phnum)]


def _walk_notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name without NUL, type, desc) of each note, walked with the gABI's 4-byte padding."""
    notes, at = [], 0
    while at < len(blob):
        namesz, descsz, ntype = _NHDR.unpack_from(blob, at)
        name_at = at + _NHDR.size
        desc_at = name_at + _pad4(namesz)
        assert blob[name_at + namesz - 1] == 0, "a note name ends in its NUL"
        notes.append((blob[name_at : name_at + namesz - 1], ntype,
                      blob[desc_at : desc_at + descsz]))
        at = desc_at + _pad4(descsz)
    assert at == len(blob)
    return notes


# --- encoders -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"", b"CORE", b"LINUX", b"VMCOREINFO", b"abcdefg"])
@pytest.mark.parametrize("desc_len", [0, 1, 3, 4, 5, 8, 4097])
def test_elf_note_pads_name_and_desc_to_four_bytes(name: bytes, desc_len: int) -> None:
    desc = bytes(range(1, 256)) * (desc_len // 255 + 1)
    desc = desc[:desc_len]
    note = elf_note(name, 7, desc)
    namesz, descsz, ntype = _NHDR.unpack_from(note)
    assert (namesz, descsz, ntype) == (len(name) + 1, desc_len, 7)
    assert len(note) == _NHDR.size + _pad4(len(name) + 1) + _pad4(desc_len)
    assert len(note) % 4 == 0
    name_field = note[_NHDR.size : _NHDR.size + _pad4(namesz)]
    assert name_field == name + b"\0" * (len(name_field) - len(name))
    desc_field = note[_NHDR.size + _pad4(namesz) :]
    assert desc_field == desc + b"\0" * (len(desc_field) - desc_len)
    assert _walk_notes(note + note) == [(name, 7, desc)] * 2


@pytest.mark.parametrize(("name", "ntype"), [(b"VM\0CORE", 0), (b"CORE", -1), (b"CORE", 1 << 32)])
def test_elf_note_rejects_what_the_header_cannot_say(name: bytes, ntype: int) -> None:
    with pytest.raises(ValueError, match="ELF note"):
        elf_note(name, ntype, b"")


def test_core_header_fields_round_trip() -> None:
    notes = elf_note(b"VMCOREINFO", 0, b"PAGESIZE=4096\n") + elf_note(b"X", 3, b"12345")
    segments = [LoadSegment(0, 3 * PAGE_SIZE), LoadSegment(HIGH, 2 * MiB)]
    layout = core_header(segments, notes, page_offset=0xFFFF_C000_0000_0000)
    ident, etype, machine, version, entry, phoff, shoff, flags, ehsize, phentsize, phnum, \
        shentsize, shnum, shstrndx = _EHDR.unpack_from(layout.header)
    assert ident == b"\x7fELF\x02\x01\x01" + bytes(9)
    assert (etype, machine, version, entry) == (4, 62, 1, 0)  # ET_CORE, EM_X86_64
    assert (phoff, ehsize, phentsize, phnum) == (64, 64, 56, 3)
    assert (shoff, flags, shentsize, shnum, shstrndx) == (0, 0, 0, 0, 0)
    note, *loads = _phdrs(layout.header)
    ptype, pflags, offset, vaddr, paddr, filesz, memsz, align = note
    assert (ptype, pflags, vaddr, paddr, align) == (4, 0, 0, 0, 4)  # PT_NOTE as /proc/vmcore's
    assert filesz == memsz == len(notes)
    assert layout.header[offset : offset + filesz] == notes
    assert offset + filesz == len(layout.header)
    assert layout.offsets == (PAGE_SIZE, 4 * PAGE_SIZE)  # back to back, page aligned
    for (ptype, pflags, offset, vaddr, paddr, filesz, memsz, align), seg, at in zip(
            loads, segments, layout.offsets, strict=True):
        assert (ptype, pflags, align) == (1, 7, PAGE_SIZE)  # PT_LOAD, RWX
        assert (offset, paddr, vaddr) == (at, seg.gpa, 0xFFFF_C000_0000_0000 + seg.gpa)
        assert filesz == memsz == seg.size
    assert layout.size == 4 * PAGE_SIZE + 2 * MiB


def test_segment_data_starts_on_the_page_after_a_long_header() -> None:
    notes = elf_note(b"VMCOREINFO", 0, b"K=V\n" * 1500)  # 6000 bytes: the header spills over
    layout = core_header([LoadSegment(0, PAGE_SIZE)], notes)
    assert len(layout.header) > PAGE_SIZE
    assert layout.offsets == (2 * PAGE_SIZE,)


@pytest.mark.parametrize(("segments", "page_offset", "message"), [
    ([], DIRECT_MAP, "at least one RAM region"),
    ([LoadSegment(0, 0)], DIRECT_MAP, "whole pages"),
    ([LoadSegment(0x800, PAGE_SIZE)], DIRECT_MAP, "whole pages"),
    ([LoadSegment(0, PAGE_SIZE + 1)], DIRECT_MAP, "whole pages"),
    ([LoadSegment(0, 2 * PAGE_SIZE), LoadSegment(PAGE_SIZE, PAGE_SIZE)], DIRECT_MAP, "overlaps"),
    ([LoadSegment(HIGH, PAGE_SIZE), LoadSegment(0, PAGE_SIZE)], DIRECT_MAP, "ascend"),
    ([LoadSegment(0, PAGE_SIZE)], DIRECT_MAP + 8, "page-aligned"),
    ([LoadSegment(HIGH, PAGE_SIZE)], (1 << 64) - HIGH, "64-bit"),
])
def test_core_header_rejects_bad_segments(segments: list[LoadSegment], page_offset: int,
                                          message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        core_header(segments, b"", page_offset=page_offset)
    assert "\n" not in str(err.value)


def test_core_header_rejects_notes_off_the_four_byte_grid() -> None:
    with pytest.raises(ValueError, match="4-byte"):
        core_header([LoadSegment(0, PAGE_SIZE)], b"abc")


def test_nonzero_runs_merge_neighbouring_pages() -> None:
    buf = bytearray(8 * PAGE_SIZE)
    for page in (1, 2, 3, 6):
        buf[page * PAGE_SIZE + (page * 97) % PAGE_SIZE] = page
    buf[-1] = 0xFF  # page 7, last byte
    zeros = bytes(len(buf))
    assert list(nonzero_runs(memoryview(buf), zeros)) == [
        (1 * PAGE_SIZE, 4 * PAGE_SIZE), (6 * PAGE_SIZE, 8 * PAGE_SIZE)]
    assert list(nonzero_runs(memoryview(bytes(len(buf))), zeros)) == []


# --- the file -------------------------------------------------------------------------------


def test_guest_memory_is_a_ram_source(memory: GuestMemory) -> None:
    source: RamSource = memory  # mypy checks the protocol; the test checks it runs
    assert [(r.gpa, r.size) for r in source.regions] == REGIONS


def test_each_segment_reads_back_as_guest_ram(memory: GuestMemory,
                                              written: vmcore.VmcoreStats) -> None:
    data = written.path.read_bytes()
    assert len(data) == written.size == PAGE_SIZE + 20 * MiB
    loads = _phdrs(data)[1:]
    assert [(p[4], p[5]) for p in loads] == REGIONS
    for _, _, offset, _, gpa, filesz, _, _ in loads:
        assert data[offset : offset + filesz] == memory.read(gpa, filesz)
    for gpa, pattern in PATTERNS.items():
        region = next(p for p in loads if p[4] <= gpa < p[4] + p[5])
        at = region[2] + gpa - region[4]
        assert data[at : at + len(pattern)] == pattern


def test_the_file_is_sparse(written: vmcore.VmcoreStats) -> None:
    assert written.data_written == len(TOUCHED_PAGES) * PAGE_SIZE
    on_disk = os.stat(written.path).st_blocks * 512
    assert on_disk < written.size // 20
    assert on_disk <= written.data_written + PAGE_SIZE + 256 * 1024  # header page, fs slack
    assert written.seconds > 0


def test_untouched_ram_at_the_end_is_a_hole_of_full_length(tmp_path: Path) -> None:
    with GuestMemory([(0, 8 * MiB)]) as mem:
        mem.write(0x1000, b"only this")
        stats = write_vmcore(tmp_path / "vmcore", mem, VMCOREINFO)
    assert os.stat(stats.path).st_size == stats.size == PAGE_SIZE + 8 * MiB
    with stats.path.open("rb") as f:
        f.seek(PAGE_SIZE + 0x1000)
        assert f.read(9) == b"only this"
        f.seek(stats.size - PAGE_SIZE)
        assert f.read() == bytes(PAGE_SIZE)
    assert stats.data_written == PAGE_SIZE


def test_the_vmcoreinfo_note_is_found_by_a_note_walk(written: vmcore.VmcoreStats) -> None:
    data = written.path.read_bytes()
    notes = [p for p in _phdrs(data) if p[0] == 4]
    assert len(notes) == 1
    offset, filesz = notes[0][2], notes[0][5]
    assert _walk_notes(data[offset : offset + filesz]) == [
        (b"VMCOREINFO", 0, VMCOREINFO.encode())]


def test_pyelftools_reads_the_header_and_the_note(written: vmcore.VmcoreStats) -> None:
    elffile = pytest.importorskip("elftools.elf.elffile", reason="pyelftools (the dev extra)")
    with written.path.open("rb") as f:
        elf = elffile.ELFFile(f)
        assert (elf["e_type"], elf["e_machine"], elf.elfclass, elf.little_endian) == (
            "ET_CORE", "EM_X86_64", 64, True)
        segments = list(elf.iter_segments())
        assert [s["p_type"] for s in segments] == ["PT_NOTE", "PT_LOAD", "PT_LOAD"]
        assert [(s["p_paddr"], s["p_vaddr"], s["p_filesz"]) for s in segments[1:]] == [
            (gpa, DIRECT_MAP + gpa, size) for gpa, size in REGIONS]
        assert all(s["p_offset"] % PAGE_SIZE == 0 for s in segments[1:])
        [note] = list(segments[0].iter_notes())
        assert (note["n_name"], note["n_type"], note["n_descdata"]) == (
            "VMCOREINFO", 0, VMCOREINFO.encode())


def test_drgn_opens_it_as_a_kernel_core(memory: GuestMemory,
                                        written: vmcore.VmcoreStats) -> None:
    drgn = pytest.importorskip("drgn", reason="drgn is not installed")
    prog = drgn.Program()
    prog.set_core_dump(str(written.path))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL  # it took the VMCOREINFO note
    for gpa, pattern in PATTERNS.items():
        assert prog.read(gpa, len(pattern), True) == pattern
        assert prog.read(DIRECT_MAP + gpa, len(pattern)) == pattern
    assert prog.read(0x40_0000, 64, True) == bytes(64)  # a hole reads as zeros
    with pytest.raises(drgn.FaultError):
        prog.read(16 * MiB, 1, True)  # the gap between the regions is in no segment


def test_drgn_reads_the_note_text(memory: GuestMemory, tmp_path: Path) -> None:
    """drgn parses the note's lines: without swapper_pg_dir it refuses the core."""
    drgn = pytest.importorskip("drgn", reason="drgn is not installed")
    path = write_vmcore(tmp_path / "vmcore", memory, "OSRELEASE=6.12.0\nPAGESIZE=4096\n").path
    with pytest.raises(drgn.BadDataError, match="swapper_pg_dir"):
        drgn.Program().set_core_dump(str(path))


def test_page_offset_sets_the_virtual_addresses(memory: GuestMemory, tmp_path: Path) -> None:
    stats = write_vmcore(tmp_path / "vmcore", memory, VMCOREINFO,
                         page_offset=0xFF11_0000_0000_0000)  # the 5-level direct map
    loads = _phdrs(stats.path.read_bytes())[1:]
    assert [p[3] for p in loads] == [0xFF11_0000_0000_0000 + gpa for gpa, _ in REGIONS]


def test_an_existing_core_is_replaced_whole(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(b"\xee" * (32 * MiB))  # longer than the new core, and not zero
    stats = write_vmcore(path, memory, VMCOREINFO)
    data = path.read_bytes()
    assert len(data) == stats.size
    offset, filesz, gpa = _phdrs(data)[1][2], _phdrs(data)[1][5], _phdrs(data)[1][4]
    assert data[offset : offset + filesz] == memory.read(gpa, filesz)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmcore"]


# --- bad input and failures -----------------------------------------------------------------


@dataclass
class Ram:
    """A RamSource over a real GuestMemory that can list other regions or fail partway."""

    memory: GuestMemory
    listed: Sequence[RamRegion] | None = None
    fail_at_view: int | None = None
    short: bool = False
    views: int = 0
    seen_in_dir: list[str] = field(default_factory=list)
    watch: Path | None = None

    @property
    def regions(self) -> Sequence[RamRegion]:
        return self.memory.regions if self.listed is None else self.listed

    def view(self, gpa: int, length: int) -> memoryview:
        self.views += 1
        if self.views == self.fail_at_view:
            if self.watch is not None:
                self.seen_in_dir = sorted(p.name for p in self.watch.iterdir())
            raise OSError(errno.EIO, "guest RAM went away")
        window = self.memory.view(gpa, length)
        return window[: length - 1] if self.short else window


@pytest.mark.parametrize(("listed", "message"), [
    ((), "at least one RAM region"),
    ((MemRegion(0, 2 * MiB, 0), MemRegion(MiB, MiB, 0)), "overlaps"),
    ((MemRegion(0x10, MiB, 0),), "whole pages"),
])
def test_bad_regions_raise_before_any_file_exists(memory: GuestMemory, tmp_path: Path,
                                                  listed: tuple[MemRegion, ...],
                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_vmcore(tmp_path / "vmcore", Ram(memory, listed=listed), VMCOREINFO)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("text", "message"), [
    ("OSRELEASE=6.12.0\nPAGESIZE=4096\n\xb5\n", "ASCII"),
    ("OSRELEASE=6.12.0\0\n", "NUL"),
    ("OSRELEASE=6.12.0\nPAGESIZE=4096", "newline"),
    ("", "newline"),
])
def test_bad_vmcoreinfo_raises_one_line(memory: GuestMemory, tmp_path: Path, text: str,
                                        message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        write_vmcore(tmp_path / "vmcore", memory, text)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_an_error_mid_write_leaves_nothing_behind(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "vmcore"
    ram = Ram(memory, fail_at_view=5, watch=tmp_path)  # chunks 0-3 are written by then
    with pytest.raises(OSError, match="guest RAM went away"):
        write_vmcore(path, ram, VMCOREINFO)
    assert len(ram.seen_in_dir) == 1 and ram.seen_in_dir[0].startswith(".ktstr-vmcore-")
    assert list(tmp_path.iterdir()) == []


def test_an_error_mid_write_keeps_the_previous_core(memory: GuestMemory,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(b"the previous core")
    with pytest.raises(OSError, match="guest RAM went away"):
        write_vmcore(path, Ram(memory, fail_at_view=18), VMCOREINFO)  # in the high region
    assert path.read_bytes() == b"the previous core"
    assert [p.name for p in tmp_path.iterdir()] == ["vmcore"]


def test_a_short_view_is_refused(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not the 1048576 asked for"):
        write_vmcore(tmp_path / "vmcore", Ram(memory, short=True), VMCOREINFO)
    assert list(tmp_path.iterdir()) == []
