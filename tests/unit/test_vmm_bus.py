"""PIO bus dispatch cache, ACPI PM1 register model, exit-site names."""

from __future__ import annotations

from ktstr.vmm import layout
from ktstr.vmm.bus import PioBus
from ktstr.vmm.devices.bootport import SleepControl
from ktstr.vmm.vcpu import SITE_IO_IN, SITE_IO_OUT, SITE_MMIO_WRITE, site_name, site_summary


class Dev:
    def pio_read(self, port: int, size: int) -> bytes:
        return bytes([port & 0xFF]) * size

    def pio_write(self, port: int, data: bytes) -> None:
        pass


def test_device_for_respects_ranges_and_sees_later_additions() -> None:
    bus = PioBus()
    a = Dev()
    bus.add(0x3F8, 8, a)
    assert bus.device_for(0x3F8, 1) is a
    assert bus.device_for(0x3FF, 1) is a
    assert bus.device_for(0x3FF, 2) is None  # runs past the end of the range
    assert bus.device_for(0x2F8, 1) is None  # cached as absent ...
    b = Dev()
    bus.add(0x2F8, 8, b)
    assert bus.device_for(0x2F8, 1) is b  # ... until a device is added


def test_pm1_enable_reads_back_and_status_stays_clear() -> None:
    offs: list[int] = []
    pm = SleepControl(lambda: offs.append(1))
    enable = layout.PM1A_EVT_PORT + 2
    assert pm.pio_read(enable, 2) == b"\0\0"
    pm.pio_write(enable, (1 << 5).to_bytes(2, "little"))  # GBL_EN
    assert pm.pio_read(enable, 2) == (1 << 5).to_bytes(2, "little")
    assert pm.pio_read(layout.PM1A_EVT_PORT, 2) == b"\0\0"
    assert offs == []
    pm.pio_write(layout.PM1A_CNT_PORT, layout.PM1_POWEROFF_VALUE.to_bytes(2, "little"))
    assert offs == [1]


def test_site_names_and_summary() -> None:
    assert site_name(SITE_IO_OUT | 0x3F8) == "out 0x3f8"
    assert site_name(SITE_IO_IN | 0x3FD) == "in 0x3fd"
    assert site_name(SITE_MMIO_WRITE | 0xD0000050) == "write 0xd0000050"
    summary = site_summary([{SITE_IO_IN | 0x3FD: 2}, {SITE_IO_IN | 0x3FD: 3, SITE_IO_OUT | 1: 9}])
    assert list(summary.items()) == [("out 0x1", 9), ("in 0x3fd", 5)]
