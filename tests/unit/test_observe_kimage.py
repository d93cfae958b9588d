"""Finding the guest kernel in RAM and the VMCOREINFO the host writes for drgn."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktstr.observe.kimage import (
    KernelImage,
    ObserveError,
    build_id_from_notes,
    kernel_phys,
    locate,
    read_symbols,
    vmlinux_build_id,
)
from ktstr.observe.vmcore import elf_note
from ktstr.vmm.memory import GuestMemory

BUILD_ID = bytes(range(20))
SYMS = {
    "init_top_pgt": 0xFFFFFFFF81E2B000, "init_uts_ns": 0xFFFFFFFF81F54040,
    "linux_banner": 0xFFFFFFFF818A85C0, "__start_notes": 0xFFFFFFFF81A5AFDC,
    "__stop_notes": 0xFFFFFFFF81A5B030, "__pgtable_l5_enabled": 0xFFFFFFFF81A43208,
    "page_offset_base": 0xFFFFFFFF81A431F8, "phys_base": 0xFFFFFFFF81E32010,
}


def _system_map(tmp_path: Path, names: dict[str, int]) -> Path:
    path = tmp_path / "System.map"
    lines = [f"{addr:016x} D {name}" for name, addr in names.items()]
    path.write_text("\n".join(["ffffffff81000000 T _stext", *lines, "garbage line"]) + "\n")
    return path


def _guest(*, banner: bytes = b"Linux version 6.12.117 (ktstr) #1 SMP", l5: int = 0,
           build_id: bytes = BUILD_ID) -> GuestMemory:
    mem = GuestMemory([(0, 64 << 20)])
    mem.write(kernel_phys(SYMS["linux_banner"]), banner + b"\0")
    notes = elf_note(b"Xen", 1, b"\1\2\3\4") + elf_note(b"GNU", 3, build_id)
    mem.write(kernel_phys(SYMS["__start_notes"]), notes)
    mem.write(kernel_phys(SYMS["__pgtable_l5_enabled"]), l5.to_bytes(4, "little"))
    mem.write(kernel_phys(SYMS["page_offset_base"]),
              (0xFF11000000000000 if l5 else 0xFFFF888000000000).to_bytes(8, "little"))
    return mem


def test_system_map_gives_the_symbols_the_host_needs(tmp_path: Path) -> None:
    assert read_symbols(_system_map(tmp_path, SYMS)) == SYMS


def test_a_map_without_the_page_tables_is_refused(tmp_path: Path) -> None:
    partial = {k: v for k, v in SYMS.items() if k != "init_top_pgt"}
    with pytest.raises(ObserveError, match="lacks init_top_pgt"):
        read_symbols(_system_map(tmp_path, partial))
    with pytest.raises(ObserveError, match="cannot read"):
        read_symbols(tmp_path / "missing")


def test_build_id_is_found_among_other_notes() -> None:
    notes = elf_note(b"Linux", 6, b"abcd") + elf_note(b"GNU", 3, BUILD_ID)
    assert build_id_from_notes(notes) == BUILD_ID
    assert build_id_from_notes(notes[:-4]) is None  # truncated: nothing, not garbage
    assert build_id_from_notes(b"\xff" * 40) is None


def test_vmlinux_build_id_matches_pyelftools() -> None:
    elftools = pytest.importorskip("elftools.elf.elffile")
    binary = Path("/bin/true").resolve()
    with binary.open("rb") as fh:
        elf = elftools.ELFFile(fh)
        expected = next(n["n_desc"] for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"
                        for n in seg.iter_notes() if n["n_type"] == "NT_GNU_BUILD_ID")
    assert vmlinux_build_id(binary) == bytes.fromhex(expected)


def test_locate_reads_release_paging_mode_and_checks_the_build_id() -> None:
    with _guest(l5=1) as mem:
        image = locate(mem, SYMS, BUILD_ID)
    assert image.osrelease == "6.12.117" and image.pgtable_l5
    assert image.page_offset == 0xFF11000000000000 and image.phys_base == 0
    text = image.vmcoreinfo()
    assert f"SYMBOL(swapper_pg_dir)={SYMS['init_top_pgt']:x}\n" in text
    assert "OSRELEASE=6.12.117\n" in text and "NUMBER(pgtable_l5_enabled)=1\n" in text
    assert f"BUILD-ID={BUILD_ID.hex()}\n" in text and text.endswith("\n")


def test_locate_refuses_another_kernel_and_a_guest_not_booted_yet() -> None:
    with _guest(build_id=b"\x99" * 20) as mem, pytest.raises(ObserveError, match="is not the"):
        locate(mem, SYMS, BUILD_ID)
    with _guest(banner=b"\0" * 16) as mem, pytest.raises(ObserveError, match="not in place"):
        locate(mem, SYMS, BUILD_ID)
    small = GuestMemory([(0, 4 << 20)])  # the symbols lie past the end of RAM
    with small, pytest.raises(ObserveError, match="not in guest RAM"):
        locate(small, SYMS, BUILD_ID)


def test_drgn_accepts_the_vmcoreinfo_as_a_kernel() -> None:
    drgn = pytest.importorskip("drgn")
    image = KernelImage("6.12.117", BUILD_ID, SYMS, 0, False, 0xFFFF888000000000)
    prog = drgn.Program(drgn.Platform(drgn.Architecture.X86_64,
                                      drgn.PlatformFlags.IS_64_BIT
                                      | drgn.PlatformFlags.IS_LITTLE_ENDIAN))
    prog.set_linux_kernel_custom(image.vmcoreinfo(), True)
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL


IMAGE_VERSION = "6.12.118 (root@vm) #1 SMP Fri Dec  4 04:17:34 UTC 2026"
BANNER_TEXT = ("Linux version 6.12.118 (root@vm) (gcc (Debian 12.2.0-14) 12.2.0, GNU ld 2.40) "
               "#1 SMP Fri Dec  4 04:17:34 UTC 2026\n")


def _elf_with_load(path: Path, vaddr: int, payload: bytes) -> Path:
    """A minimal ELF64 with one PT_LOAD of ``payload`` at ``vaddr`` (file offset 0x1000)."""
    import struct

    ehdr = bytearray(64)
    ehdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", ehdr, 32, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 54, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 1, 4, 0x1000, vaddr, vaddr, len(payload), len(payload), 0)
    data = bytes(ehdr) + phdr
    path.write_bytes(data + bytes(0x1000 - len(data)) + payload)
    return path


def test_the_vmlinux_banner_is_read_where_system_map_puts_it(tmp_path: Path) -> None:
    from ktstr.observe.kimage import vmlinux_banner

    base = 0xFFFFFFFF81000000
    elf = _elf_with_load(tmp_path / "vmlinux", base,
                         b"x" * 0x40 + BANNER_TEXT.encode() + b"\0tail")
    assert vmlinux_banner(elf, base + 0x40) == BANNER_TEXT
    assert vmlinux_banner(elf, base - 8) is None  # in no segment: unknown, not garbage
    (tmp_path / "short").write_bytes(b"\x7fELF\x02" + bytes(10))
    with pytest.raises(ObserveError, match="truncated"):
        vmlinux_banner(tmp_path / "short", base)


def test_a_vmlinux_of_another_build_is_told_apart_by_its_banner() -> None:
    from ktstr.observe.kimage import banner_mismatch

    assert banner_mismatch(BANNER_TEXT, IMAGE_VERSION) is None
    assert banner_mismatch(None, IMAGE_VERSION) is None  # unknown is not a mismatch
    assert banner_mismatch(BANNER_TEXT, None) is None
    rebuilt = IMAGE_VERSION.replace("04:17:34", "05:00:01")  # same tree, built again
    assert "the booted bzImage is '6.12.118" in (banner_mismatch(BANNER_TEXT, rebuilt) or "")
    other = IMAGE_VERSION.replace("6.12.118", "6.6.60")
    assert banner_mismatch(BANNER_TEXT, other) is not None
    assert "not a kernel banner" in (banner_mismatch("garbage", IMAGE_VERSION) or "")


def test_a_bzimage_carries_its_version_string() -> None:
    import struct

    from ktstr.bzimage import kernel_version

    data = bytearray(0x4000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x3000 - 0x200)
    data[0x3000:0x3000 + len(IMAGE_VERSION) + 1] = IMAGE_VERSION.encode() + b"\0"
    assert kernel_version(bytes(data)) == IMAGE_VERSION
    struct.pack_into("<H", data, 0x20E, 0)
    assert kernel_version(bytes(data)) is None  # no string: unknown
    assert kernel_version(b"not a kernel") is None
    struct.pack_into("<H", data, 0x20E, 0xFFFF)  # points past the end: nothing, no raise
    assert kernel_version(bytes(data)) is None


class _UntouchableRam:
    def read(self, gpa: int, length: int) -> bytes:
        raise AssertionError("guest RAM was read")

    def contains(self, gpa: int, length: int = 1) -> bool:
        raise AssertionError("guest RAM was read")


def test_the_observer_refuses_a_vmlinux_of_another_build_before_reading_the_guest(
        tmp_path: Path) -> None:
    import struct
    from types import SimpleNamespace

    from ktstr.observe.monitor import GuestObserver
    from ktstr.observe.program import KernelFiles

    _elf_with_load(tmp_path / "vmlinux", SYMS["linux_banner"], BANNER_TEXT.encode() + b"\0")
    _system_map(tmp_path, SYMS)
    image = bytearray(0x4000)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x20E, 0x3000 - 0x200)
    rebuilt = IMAGE_VERSION.replace("04:17:34", "05:00:01").encode()
    image[0x3000:0x3000 + len(rebuilt)] = rebuilt
    (tmp_path / "bzImage").write_bytes(bytes(image))
    observer = GuestObserver(KernelFiles.of_entry(tmp_path), kernel=tmp_path / "bzImage", hz=100)
    observer._machine = SimpleNamespace(memory=_UntouchableRam(), vcpus=[])  # type: ignore[assignment]
    observer._main()
    [problem] = observer.observation.problems
    assert "is not the booted kernel" in problem and "05:00:01" in problem
    assert "goes on without the observer" in problem
    cost = observer.observation.cost.record()
    assert cost["life_s"] is not None and cost["vcpu_cpu_s"] is None  # it never sampled
