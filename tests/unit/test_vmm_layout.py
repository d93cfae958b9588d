"""The guest memory map: RAM split around the MMIO gap, no overlapping windows."""

from __future__ import annotations

import itertools

import pytest

from ktstr.errors import KtstrError
from ktstr.vmm import layout
from ktstr.vmm.layout import GiB, MiB


def test_ram_below_gap_is_one_region() -> None:
    assert layout.ram_regions(2048 * MiB) == [(0, 2048 * MiB)]


def test_ram_exactly_up_to_gap() -> None:
    assert layout.ram_regions(3 * GiB) == [(0, 3 * GiB)]


def test_ram_beyond_gap_continues_at_4g() -> None:
    regions = layout.ram_regions(5 * GiB)
    assert regions == [(0, layout.MMIO_GAP_START), (4 * GiB, 5 * GiB - layout.MMIO_GAP_START)]
    assert sum(size for _, size in regions) == 5 * GiB
    for gpa, size in regions:
        assert gpa + size <= layout.MMIO_GAP_START or gpa >= layout.MMIO_GAP_END


@pytest.mark.parametrize("size", [0, 1 * MiB, layout.MIN_MEMORY_BYTES + 1])
def test_ram_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(KtstrError):
        layout.ram_regions(size)


def test_low_memory_windows_do_not_overlap() -> None:
    windows = [
        (layout.GDT_ADDR, layout.GDT_MAX_SIZE),
        (layout.IDT_ADDR, layout.IDT_SIZE),
        (layout.ZERO_PAGE_ADDR, 0x1000),
        (layout.PAGE_TABLES_ADDR, layout.PAGE_TABLES_END - layout.PAGE_TABLES_ADDR),
        (layout.CMDLINE_ADDR, layout.CMDLINE_MAX_SIZE),
        (layout.MPTABLE_ADDR, layout.MPTABLE_MAX_SIZE),
        (layout.ACPI_ADDR, layout.ACPI_MAX_SIZE),
    ]
    windows.sort()
    for (a, alen), (b, _) in itertools.pairwise(windows):
        assert a + alen <= b, f"{a:#x}+{alen:#x} overlaps {b:#x}"
    assert windows[-1][0] + windows[-1][1] <= layout.KERNEL_LOAD_ADDR
    # The stack lives between the zero page and the page tables.
    assert layout.ZERO_PAGE_ADDR + 0x1000 < layout.BOOT_STACK_TOP <= layout.PAGE_TABLES_ADDR


def test_mmio_windows_inside_gap_and_disjoint() -> None:
    last_gpa, _ = layout.virtio_mmio_slot(layout.VIRTIO_MMIO_SLOTS - 1)
    windows = sorted(
        [
            (layout.VIRTIO_MMIO_BASE, last_gpa + layout.VIRTIO_MMIO_SLOT_SIZE),
            (layout.IOAPIC_ADDR, layout.IOAPIC_ADDR + layout.IOAPIC_SIZE),
            (layout.LAPIC_ADDR, layout.LAPIC_ADDR + layout.LAPIC_SIZE),
            (layout.KVM_IDENTITY_MAP_ADDR, layout.KVM_IDENTITY_MAP_ADDR + 0x1000),
            (layout.KVM_TSS_ADDR, layout.KVM_TSS_ADDR + 3 * 0x1000),
        ]
    )
    for start, end in windows:
        assert layout.MMIO_GAP_START <= start < end <= layout.MMIO_GAP_END
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end <= start


def test_virtio_irqs_avoid_fixed_devices() -> None:
    irqs = layout.VIRTIO_MMIO_IRQS
    assert len(set(irqs)) == len(irqs)
    fixed = {0, 1, 2, layout.COM1_IRQ, layout.COM2_IRQ, 8, layout.SCI_IRQ}
    assert not fixed & set(irqs)
    assert max(irqs) < layout.IOAPIC_PINS
    assert layout.virtio_mmio_slot(0) == (layout.VIRTIO_MMIO_BASE, 5)
    with pytest.raises(KtstrError):
        layout.virtio_mmio_slot(layout.VIRTIO_MMIO_SLOTS)


def test_ports_are_distinct() -> None:
    ports = [
        *range(layout.COM1_PORT, layout.COM1_PORT + layout.UART_PORT_COUNT),
        *range(layout.COM2_PORT, layout.COM2_PORT + layout.UART_PORT_COUNT),
        layout.I8042_DATA_PORT,
        layout.I8042_COMMAND_PORT,
        layout.BOOT_PORT,
        layout.EXIT_PORT,
        *range(layout.PM1A_EVT_PORT, layout.PM1A_EVT_PORT + layout.PM1_EVT_LEN),
        *range(layout.PM1A_CNT_PORT, layout.PM1A_CNT_PORT + layout.PM1_CNT_LEN),
    ]
    assert len(ports) == len(set(ports))


def test_poweroff_value_matches_linux_legacy_sleep() -> None:
    # acpi_hw_legacy_sleep: SLP_TYP in bits 10..12, SLP_EN is bit 13
    assert layout.PM1_POWEROFF_VALUE == (5 << 10) | (1 << 13) == 0x3400
    assert layout.pm1_control_is_poweroff(0x3400)
    assert not layout.pm1_control_is_poweroff(5 << 10)  # SLP_TYP is written alone first
