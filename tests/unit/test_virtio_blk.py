"""virtio-blk over the virtio-mmio transport, driven through its registers like a guest driver.

Real GuestMemory, a real temp file and the device's real worker thread; only the
interrupt line is the VMM's NullIrq (there is no irqchip without a VM). Random requests
against a model of the request semantics are in tests/fuzz.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import time
from pathlib import Path

import pytest
from virtio_driver import FEATURES, HOLE, SECTORS, Buf, Driver, Rig, read_u32

from ktstr.vmm.devices.virtio import mmio
from ktstr.vmm.devices.virtio.blk import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
)
from ktstr.vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from ktstr.vmm.throttle import MAX_THROTTLE_WAIT, DiskThrottle


@pytest.fixture
def rig(tmp_path: Path):
    with Rig.live(tmp_path) as r:
        yield r


def test_registers_identify_a_v2_block_device(tmp_path: Path) -> None:
    r = Rig(tmp_path, read_only=True)
    try:
        t = r.transport
        assert read_u32(t, mmio.MAGIC_VALUE) == 0x74726976
        assert read_u32(t, mmio.VERSION_REG) == 2
        assert read_u32(t, mmio.DEVICE_ID) == 2
        assert read_u32(t, mmio.QUEUE_NUM_MAX) == 256
        t.mmio_write(mmio.DEVICE_FEATURES_SEL, struct.pack("<I", 1))
        assert read_u32(t, mmio.DEVICE_FEATURES) & 1  # VIRTIO_F_VERSION_1 (bit 32)
        t.mmio_write(mmio.DEVICE_FEATURES_SEL, struct.pack("<I", 0))
        low = read_u32(t, mmio.DEVICE_FEATURES)
        assert low & (1 << VIRTIO_BLK_F_RO) and low & (1 << VIRTIO_BLK_F_FLUSH)
        capacity = struct.unpack("<Q", t.mmio_read(mmio.CONFIG, 8))[0]
        assert capacity == SECTORS
        # byte-wise config reads agree with the 8-byte one
        assert b"".join(t.mmio_read(mmio.CONFIG + i, 1) for i in range(8)) == struct.pack(
            "<Q", SECTORS
        )
        blk_size = struct.unpack("<I", t.mmio_read(mmio.CONFIG + 20, 4))[0]
        assert blk_size == 512
    finally:
        r.close()


def test_features_without_version_1_are_refused(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        status = r.up(features=1 << VIRTIO_BLK_F_FLUSH)
        assert not status & mmio.S_FEATURES_OK
        # features the device never offered are refused too
        status = r.up(features=FEATURES | (1 << 40))
        assert not status & mmio.S_FEATURES_OK
    finally:
        r.close()


def test_read(rig: Rig) -> None:
    disk = rig.path.read_bytes()
    head = rig.request(T_IN, 8, in_len=4096)
    assert rig.complete() == [(head, 4097)]
    assert rig.status() == S_OK
    assert rig.data_in() == disk[8 * 512 : 8 * 512 + 4096]
    assert rig.irq.edges >= 1
    assert read_u32(rig.transport, mmio.INTERRUPT_STATUS) & mmio.INT_USED_BUFFER
    rig.transport.mmio_write(mmio.INTERRUPT_ACK, struct.pack("<I", 1))
    assert read_u32(rig.transport, mmio.INTERRUPT_STATUS) == 0


def test_write_then_read_back_and_flush(rig: Rig) -> None:
    payload = os.urandom(3 * 512)
    rig.request(T_OUT, 100, out=payload)
    rig.complete()
    assert rig.status() == S_OK
    rig.request(T_FLUSH, 0)
    rig.complete()
    assert rig.status() == S_OK
    with open(rig.path, "rb") as f:
        f.seek(100 * 512)
        assert f.read(len(payload)) == payload
    rig.request(T_IN, 100, in_len=len(payload))
    rig.complete()
    assert rig.data_in() == payload


def test_scattered_buffers_and_any_layout(rig: Rig) -> None:
    """Header and data in one descriptor, data split at odd boundaries: still one request."""
    payload = os.urandom(1024)
    blob = struct.pack("<IIQ", T_OUT, 0, 7) + payload
    a = rig.drv.alloc(blob[:10])
    b = rig.drv.alloc(blob[10:700])
    c = rig.drv.alloc(blob[700:])
    status = rig.drv.alloc(b"\xff")
    rig.drv.add_chain([Buf(a, 10), Buf(b, 690), Buf(c, len(blob) - 700), Buf(status, 1, True)])
    rig.complete()
    assert rig.mem.read(status, 1)[0] == S_OK
    with open(rig.path, "rb") as f:
        f.seek(7 * 512)
        assert f.read(1024) == payload


def test_get_id(rig: Rig) -> None:
    rig.request(T_GET_ID, 0, in_len=20)
    assert rig.complete()[0][1] == 21
    assert rig.status() == S_OK
    assert rig.data_in() == b"ktstr-disk0".ljust(20, b"\0")


def test_unknown_request_type(rig: Rig) -> None:
    rig.request(99, 0)
    rig.complete()
    assert rig.status() == S_UNSUPP


@pytest.mark.parametrize(
    ("rtype", "sector", "length"),
    [
        (T_IN, SECTORS, 512),  # starts at the end
        (T_IN, SECTORS - 1, 1024),  # runs past the end
        (T_OUT, SECTORS - 1, 1024),
        (T_OUT, 2**64 - 1, 512),  # sector arithmetic must not wrap
        (T_IN, 0, 100),  # not a whole sector
    ],
)
def test_out_of_range_is_ioerr_and_file_unchanged(
    rig: Rig, rtype: int, sector: int, length: int
) -> None:
    before = hashlib.sha256(rig.path.read_bytes()).digest()
    size = rig.path.stat().st_size
    if rtype == T_OUT:
        rig.request(rtype, sector, out=os.urandom(length))
    else:
        rig.request(rtype, sector, in_len=length)
    rig.complete()
    assert rig.status() == S_IOERR
    assert rig.path.stat().st_size == size
    assert hashlib.sha256(rig.path.read_bytes()).digest() == before


def test_read_only_rejects_writes(tmp_path: Path) -> None:
    r = Rig(tmp_path, read_only=True)
    try:
        assert r.up(FEATURES | (1 << VIRTIO_BLK_F_RO)) & mmio.S_DRIVER_OK
        before = hashlib.sha256(r.path.read_bytes()).digest()
        r.request(T_OUT, 0, out=b"x" * 512)
        r.complete()
        assert r.status() == S_IOERR
        r.request(T_IN, 0, in_len=512)
        r.complete()
        assert r.status() == S_OK  # reads still work
        assert hashlib.sha256(r.path.read_bytes()).digest() == before
        with pytest.raises(OSError) as exc:  # the file really is open read-only
            os.write(r.blk.file.fd, b"x")
        assert exc.value.errno == errno.EBADF
    finally:
        r.close()


def test_buffer_in_a_hole_is_ioerr(rig: Rig) -> None:
    header = rig.drv.alloc(struct.pack("<IIQ", T_IN, 0, 0))
    status = rig.drv.alloc(b"\xff")
    rig.drv.add_chain([Buf(header, 16), Buf(HOLE, 512, True), Buf(status, 1, True)])
    used = rig.complete()
    assert used[0][1] <= 1
    assert rig.blk.file.errors == 1
    # the device carries on with the next request
    rig.request(T_IN, 0, in_len=512)
    rig.complete()
    assert rig.status() == S_OK


def test_descriptor_loop_completes_with_error(rig: Rig) -> None:
    header = rig.drv.alloc(struct.pack("<IIQ", T_IN, 0, 0))
    status = rig.drv.alloc(b"\xff")
    rig.drv.write_desc(0, header, 16, VIRTQ_DESC_F_NEXT, 1)
    rig.drv.write_desc(1, status, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0)
    rig.drv.publish(0)
    assert rig.complete() == [(0, 1)]
    assert rig.mem.read(status, 1)[0] == S_IOERR


def test_malformed_chain_completion_raises_the_used_interrupt(rig: Rig) -> None:
    """A chain failed at parse time is returned like any other: the driver is told."""
    edges = rig.irq.edges
    rig.drv.write_desc(0, HOLE, 16, 0, 0)  # header outside RAM
    rig.drv.publish(0)
    assert rig.complete() == [(0, 0)]
    deadline = time.monotonic() + 5
    while rig.irq.edges == edges:
        assert time.monotonic() < deadline, "no used-buffer interrupt"
        time.sleep(0.001)
    assert read_u32(rig.transport, mmio.INTERRUPT_STATUS) & mmio.INT_USED_BUFFER


def test_corrupt_ring_asks_for_reset_then_recovers(rig: Rig) -> None:
    rig.drv.publish(200)  # head beyond the queue size
    rig.drv.kick(rig.transport)
    deadline = time.monotonic() + 5
    while not read_u32(rig.transport, mmio.STATUS) & mmio.S_NEEDS_RESET:
        assert time.monotonic() < deadline, "device did not flag NEEDS_RESET"
        time.sleep(0.001)
    assert read_u32(rig.transport, mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE
    # Reset (status 0) and bring it up again with fresh rings: it works.
    rig.transport.mmio_write(mmio.STATUS, struct.pack("<I", 0))
    assert read_u32(rig.transport, mmio.STATUS) == 0
    rig.drv = Driver(rig.mem, size=16, base=0x8000)
    assert rig.up() & mmio.S_DRIVER_OK
    rig.request(T_IN, 0, in_len=512)
    rig.complete()
    assert rig.status() == S_OK


def test_ring_outside_ram_at_queue_ready(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    try:
        r.drv.base = HOLE
        status = r.up()
        assert status & mmio.S_NEEDS_RESET
        assert read_u32(r.transport, mmio.QUEUE_READY) == 0
    finally:
        r.close()


def test_throttled_iops(tmp_path: Path) -> None:
    """At 200 IOPS with a 200-op burst, 300 reads need about 0.5 s."""
    r = Rig(tmp_path, throttle=DiskThrottle(iops=200))
    try:
        assert r.up() & mmio.S_DRIVER_OK
        start = time.monotonic()
        for _ in range(60):  # 5 chains of 3 descriptors fit the 16-entry table
            heads = [r.request(T_IN, 0, in_len=512) for _ in range(5)]
            used = r.complete(5)
            assert sorted(h for h, _ in used) == sorted(heads)
        elapsed = time.monotonic() - start
        assert r.blk.file.errors == 0  # every one a real read, charged to the bucket
        assert 0.45 <= elapsed <= 1.0, elapsed
    finally:
        r.close()


def test_rejected_requests_are_not_charged_to_the_throttle(tmp_path: Path) -> None:
    """Out-of-range and unsupported requests fail at once: they neither wait for tokens
    nor take any from the requests behind them."""
    with Rig.live(tmp_path, throttle=DiskThrottle(iops=100, bytes_per_sec=4096)) as r:
        throttle = r.blk.throttle
        assert throttle is not None and throttle.bytes is not None and throttle.iops is not None
        start = time.monotonic()
        r.request(T_IN, SECTORS - 1, in_len=8192)  # 2 s of bandwidth, past the end
        r.complete()
        assert r.status() == S_IOERR
        r.request(T_IN, 2**64 - 1, in_len=512)  # sector arithmetic past 2**64
        r.complete()
        assert r.status() == S_IOERR
        r.request(11, 0, out=bytes(8192))  # DISCARD: not offered
        r.complete()
        assert r.status() == S_UNSUPP
        assert time.monotonic() - start < 0.5
        assert throttle.bytes.tokens == pytest.approx(4096)
        assert throttle.iops.tokens == pytest.approx(100, abs=1)


def test_huge_throttled_request_waits_at_most_the_cap(tmp_path: Path) -> None:
    """64 KiB at 512 B/s is two minutes of debt; the request runs after one capped wait."""
    with Rig.live(tmp_path, throttle=DiskThrottle(bytes_per_sec=512)) as r:
        start = time.monotonic()
        r.request(T_IN, 0, in_len=65536)
        r.complete(timeout=MAX_THROTTLE_WAIT + 1.5)
        assert r.status() == S_OK
        assert time.monotonic() - start < MAX_THROTTLE_WAIT + 0.5


def test_close_interrupts_a_throttled_request(tmp_path: Path) -> None:
    with Rig.live(tmp_path, throttle=DiskThrottle(iops=1, bytes_per_sec=1)) as r:
        r.request(T_IN, 0, in_len=4096)
        r.drv.kick(r.transport)
        time.sleep(0.1)  # let the worker reach its wait (close must be prompt either way)
        start = time.monotonic()
        r.blk.close()
        assert time.monotonic() - start < 0.5
        assert r.blk.thread is not None and not r.blk.thread.is_alive()
        assert r.drv.used() == []  # dropped by the reset in close, never half-done


def test_read_only_flush_and_writes_leave_the_file_alone(tmp_path: Path) -> None:
    with Rig(tmp_path, read_only=True) as r:
        assert r.up(FEATURES | (1 << VIRTIO_BLK_F_RO)) & mmio.S_DRIVER_OK
        before = hashlib.sha256(r.path.read_bytes()).digest()
        # 13 is WRITE_ZEROES, not offered
        for rtype, out in ((T_OUT, bytes(512)), (T_FLUSH, b""), (13, bytes(16))):
            r.request(rtype, 0, out=out)
            r.complete()
            assert r.status() == {T_OUT: S_IOERR, T_FLUSH: S_OK}.get(rtype, S_UNSUPP)
        assert hashlib.sha256(r.path.read_bytes()).digest() == before


def test_status_byte_not_writable_executes_nothing(rig: Rig) -> None:
    """A write whose 'status' descriptor is device-readable has nowhere to report: it is
    returned unexecuted (used length 0) and counted as an error."""
    before = hashlib.sha256(rig.path.read_bytes()).digest()
    header = rig.drv.alloc(struct.pack("<IIQ", T_OUT, 0, 0))
    data = rig.drv.alloc(bytes(512))
    status = rig.drv.alloc(b"\xff")
    head = rig.drv.add_chain([Buf(header, 16), Buf(data, 512), Buf(status, 1)])
    assert rig.complete() == [(head, 0)]
    assert rig.mem.read(status, 1) == b"\xff"
    assert rig.blk.file.errors == 1
    assert hashlib.sha256(rig.path.read_bytes()).digest() == before


def test_zero_length_status_descriptor(rig: Rig) -> None:
    """An empty last descriptor: the status is the last writable byte before it, so a
    read's data is one byte short of whole sectors and fails cleanly."""
    header = rig.drv.alloc(struct.pack("<IIQ", T_IN, 0, 0))
    data = rig.drv.alloc(512)
    rig.drv.add_chain([Buf(header, 16), Buf(data, 512, True), Buf(data + 512, 0, True)])
    assert rig.complete()[0][1] == 1
    assert rig.mem.read(data + 511, 1)[0] == S_IOERR
