"""Guest-to-host signalling ports: boot-time marker, exit code, ACPI sleep control.

* ``layout.BOOT_PORT``: the guest init writes ``BOOT_MAGIC``; the first such
  write is timestamped (boot time = that moment minus VM start).
* ``layout.EXIT_PORT``: the guest's exit status (a byte, or 4 bytes little endian).
* ``layout.PM1A_CNT_PORT``: the FADT's PM1a control block;
  an S5 request is the guest powering off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ktstr.vmm import layout
from ktstr.vmm.bus import AttachContext


class BootPort:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.boot_time: float | None = None
        self.writes = 0

    def attach(self, ctx: AttachContext) -> None:
        ctx.add_pio(layout.BOOT_PORT, 1, self)

    def close(self) -> None:
        pass

    def pio_read(self, port: int, size: int) -> bytes:
        return b"\x00" * size

    def pio_write(self, port: int, data: bytes) -> None:
        self.writes += 1
        if self.boot_time is None and data[:1] == bytes([layout.BOOT_MAGIC]):
            self.boot_time = self.clock()


class ExitPort:
    """Remembers the last status written; ``None`` until the guest writes one.

    A 4-byte write is a signed status (0xFFFFFFFF is -1), a shorter one unsigned; a read
    returns the register's bytes at that port offset, zero past its end.
    """

    def __init__(self) -> None:
        self.code: int | None = None

    def attach(self, ctx: AttachContext) -> None:
        ctx.add_pio(layout.EXIT_PORT, 4, self)

    def close(self) -> None:
        pass

    def pio_read(self, port: int, size: int) -> bytes:
        size, off = max(size, 0), port - layout.EXIT_PORT
        if not 0 <= off < 4:
            return bytes(size)
        register = ((self.code or 0) & 0xFFFFFFFF).to_bytes(4, "little")
        return register[off : off + size].ljust(size, b"\0")

    def pio_write(self, port: int, data: bytes) -> None:
        if port != layout.EXIT_PORT or not 1 <= len(data) <= 4:
            return  # a write to the upper bytes alone means nothing
        self.code = int.from_bytes(data, "little", signed=len(data) == 4)


class SleepControl:
    """ACPI PM1a event/control blocks; an S5 request on PM1a_CNT calls ``on_poweroff``.

    PM1 status reads zero (no event ever fires); PM1 enable keeps what the guest writes,
    since ACPICA verifies an enable by reading it back (the Global Lock event otherwise
    fails with "Could not enable GlobalLock event" at error level).
    """

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self.on_poweroff = on_poweroff
        self.enable = bytearray(layout.PM1_EVT_LEN // 2)

    def attach(self, ctx: AttachContext) -> None:
        ctx.add_pio(layout.PM1A_EVT_PORT, layout.PM1_EVT_LEN, self)
        ctx.add_pio(layout.PM1A_CNT_PORT, layout.PM1_CNT_LEN, self)

    def close(self) -> None:
        pass

    def pio_read(self, port: int, size: int) -> bytes:
        off = port - (layout.PM1A_EVT_PORT + len(self.enable))
        if 0 <= off < len(self.enable):
            return bytes(self.enable[off : off + size]).ljust(size, b"\0")
        return bytes(size)  # no events pending; SCI_EN reads clear (no SMI_CMD)

    def pio_write(self, port: int, data: bytes) -> None:
        off = port - (layout.PM1A_EVT_PORT + len(self.enable))
        if 0 <= off < len(self.enable):
            n = min(len(data), len(self.enable) - off)
            self.enable[off : off + n] = data[:n]
            return
        if port != layout.PM1A_CNT_PORT or len(data) < 2:
            return  # PM1 status/enable writes: there are no events to clear or enable
        if layout.pm1_control_is_poweroff(int.from_bytes(data[:2], "little")):
            self.on_poweroff()
