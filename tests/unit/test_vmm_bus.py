"""PIO/MMIO bus dispatch, device errors, ACPI PM1 and exit-port models, exit-site names."""

from __future__ import annotations

import pytest

from ktstr.vmm import layout
from ktstr.vmm.bus import (
    MAX_ERROR_KEYS,
    MAX_ERROR_MESSAGES,
    MAX_ERROR_TEXT,
    DeviceErrors,
    MmioBus,
    PioBus,
)
from ktstr.vmm.devices.bootport import ExitPort, SleepControl
from ktstr.vmm.memory import GuestMemoryError
from ktstr.vmm.vcpu import (
    MAX_EXIT_SITES,
    SITE_IO_IN,
    SITE_IO_OUT,
    SITE_MMIO_WRITE,
    SITE_OTHER,
    count_site,
    site_name,
    site_summary,
)


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


# --- a device that raises: the access is dropped, counted, reported ---------------------


class Exploding:
    """Raises on every access, the way a device bug or a refused guest address does."""

    def __init__(self, exc: Exception | None = None) -> None:
        self.exc = exc or ValueError("device exploded")

    def pio_read(self, port: int, size: int) -> bytes:
        raise self.exc

    def pio_write(self, port: int, data: bytes) -> None:
        raise self.exc

    def mmio_read(self, offset: int, size: int) -> bytes:
        raise self.exc

    def mmio_write(self, offset: int, data: bytes) -> None:
        raise self.exc


class Garbage:
    """Answers reads with something that is not bytes."""

    def pio_read(self, port: int, size: int) -> bytes:
        return None  # type: ignore[return-value]

    def pio_write(self, port: int, data: bytes) -> None:
        pass

    def mmio_read(self, offset: int, size: int) -> bytes:
        return 7  # type: ignore[return-value]

    def mmio_write(self, offset: int, data: bytes) -> None:
        pass


def test_raising_pio_device_reads_all_ones_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    errors = DeviceErrors()
    bus = PioBus(errors)
    bus.add(0x80, 2, Exploding())
    assert bus.read(0x80, 2) == b"\xff\xff"
    assert bus.write(0x81, b"\x01") is True  # claimed, then dropped
    assert bus.read(0x80, 1) == b"\xff"
    assert errors.counts == {"Exploding pio 0x80": 2, "Exploding pio 0x81": 1}
    assert len(errors.messages) == 3
    assert "in 0x80 (2 bytes)" in errors.messages[0]
    assert "ValueError: device exploded" in errors.messages[0]
    assert "out 0x81 (1 bytes)" in errors.messages[1]
    # A VMM bug stays visible: logged once, with its traceback, however often it happens.
    bugs = [r for r in caplog.records if r.name == "ktstr.vmm.bus"]
    assert len(bugs) == 1 and bugs[0].exc_info is not None


def test_raising_mmio_device_reads_all_ones_and_is_counted() -> None:
    errors = DeviceErrors()
    bus = MmioBus(errors)
    bus.add(0xD000_0000, 0x1000, Exploding(GuestMemoryError("outside guest RAM")))
    assert bus.read(0xD000_0050, 4) == b"\xff" * 4
    assert bus.write(0xD000_0070, b"\x0f\0\0\0") is True
    assert errors.counts == {"Exploding mmio 0xd0000050": 1, "Exploding mmio 0xd0000070": 1}
    assert "GuestMemoryError: outside guest RAM" in errors.messages[0]


def test_device_answering_garbage_reads_all_ones() -> None:
    errors = DeviceErrors()
    pio, mmio = PioBus(errors), MmioBus(errors)
    pio.add(0x80, 1, Garbage())
    mmio.add(0x1000, 0x100, Garbage())
    assert pio.read(0x80, 1) == b"\xff"
    assert mmio.read(0x1010, 2) == b"\xff\xff"
    assert sum(errors.counts.values()) == 2


def test_device_error_keys_and_messages_are_bounded() -> None:
    errors = DeviceErrors()
    bus = MmioBus(errors)
    bus.add(0, 1 << 20, Exploding(ValueError("x" * 10_000)))
    for addr in range(0, 4 * MAX_ERROR_KEYS * 8, 8):
        bus.read(addr, 8)
    counts = errors.counts
    assert len(counts) == MAX_ERROR_KEYS + 1
    assert counts["other"] == 3 * MAX_ERROR_KEYS
    assert sum(counts.values()) == 4 * MAX_ERROR_KEYS
    assert len(errors.messages) == MAX_ERROR_MESSAGES
    assert all(len(m) <= MAX_ERROR_TEXT for m in errors.messages)
    assert errors.total == 4 * MAX_ERROR_KEYS


def test_buses_share_one_error_record_by_default_per_bus() -> None:
    pio = PioBus()
    pio.add(0x80, 1, Exploding())
    pio.read(0x80, 1)
    assert pio.errors.counts == {"Exploding pio 0x80": 1}


# --- guest-written exit status: any value, any size, read back without raising -------------


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", b"\x80\0\0\0", b"\xff", b"\xff\xff", b""])
def test_exit_port_any_status_reads_back(data: bytes) -> None:
    port = ExitPort()
    port.pio_write(layout.EXIT_PORT, data)
    for size in (1, 2, 4):
        for off in range(4):
            assert len(port.pio_read(layout.EXIT_PORT + off, size)) == size
    if data:
        assert port.pio_read(layout.EXIT_PORT, len(data)) == data
    assert ExitPort().pio_read(layout.EXIT_PORT, 4) == b"\0\0\0\0"


def test_exit_port_all_ones_is_status_minus_one() -> None:
    port = ExitPort()
    port.pio_write(layout.EXIT_PORT, b"\xff\xff\xff\xff")
    assert port.code == -1
    port.pio_write(layout.EXIT_PORT, b"\x07")
    assert port.code == 7


# --- exit-site counters: a bounded number of distinct keys --------------------------------


def test_exit_site_counter_folds_new_sites_into_other_when_full() -> None:
    sites: dict[int, int] = {}
    for port in range(MAX_EXIT_SITES + 100):
        count_site(sites, SITE_IO_IN | port)
    count_site(sites, SITE_IO_IN | 0)  # a known site still counts as itself
    assert len(sites) == MAX_EXIT_SITES + 1
    assert sites[SITE_OTHER] == 100
    assert sites[SITE_IO_IN | 0] == 2
    assert site_name(SITE_OTHER) == "other"


def test_site_summary_is_bounded_over_many_vcpus() -> None:
    per_vcpu = [{SITE_MMIO_WRITE | (cpu << 20 | i): 1 for i in range(MAX_EXIT_SITES)}
                for cpu in range(4)]
    per_vcpu[0][SITE_OTHER] = 5
    summary = site_summary(per_vcpu)
    assert len(summary) == MAX_EXIT_SITES + 1
    assert summary["other"] == 5 + 3 * MAX_EXIT_SITES
    assert sum(summary.values()) == 5 + 4 * MAX_EXIT_SITES
