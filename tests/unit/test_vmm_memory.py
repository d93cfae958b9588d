"""GuestMemory: bounds-checked guest-physical access that never escapes guest RAM."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktstr.meminfo import free_hugetlb_bytes
from ktstr.vmm import layout
from ktstr.vmm.memory import HUGE_PAGE, GuestMemory, GuestMemoryError, thp_unavailable

SIZE = 4 * layout.GiB  # low 3 GiB + 1 GiB above 4 GiB; MAP_NORESERVE makes this cheap


@pytest.fixture(scope="module")
def mem() -> GuestMemory:
    memory = GuestMemory.for_size(SIZE)
    yield memory
    memory.close()


def _inside(gpa: int, length: int) -> bool:
    return any(
        start <= gpa and gpa + length <= start + size for start, size in layout.ram_regions(SIZE)
    )


def test_regions_split_around_the_gap(mem: GuestMemory) -> None:
    assert [(r.gpa, r.size) for r in mem.regions] == [
        (0, layout.MMIO_GAP_START),
        (layout.MMIO_GAP_END, SIZE - layout.MMIO_GAP_START),
    ]
    assert mem.size == SIZE


def test_round_trip_both_sides_of_the_gap(mem: GuestMemory) -> None:
    for gpa in (0, 0x1234, layout.MMIO_GAP_START - 8, layout.MMIO_GAP_END, mem.regions[1].end - 4):
        mem.write(gpa, b"\x01\x02\x03\x04")
        assert mem.read(gpa, 4) == b"\x01\x02\x03\x04"
        assert bytes(mem.view(gpa, 4)) == b"\x01\x02\x03\x04"


def test_regions_are_distinct_host_memory(mem: GuestMemory) -> None:
    mem.write(0, b"low!")
    mem.write(layout.MMIO_GAP_END, b"high")
    assert mem.read(0, 4) == b"low!"


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (layout.MMIO_GAP_START, 1),
        (layout.MMIO_GAP_START - 2, 4),
        (layout.LAPIC_ADDR, 4),
        (layout.MMIO_GAP_END - 1, 2),
        (layout.MMIO_GAP_END + SIZE, 1),
        (-1, 1),
        (0, -1),
        (2**64, 1),
    ],
)
def test_outside_ram_raises(mem: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)


_addresses = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**65),
    st.sampled_from(
        [0, layout.MMIO_GAP_START, layout.MMIO_GAP_END, SIZE, SIZE + layout.GiB]
    ).flatmap(lambda a: st.integers(min_value=a - 4096, max_value=a + 4096)),
)
_lengths = st.one_of(
    st.integers(min_value=-8, max_value=8192), st.integers(min_value=0, max_value=2**64)
)


@settings(max_examples=400, deadline=None)
@given(gpa=_addresses, length=_lengths)
def test_hostile_ranges_never_escape(mem: GuestMemory, gpa: int, length: int) -> None:
    if _inside(gpa, length) and length >= 0 and gpa >= 0:
        view = mem.view(gpa, length)
        assert len(view) == length
        if length:
            mem.write(gpa, b"\xaa" * min(length, 16))
    else:
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, length)
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)
        if 0 < length <= 8192:
            with pytest.raises(GuestMemoryError):
                mem.write(gpa, b"\0" * length)


def test_closed_memory_refuses_access() -> None:
    memory = GuestMemory([(0, 0x10000)])
    memory.write(0, b"x")
    memory.close()
    with pytest.raises(GuestMemoryError):
        memory.read(0, 1)
    memory.close()  # idempotent


def test_bad_regions_rejected() -> None:
    with pytest.raises(ValueError):
        GuestMemory([(0, 0x1001)])
    with pytest.raises(ValueError):
        GuestMemory([(0, 0x2000), (0x1000, 0x1000)])


# ---- 2 MB pages (performance mode) ----------------------------------------------------


def test_free_hugetlb_pages_are_read_from_meminfo(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal: 1000 kB\nHugePages_Free:      3\nHugepagesize:    2048 kB\n")
    assert free_hugetlb_bytes(HUGE_PAGE, info) == 3 * HUGE_PAGE
    info.write_text("HugePages_Free: 3\nHugepagesize: 1048576 kB\n")  # 1 GB default pages
    assert free_hugetlb_bytes(HUGE_PAGE, info) == 0
    assert free_hugetlb_bytes(HUGE_PAGE, tmp_path / "missing") == 0


def test_thp_availability_says_why_not(tmp_path: Path) -> None:
    enabled = tmp_path / "enabled"
    assert "no CONFIG_TRANSPARENT_HUGEPAGE" in (thp_unavailable(enabled) or "")
    enabled.write_text("always madvise [never]\n")
    assert "never" in (thp_unavailable(enabled) or "")
    enabled.write_text("always [madvise] never\n")
    assert thp_unavailable(enabled) is None


def test_huge_page_backing_is_aligned_and_counted() -> None:
    if thp_unavailable() is not None:
        pytest.skip(f"this host cannot give THP: {thp_unavailable()}")
    with GuestMemory.for_size(64 * layout.MiB, hugepages=True) as m:
        assert m.backing == "thp" and m.host_addr % HUGE_PAGE == 0
        m.write(0, b"\1" * (16 * layout.MiB))
        assert m.read(16 * layout.MiB - 1, 2) == b"\1\0"
        assert (m.huge_kb() or 0) >= 8 * 1024, m.huge_kb()
        with pytest.raises(GuestMemoryError):
            m.read(64 * layout.MiB, 1)  # the spare huge page is not guest RAM
    with GuestMemory.for_size(64 * layout.MiB) as plain:
        assert plain.backing == "4k" and plain.backing_note == ""
