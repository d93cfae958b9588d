"""The virtio-mmio transport against a hostile driver: register abuse, reconfiguration
racing the device worker, and used-ring updates that fail.

A real virtio-blk backend on a temp file and real GuestMemory; the device sees memory
through `HookedMemory`, which lets a test pause the worker mid-walk or fail one write.
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import pytest
from virtio_driver import DATA_BASE, Driver, Rig, read_u32

from ktstr.vmm.devices.virtio import mmio
from ktstr.vmm.devices.virtio.blk import S_OK, T_IN
from ktstr.vmm.memory import GuestMemoryError
from ktstr.vmm.throttle import DiskThrottle

LAYOUT_REGISTERS = (
    mmio.QUEUE_NUM,
    mmio.QUEUE_DESC_LOW,
    mmio.QUEUE_DESC_HIGH,
    mmio.QUEUE_DRIVER_LOW,
    mmio.QUEUE_DRIVER_HIGH,
    mmio.QUEUE_DEVICE_LOW,
    mmio.QUEUE_DEVICE_HIGH,
)


def _w(rig: Rig, offset: int, value: int) -> None:
    rig.transport.mmio_write(offset, struct.pack("<I", value))


def _layout(rig: Rig) -> tuple[int, int, int, int, bool]:
    q = rig.transport.queues[0]
    return q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready


@pytest.fixture
def rig(tmp_path: Path):
    with Rig.live(tmp_path) as r:
        yield r


def _no_worker_failure(caplog: pytest.LogCaptureFixture, rig: Rig) -> None:
    assert not [r for r in caplog.records if "worker failed" in r.getMessage()]
    assert rig.blk.internal_errors == 0


def test_layout_writes_refused_while_ready(tmp_path: Path) -> None:
    with Rig(tmp_path) as r:
        t = r.transport
        _w(r, mmio.STATUS, mmio.S_ACKNOWLEDGE | mmio.S_DRIVER)
        _w(r, mmio.QUEUE_NUM, 16)
        for low, addr in (
            (mmio.QUEUE_DESC_LOW, r.drv.desc_addr),
            (mmio.QUEUE_DRIVER_LOW, r.drv.avail_addr),
            (mmio.QUEUE_DEVICE_LOW, r.drv.used_addr),
        ):
            _w(r, low, addr)
        _w(r, mmio.QUEUE_READY, 1)
        before = _layout(r)
        assert before[-1]
        for reg in LAYOUT_REGISTERS:
            _w(r, reg, 0x4000)
        assert _layout(r) == before
        assert t.refused_writes == len(LAYOUT_REGISTERS)


def test_layout_writes_refused_after_driver_ok(rig: Rig) -> None:
    """QueueReady=0 stops the queue, but its layout stays frozen until a device reset."""
    before = _layout(rig)
    _w(rig, mmio.QUEUE_READY, 0)
    assert read_u32(rig.transport, mmio.QUEUE_READY) == 0  # Linux reads this back
    for reg in LAYOUT_REGISTERS:
        _w(rig, reg, 0x8000)
    _w(rig, mmio.QUEUE_READY, 1)  # no re-enabling a queue of a live device either
    assert _layout(rig) == (*before[:-1], False)
    assert rig.transport.refused_writes == len(LAYOUT_REGISTERS) + 1
    # a reset makes the queue configurable again
    _w(rig, mmio.STATUS, 0)
    rig.drv = Driver(rig.mem, size=8, base=0x8000)
    assert rig.up() & mmio.S_DRIVER_OK
    assert _layout(rig)[:2] == (8, 0x8000)


def test_status_bits_are_not_cleared_without_reset(rig: Rig) -> None:
    _w(rig, mmio.STATUS, mmio.S_ACKNOWLEDGE | mmio.S_DRIVER | mmio.S_FEATURES_OK)
    assert read_u32(rig.transport, mmio.STATUS) & mmio.S_DRIVER_OK
    assert rig.transport.refused_writes == 1
    # and the device keeps serving: the driver cannot get it into a half-live state
    rig.request(T_IN, 0, in_len=512)
    rig.complete()
    assert rig.status() == S_OK


def test_reconfiguration_waits_for_the_worker_walk(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A driver reprogramming the queue while the worker walks a chain cannot make the
    worker read descriptors from a half-updated layout."""
    table = range(rig.drv.desc_addr, rig.drv.desc_addr + 16 * rig.drv.size)
    other = Driver(rig.mem, size=16, base=0x8000)  # a second table, also in RAM
    walking, go = threading.Event(), threading.Event()
    desc_reads: list[int] = []

    def on_read(gpa: int, length: int) -> None:
        worker = threading.current_thread().name.startswith("virtio-blk")
        if not worker or length != 16 or gpa >= DATA_BASE:
            return
        desc_reads.append(gpa)
        if not walking.is_set():
            walking.set()
            go.wait(0.5)  # hold the walk open while the "vCPU" reprograms the queue

    rig.guest.on_read = on_read
    head = rig.request(T_IN, 0, in_len=512)  # header, data, status: three descriptors
    rig.drv.kick(rig.transport)
    assert walking.wait(5)

    def reprogram() -> None:
        _w(rig, mmio.QUEUE_READY, 0)
        _w(rig, mmio.QUEUE_DESC_LOW, other.desc_addr)
        _w(rig, mmio.QUEUE_NUM, 8)

    vcpu = threading.Thread(target=reprogram)
    vcpu.start()
    vcpu.join(0.2)  # unsynchronised, this finishes here, in the middle of the walk
    go.set()
    vcpu.join(5)
    assert not vcpu.is_alive()
    # The request completes if the worker returns it before the stop lands; otherwise it
    # could not go back to a stopped queue, which is reported, never silently dropped.
    deadline = time.monotonic() + 5
    while not (used := rig.drv.used()):
        if read_u32(rig.transport, mmio.STATUS) & mmio.S_NEEDS_RESET:
            break
        assert time.monotonic() < deadline, "request neither completed nor reported"
        time.sleep(0.001)
    if used:
        assert used == [(head, 513)] and rig.status() == S_OK
    assert len(desc_reads) == 3
    assert all(a in table for a in desc_reads), [hex(a) for a in desc_reads]
    _no_worker_failure(caplog, rig)


