"""PIO/MMIO buses with devices that raise or answer garbage: no exception reaches the
vCPU loop, every read answers its exact size, the error record stays bounded."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from hypothesis import given
from hypothesis import strategies as st

from ktstr.vmm.bus import MAX_ERROR_KEYS, MAX_ERROR_MESSAGES, DeviceErrors, MmioBus, PioBus
from ktstr.vmm.memory import GuestMemoryError
from ktstr.vmm.vcpu import MAX_EXIT_SITES, SITE_IO_IN, count_site, site_summary

Bound = Callable[[int], AbstractContextManager[None]]
EXAMPLE_BYTES = 512 << 10
"""Host memory one example may allocate (the buses keep a bounded record)."""

EXCEPTIONS: list[Exception] = [
    ValueError("bad value"), GuestMemoryError("outside guest RAM"), KeyError(3),
    TypeError("wrong type"), RecursionError("deep"), IndexError("index"),
    ZeroDivisionError("zero"), OverflowError("big"), RuntimeError("x" * 5000), OSError(5, "EIO"),
]
ANSWERS: list[object] = [None, 7, "str", b"", b"\x01", b"\x01" * 9, bytearray(b"ab"), [1, 2],
                         [300], memoryview(b"abcd"), object()]


class Chaos:
    """A device whose every access raises one of EXCEPTIONS or answers one of ANSWERS."""

    def __init__(self, plan: list[int]) -> None:
        self.plan = plan
        self.calls = 0
        self.raised = 0

    def _next(self) -> object:
        choice = self.plan[self.calls % len(self.plan)]
        self.calls += 1
        if choice < len(EXCEPTIONS):
            self.raised += 1
            raise EXCEPTIONS[choice]
        return ANSWERS[choice - len(EXCEPTIONS)]

    def pio_read(self, port: int, size: int) -> bytes:
        return self._next()  # type: ignore[return-value]

    def pio_write(self, port: int, data: bytes) -> None:
        self._next()

    def mmio_read(self, offset: int, size: int) -> bytes:
        return self._next()  # type: ignore[return-value]

    def mmio_write(self, offset: int, data: bytes) -> None:
        self._next()


access = st.tuples(
    st.sampled_from(["pio", "mmio"]),
    st.booleans(),  # write?
    st.integers(0, 0x3FF),  # offset into the devices' window
    st.sampled_from([1, 2, 4, 8]),
    st.binary(min_size=1, max_size=8),
)
plan = st.lists(st.integers(0, len(EXCEPTIONS) + len(ANSWERS) - 1), min_size=1, max_size=20)


@given(plan, st.lists(access, max_size=300))
def test_buses_survive_any_device_behaviour(
    bounded_memory: Bound, device_plan: list[int], accesses: list[tuple[str, bool, int, int, bytes]]
) -> None:
    errors = DeviceErrors()
    pio, mmio = PioBus(errors), MmioBus(errors)
    dev = Chaos(device_plan)
    pio.add(0x100, 0x200, dev)  # 0x100-0x2ff; the rest of 0-0x3ff decodes to nothing
    mmio.add(0xD000_0100, 0x200, dev)
    with bounded_memory(EXAMPLE_BYTES):
        for bus, write, off, size, data in accesses:
            if bus == "pio":
                size = min(size, 4)
                if write:
                    pio.write(off, data[:size])
                else:
                    assert len(pio.read(off, size)) == size
            elif write:
                mmio.write(0xD000_0000 + off, data)
            else:
                assert len(mmio.read(0xD000_0000 + off, size)) == size
    counts = errors.counts
    assert len(counts) <= MAX_ERROR_KEYS + 1
    assert len(errors.messages) <= MAX_ERROR_MESSAGES
    # Every raise was counted; garbage answers to reads count too, nothing else does.
    assert errors.total == sum(counts.values()) >= dev.raised
    assert errors.total <= dev.calls


@given(st.lists(st.lists(st.integers(0, 1 << 16), max_size=400), max_size=4))
def test_exit_site_counts_stay_bounded(bounded_memory: Bound, ports: list[list[int]]) -> None:
    with bounded_memory(EXAMPLE_BYTES):
        per_vcpu: list[dict[int, int]] = []
        for seen in ports:
            sites: dict[int, int] = {}
            for port in seen:
                count_site(sites, SITE_IO_IN | port)
            assert len(sites) <= MAX_EXIT_SITES + 1
            assert sum(sites.values()) == len(seen)
            per_vcpu.append(sites)
        summary = site_summary(per_vcpu)
    assert len(summary) <= MAX_EXIT_SITES + 1
    assert sum(summary.values()) == sum(map(len, ports))
