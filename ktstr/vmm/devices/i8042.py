"""The part of an i8042 keyboard controller a VM needs: the reset line.

Linux's ``reboot=k`` path (and its fallback chain) writes 0xFE to the command
port; that ends the VM as a reboot. Everything else answers like a controller
with no keyboard and no mouse, so the i8042 driver gives up quickly.
"""

from __future__ import annotations

from collections.abc import Callable

from ktstr.vmm import layout
from ktstr.vmm.bus import AttachContext

STATUS_SYSFLAG = 0x04
"""Self-test passed (set after power-on)."""


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.resets = 0

    def attach(self, ctx: AttachContext) -> None:
        ctx.add_pio(layout.I8042_DATA_PORT, 1, self)
        ctx.add_pio(layout.I8042_COMMAND_PORT, 1, self)

    def close(self) -> None:
        pass

    def pio_read(self, port: int, size: int) -> bytes:
        # Status: output buffer empty, input buffer empty. Data: nothing to read.
        value = STATUS_SYSFLAG if port == layout.I8042_COMMAND_PORT else 0
        return bytes([value]) * size

    def pio_write(self, port: int, data: bytes) -> None:
        if port == layout.I8042_COMMAND_PORT and data[:1] == bytes([layout.I8042_RESET_COMMAND]):
            self.resets += 1
            self.on_reset()