def test_stopping_the_queue_under_a_throttled_request_needs_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Rig.live(tmp_path, throttle=DiskThrottle(iops=1)) as r:
        r.request(T_IN, 0, in_len=512)
        r.complete()  # the burst's one token
        r.request(T_IN, 0, in_len=512)  # waits a second for the next
        r.drv.kick(r.transport)
        time.sleep(0.3)  # the worker has popped it and is waiting
        _w(r, mmio.QUEUE_READY, 0)
        r.wait_status(mmio.S_NEEDS_RESET)
        assert read_u32(r.transport, mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE
        _no_worker_failure(caplog, r)


def test_failed_used_ring_update_is_reported_and_earlier_completions_signalled(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The second request's used element lands outside RAM: the first one's completion
    still reaches the driver (used-buffer interrupt) and the device asks for a reset."""
    second_elem = rig.drv.used_addr + 4 + 8 * 1

    def on_write(gpa: int, data: bytes) -> None:
        if gpa == second_elem:
            raise GuestMemoryError(f"guest access {gpa:#x} is outside guest RAM")

    rig.guest.on_write = on_write
    first = rig.request(T_IN, 0, in_len=512)
    rig.request(T_IN, 8, in_len=512)
    rig.drv.kick(rig.transport)
    rig.wait_status(mmio.S_NEEDS_RESET)
    assert rig.drv.used() == [(first, 513)]
    pending = read_u32(rig.transport, mmio.INTERRUPT_STATUS)
    assert pending & mmio.INT_USED_BUFFER, pending
    assert pending & mmio.INT_CONFIG_CHANGE, pending
    _no_worker_failure(caplog, rig)
    # notifications are ignored until the driver resets the device
    rig.request(T_IN, 0, in_len=512)
    rig.drv.kick(rig.transport)
    assert rig.drv.used() == []


def test_work_per_pass_is_bounded_by_the_queue_size(rig: Rig) -> None:
    """A driver that refills the ring as fast as the device empties it cannot keep one
    pass of the worker going: completions are announced at least once per queue-full."""
    refills = [100]

    def on_write(gpa: int, data: bytes) -> None:
        if gpa == rig.drv.used_addr + 2 and refills[0] > 0:  # the device publishes a used index
            refills[0] -= 1
            rig.request(T_IN, 0, in_len=512)

    rig.guest.on_write = on_write
    edges = rig.irq.edges
    rig.request(T_IN, 0, in_len=512)
    assert len(rig.complete(101)) == 101
    assert rig.irq.edges - edges >= 101 // rig.drv.size


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_any_offset_and_size_is_harmless(rig: Rig, size: int) -> None:
    """Every offset of the window at every access size: reads return `size` bytes, nothing
    raises (registers are 32-bit only; odd accesses read as zero and are dropped)."""
    t = rig.transport
    for offset in range(mmio.REGION_SIZE):
        assert len(t.mmio_read(offset, size)) == size
        if offset not in (mmio.STATUS, mmio.QUEUE_NOTIFY):  # covered by their own tests
            t.mmio_write(offset, b"\xa5" * size)
