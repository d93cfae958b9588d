"""bzImage parsing, the zero page, e820, initrd placement and the command line."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest

from ktstr import bzimage
from ktstr.errors import KtstrError
from ktstr.vmm import layout, loader
from ktstr.vmm.layout import GiB, MiB


def _cached_bzimage() -> Path | None:
    """A bzImage from the kernel cache, if one is built (never builds one)."""
    from ktstr.kernel import list_entries

    return next((e.bzimage for e in list_entries() if e.bzimage.is_file()), None)


REAL_BZIMAGE = _cached_bzimage()


def synthetic_bzimage(
    *,
    protocol: int = 0x020F,
    xloadflags: int = bzimage.XLF_KERNEL_64,
    setup_sects: int = 2,
    payload: bytes = b"\x90" * 4096,
) -> bytes:
    """A minimal image with a valid 2.15 setup header and a fake payload."""
    sects = setup_sects or 4
    data = bytearray((sects + 1) * 512)
    data[0x1F1] = setup_sects
    struct.pack_into("<I", data, 0x1F4, len(payload) // 16)  # syssize
    struct.pack_into("<H", data, 0x1FE, 0xAA55)
    data[0x200] = 0xEB
    data[0x201] = 0x6A  # header ends at 0x202 + 0x6a = 0x26c
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, protocol)
    data[0x211] = 0x01  # LOADED_HIGH as set by the build
    struct.pack_into("<I", data, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", data, 0x230, 0x200000)  # kernel_alignment
    data[0x234] = 1  # relocatable
    struct.pack_into("<H", data, 0x236, xloadflags)
    struct.pack_into("<I", data, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", data, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", data, 0x260, 0x2000000)  # init_size
    return bytes(data) + payload


def test_parse_synthetic() -> None:
    payload = bytes(range(256)) * 32
    bz = bzimage.parse_bzimage(synthetic_bzimage(payload=payload))
    assert bz.setup_sects == 2
    assert bz.protocol == 0x020F and bz.protocol_text == "2.15"
    assert bz.pref_address == 0x1000000
    assert bz.init_size == 0x2000000
    assert bz.cmdline_size == 2047
    assert bz.initrd_addr_max == 0x7FFFFFFF
    assert bz.payload == payload  # starts at (2 + 1) * 512
    assert len(bz.setup_header) == 0x26C - 0x1F1
    assert bz.setup_header[0x202 - 0x1F1 :][:4] == b"HdrS"
    # Decompression happens at pref_address, so the footprint ends at 16 + 32 MiB.
    assert bz.kernel_end() == 0x3000000


def test_setup_sects_zero_means_four() -> None:
    payload = b"\xcc" * 1024
    bz = bzimage.parse_bzimage(synthetic_bzimage(setup_sects=0, payload=payload))
    assert bz.setup_sects == 4
    assert bz.payload == payload


def test_not_a_bzimage() -> None:
    with pytest.raises(KtstrError, match="not a bzImage"):
        bzimage.parse_bzimage(b"\x7fELF" + bytes(4096))


def test_old_protocol() -> None:
    with pytest.raises(KtstrError, match=r"2\.11 is too old"):
        bzimage.parse_bzimage(synthetic_bzimage(protocol=0x020B))


def test_no_64bit_entry() -> None:
    with pytest.raises(KtstrError, match="XLF_KERNEL_64"):
        bzimage.parse_bzimage(synthetic_bzimage(xloadflags=0))


@pytest.mark.parametrize("cut", [0x250, 3 * 512 + 100])
def test_truncated(cut: int) -> None:
    with pytest.raises(KtstrError, match="truncated"):
        bzimage.parse_bzimage(synthetic_bzimage()[:cut])


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match="does not exist"):
        bzimage.load_bzimage(tmp_path / "nope")
    with pytest.raises(KtstrError, match="is a directory"):
        bzimage.load_bzimage(tmp_path)


def _check_zero_page(bz: bzimage.BzImage, image: bytes) -> None:
    regions = layout.ram_regions(2 * GiB)
    e820 = loader.build_e820(regions)
    cmdline = loader.encode_cmdline("console=ttyS0 nokaslr", bz.cmdline_size)
    initrd = loader.place_initrd(regions, 5 * MiB, bz.initrd_addr_max, bz.kernel_end())
    bp = loader.build_boot_params(
        bz,
        cmdline_addr=layout.CMDLINE_ADDR,
        cmdline_size=len(cmdline),
        initrd_addr=initrd,
        initrd_size=5 * MiB,
        e820=e820,
        rsdp_addr=layout.ACPI_ADDR,
    )
    assert len(bp) == 4096
    (rsdp,) = struct.unpack_from("<Q", bp, 0x070)
    assert rsdp == layout.ACPI_ADDR
    assert bp[0x1E8] == len(e820) == 3
    # Header copied verbatim, apart from the fields the loader owns.
    hdr_len = len(bz.setup_header)
    assert bp[0x1F1:0x210] == image[0x1F1:0x210]
    assert bp[0x202:0x206] == b"HdrS"
    assert bp[0x22C : 0x1F1 + hdr_len] == image[0x22C : 0x1F1 + hdr_len]
    assert bp[0x210] == 0xFF
    assert bp[0x211] & 0x81 == 0x81
    assert struct.unpack_from("<H", bp, 0x224)[0] == loader.HEAP_END_PTR
    assert struct.unpack_from("<I", bp, 0x218)[0] == initrd
    assert struct.unpack_from("<I", bp, 0x21C)[0] == 5 * MiB
    assert struct.unpack_from("<I", bp, 0x228)[0] == layout.CMDLINE_ADDR
    assert struct.unpack_from("<III", bp, 0xC0) == (0, 0, 0)  # nothing above 4 GiB
    assert struct.unpack_from("<I", bp, 0x260)[0] == bz.init_size
    for i, entry in enumerate(e820):
        assert struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) == (
            entry.addr,
            entry.size,
            entry.type,
        )
    assert bp[0x2D0 + 20 * len(e820) : 0x2D0 + 20 * 128] == bytes(20 * (128 - len(e820)))


def test_boot_params_synthetic() -> None:
    image = synthetic_bzimage()
    _check_zero_page(bzimage.parse_bzimage(image), image)


@pytest.mark.skipif(REAL_BZIMAGE is None, reason="no kernel in the cache (ktstr kernel build)")
def test_boot_params_real_bzimage() -> None:
    assert REAL_BZIMAGE is not None
    image = REAL_BZIMAGE.read_bytes()
    bz = bzimage.load_bzimage(REAL_BZIMAGE)
    assert bz.protocol >= 0x020C
    assert bz.xloadflags & bzimage.XLF_KERNEL_64
    assert bz.cmdline_size >= 255
    assert bz.payload[:16] == image[(bz.setup_sects + 1) * 512 :][:16]
    _check_zero_page(bz, image)


def test_boot_params_high_addresses_use_ext_fields() -> None:
    bz = bzimage.parse_bzimage(synthetic_bzimage())
    bp = loader.build_boot_params(
        bz,
        cmdline_addr=0x1_2000_0000,
        cmdline_size=10,
        initrd_addr=0x1_4000_0000,
        initrd_size=0x1000,
        e820=[],
        rsdp_addr=0,
    )
    assert struct.unpack_from("<III", bp, 0xC0) == (1, 0, 1)
    assert struct.unpack_from("<I", bp, 0x218)[0] == 0x4000_0000
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x2000_0000


def test_boot_params_rejects_long_cmdline() -> None:
    bz = bzimage.parse_bzimage(synthetic_bzimage())
    with pytest.raises(KtstrError, match="command line"):
        loader.build_boot_params(bz, cmdline_addr=layout.CMDLINE_ADDR, cmdline_size=2049, e820=[])


def _assert_sane(e820: list[loader.E820Entry]) -> None:
    assert e820 == sorted(e820)
    for before, after in itertools.pairwise(e820):
        assert before.end <= after.addr
    for entry in e820:
        assert entry.size > 0
        for lo, hi in [(layout.MMIO_GAP_START, layout.MMIO_GAP_END)]:
            assert entry.end <= lo or entry.addr >= hi, f"{entry} overlaps the MMIO gap"


def test_e820_small_vm() -> None:
    e820 = loader.build_e820(layout.ram_regions(2 * GiB))
    _assert_sane(e820)
    assert e820[0] == loader.E820Entry(0, 0x9FC00, 1)
    assert e820[1] == loader.E820Entry(0x9FC00, 0x100000 - 0x9FC00, 2)
    assert e820[2] == loader.E820Entry(0x100000, 2 * GiB - 0x100000, 1)


def test_e820_large_vm_has_gap_and_reserved_windows() -> None:
    regions = layout.ram_regions(6 * GiB)
    window = (0xBFF0_0000, 0x10_0000)
    e820 = loader.build_e820(regions, reserved=[window])
    _assert_sane(e820)
    ram = [e for e in e820 if e.type == 1]
    reserved = [e for e in e820 if e.type == 2]
    assert sum(e.size for e in ram) == 6 * GiB - (0x100000 - 0x9FC00) - window[1]
    assert loader.E820Entry(*window, 2) in reserved
    assert ram[-1] == loader.E820Entry(4 * GiB, 3 * GiB, 1)
    # Nothing claims the IOAPIC/LAPIC pages: they are in the hole.
    for addr in (layout.IOAPIC_ADDR, layout.LAPIC_ADDR):
        assert not any(e.addr <= addr < e.end for e in e820)


def test_e820_rejects_window_outside_ram() -> None:
    with pytest.raises(KtstrError, match="not inside usable guest RAM"):
        loader.build_e820(layout.ram_regions(1 * GiB), reserved=[(layout.LAPIC_ADDR, 0x1000)])


def test_place_initrd_highest_aligned() -> None:
    regions = layout.ram_regions(2 * GiB)
    addr = loader.place_initrd(regions, 10 * MiB + 123, 0x7FFFFFFF, 0x3000000)
    assert addr % 4096 == 0
    assert addr + 10 * MiB + 123 <= 2 * GiB
    assert 2 * GiB - (addr + 10 * MiB + 123) < 4096


def test_place_initrd_respects_addr_max_and_reserved() -> None:
    regions = layout.ram_regions(6 * GiB)
    assert loader.place_initrd(regions, MiB, 0x7FFFFFFF, 0x3000000) == 0x80000000 - MiB
    top = layout.MMIO_GAP_START
    assert loader.place_initrd(regions, MiB, 0xFFFFFFFF, 0x3000000) == top - MiB
    reserved = [(top - 2 * MiB, 2 * MiB)]
    got = loader.place_initrd(regions, MiB, 0xFFFFFFFF, 0x3000000, reserved=reserved)
    assert got == top - 3 * MiB


def test_place_initrd_too_big() -> None:
    with pytest.raises(KtstrError, match="does not fit"):
        loader.place_initrd(layout.ram_regions(128 * MiB), 120 * MiB, 0x7FFFFFFF, 0x3000000)


def test_encode_cmdline() -> None:
    assert loader.encode_cmdline("a b", 10) == b"a b\0"
    assert loader.encode_cmdline("x" * 10, 10) == b"x" * 10 + b"\0"
    with pytest.raises(KtstrError, match="at most 10"):
        loader.encode_cmdline("x" * 11, 10)
    with pytest.raises(KtstrError, match="NUL"):
        loader.encode_cmdline("a\0b", 10)
