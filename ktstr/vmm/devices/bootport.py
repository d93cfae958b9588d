"""Guest-to-host signalling ports: boot-time marker, exit code, ACPI sleep control.

* ``layout.BOOT_PORT``: the guest init writes ``BOOT_MAGIC``; the first such
  write is timestamped (boot time = that moment minus VM start).
* ``layout.EXIT_PORT``: the guest's exit status (a byte, or 4 bytes little endian).
* ``layout.SLEEP_CONTROL_PORT``: the FADT's hardware-reduced sleep register;
  an S5 request is the guest powering off.
"""

from __future__ import annotations

import threading
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
    """Remembers the last status written; ``None`` until the guest writes one."""

    def __init__(self) -> None:
        self.code: int | None = None

    def attach(self, ctx: AttachContext) -> None:
        ctx.add_pio(layout.EXIT_PORT, 4, self)

    def close(self) -> None:
        pass

    def pio_read(self, port: int, size: int) -> bytes:
        return (self.code or 0).to_bytes(4, "little")[:size]

    def pio_write(self, port: int, data: bytes) -> None:
        if port != layout.EXIT_PORT:
            return  # a write to the upper bytes alone means nothing
        self.code = int.from_bytes(data, "little", signed=len(data) == 4)


class SleepControl:
    """ACPI hardware-reduced sleep control/status registers; S5 calls ``on_poweroff``."""

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self.on_poweroff = on_poweroff
        self._lock = threading.Lock()
        self.status = 0

    def attach(self, ctx: AttachContext) -> None:
        ctx.add_pio(layout.SLEEP_CONTROL_PORT, 1, self)
        ctx.add_pio(layout.SLEEP_STATUS_PORT, 1, self)

    def close(self) -> None:
        pass

    def pio_read(self, port: int, size: int) -> bytes:
        value = self.status if port == layout.SLEEP_STATUS_PORT else 0
        return bytes([value]) * size

    def pio_write(self, port: int, data: bytes) -> None:
        if port == layout.SLEEP_STATUS_PORT:
            with self._lock:
                self.status &= ~data[0] & 0xFF  # write-1-to-clear
            return
        if layout.sleep_control_is_poweroff(data[0]):
            self.on_poweroff()
