"""The boot, exit, ACPI PM1 and i8042 ports under any size, value and order: nothing
raises (the exit port's 0xFFFFFFFF-then-read did), reads answer their size, and only
the documented values end the VM."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from hypothesis import given
from hypothesis import strategies as st

from ktstr.vmm import layout
from ktstr.vmm.bus import AttachContext, MmioBus, PioBus
from ktstr.vmm.devices.bootport import BootPort, ExitPort, SleepControl
from ktstr.vmm.devices.i8042 import I8042
from ktstr.vmm.memory import GuestMemory

Bound = Callable[[int], AbstractContextManager[None]]
EXAMPLE_BYTES = 64 << 10

PORTS = [layout.BOOT_PORT, *range(layout.EXIT_PORT - 1, layout.EXIT_PORT + 5),
         *range(layout.PM1A_EVT_PORT - 1, layout.PM1A_CNT_PORT + layout.PM1_CNT_LEN + 1),
         layout.I8042_DATA_PORT, layout.I8042_COMMAND_PORT]
access = st.tuples(st.booleans(), st.sampled_from(PORTS), st.sampled_from([1, 2, 4]),
                   st.binary(min_size=4, max_size=4) | st.sampled_from(
                       [b"\xff" * 4, b"\0" * 4, bytes([layout.BOOT_MAGIC]) * 4,
                        bytes([layout.I8042_RESET_COMMAND]) * 4,
                        layout.PM1_POWEROFF_VALUE.to_bytes(2, "little") * 2]))


@given(st.lists(access, max_size=200))
def test_signalling_ports_take_anything(bounded_memory: Bound,
                                        accesses: list[tuple[bool, int, int, bytes]]) -> None:
    events: list[str] = []
    boot, exit_port = BootPort(clock=lambda: 1.0), ExitPort()
    devices = [boot, exit_port, SleepControl(lambda: events.append("poweroff")),
               I8042(lambda: events.append("reset"))]
    pio = PioBus()
    with GuestMemory([(0, 1 << 16)]) as mem:
        ctx = AttachContext(mem, pio, MmioBus())
        for dev in devices:
            dev.attach(ctx)
    expected: list[str] = []
    with bounded_memory(EXAMPLE_BYTES):
        for write, port, size, value in accesses:
            data = value[:size]
            if not write:
                assert len(pio.read(port, size)) == size
                continue
            claimed = pio.device_for(port, size) is not None
            pio.write(port, data)
            if claimed and port == layout.PM1A_CNT_PORT and layout.pm1_control_is_poweroff(
                    int.from_bytes(data[:2], "little")) and size >= 2:
                expected.append("poweroff")
            if claimed and port == layout.I8042_COMMAND_PORT and (
                    data[0] == layout.I8042_RESET_COMMAND):
                expected.append("reset")
            if claimed and port == layout.EXIT_PORT:
                assert exit_port.code == int.from_bytes(data, "little", signed=size == 4)
    assert events == expected
    assert pio.errors.total == 0  # none of them needed the bus's safety net
    assert exit_port.code is None or -(1 << 31) <= exit_port.code < 1 << 32
