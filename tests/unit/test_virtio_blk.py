"""virtio-blk over the virtio-mmio transport, driven through its registers like a guest driver.

Real GuestMemory, a real temp file and the device's real worker thread; only the
interrupt line is the VMM's NullIrq (there is no irqchip without a VM).
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import HOLE, Buf, Driver, make_memory, read_u32

from ktstr.disk import DiskThrottle
from ktstr.vmm.devices.virtio import mmio
from ktstr.vmm.devices.virtio.blk import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR_SIZE,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VirtioBlk,
)
from ktstr.vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from ktstr.vmm.irq import NullIrq
from ktstr.vmm.memory import GuestMemory

SECTORS = 2048  # 1 MiB
FEATURES = mmio.VIRTIO_F_VERSION_1 | mmio.VIRTIO_RING_F_INDIRECT_DESC | (1 << VIRTIO_BLK_F_FLUSH)


class Rig:
    """A disk file, guest memory, the device and a driver that has brought it up."""

    def __init__(self, tmp: Path, *, read_only: bool = False, throttle: DiskThrottle | None = None):
        self.path = tmp / "disk.img"
        if not self.path.exists():
            self.path.write_bytes(os.urandom(SECTORS * SECTOR_SIZE))
        self.mem: GuestMemory = make_memory()
        self.irq = NullIrq()
        self.blk = VirtioBlk(
            self.path, read_only=read_only, serial="ktstr-disk0", throttle=throttle
        )
        self.transport = mmio.VirtioMmioTransport(self.blk, self.mem, self.irq)
        self.drv = Driver(self.mem, size=16)

    def up(self, features: int = FEATURES) -> int:
        return self.drv.bring_up(self.transport, features)

    def close(self) -> None:
        self.blk.close()
        self.mem.close()

    def request(self, rtype: int, sector: int, *, out: bytes = b"", in_len: int = 0) -> int:
        """Queue one request in the usual 3-descriptor layout; return its head."""
        header = self.drv.alloc(struct.pack("<IIQ", rtype, 0, sector))
        bufs = [Buf(header, 16)]
        if out:
            bufs.append(Buf(self.drv.alloc(out), len(out)))
        if in_len:
            bufs.append(Buf(self.drv.alloc(in_len), in_len, write=True))
        self.status_addr = self.drv.alloc(b"\xff")
        bufs.append(Buf(self.status_addr, 1, write=True))
        self.bufs = bufs
        return self.drv.add_chain(bufs)

    def complete(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        self.drv.kick(self.transport)
        deadline = time.monotonic() + timeout
        got: list[tuple[int, int]] = []
        while len(got) < count:
            got += self.drv.used()
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(got)} of {count} requests completed")
            time.sleep(0.001)
        return got

    def status(self) -> int:
        return self.mem.read(self.status_addr, 1)[0]

    def data_in(self) -> bytes:
        buf = self.bufs[-2]
        return self.mem.read(buf.addr, buf.length)


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    assert r.up() & mmio.S_DRIVER_OK
    yield r
    r.close()


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
        for _ in range(30):  # batches of 10 fill the 16-entry ring safely
            heads = [r.request(T_IN, 0, in_len=512) for _ in range(10)]
            used = r.complete(10)
            assert sorted(h for h, _ in used) == sorted(heads)
        elapsed = time.monotonic() - start
        assert 0.45 <= elapsed <= 1.0, elapsed
    finally:
        r.close()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    rtype=st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, 3, 0xFFFFFFFF]),
    sector=st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 5000), st.sampled_from([512, 4096, SECTORS * 512])),
)
def test_any_request_leaves_file_bounded(
    tmp_path: Path, rtype: int, sector: int, length: int
) -> None:
    r = Rig(tmp_path)
    try:
        assert r.up() & mmio.S_DRIVER_OK
        size = r.path.stat().st_size
        length = min(length, 0x8000)  # the test driver's data area
        if rtype == T_OUT:
            r.request(rtype, sector, out=bytes(length))
        else:
            r.request(rtype, sector, in_len=length)
        r.complete()
        ok = rtype in (T_IN, T_OUT) and length % 512 == 0 and sector * 512 + length <= size
        assert (r.status() == S_OK) == (ok or rtype in (T_FLUSH, T_GET_ID)), r.status()
        assert r.path.stat().st_size == size
    finally:
        r.close()
