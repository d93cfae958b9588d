"""The driver side of a split virtqueue, for tests: lays out rings and chains in GuestMemory.

It does what the Linux virtio driver does (descriptor table, avail ring,
reading the used ring), plus raw writers that let tests put hostile values in
any field, and `Rig`: a virtio-blk disk on a real file brought up through its
registers.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktstr.vmm.devices.virtio.blk import SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VirtioBlk
from ktstr.vmm.devices.virtio.mmio import (
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    QUEUE_DESC_HIGH,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_HIGH,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_HIGH,
    QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_READY,
    QUEUE_SEL,
    S_ACKNOWLEDGE,
    S_DRIVER,
    S_DRIVER_OK,
    S_FEATURES_OK,
    STATUS,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    VirtioMmioTransport,
)
from ktstr.vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
)
from ktstr.vmm.irq import NullIrq
from ktstr.vmm.memory import GuestMemory
from ktstr.vmm.throttle import DiskThrottle

MiB = 1 << 20
# Two RAM regions with a hole between them, so "in the hole" is a testable address.
REGIONS = [(0, 2 * MiB), (8 * MiB, 2 * MiB)]
HOLE = 4 * MiB
RING_BASE = 0x1000
DATA_BASE = 0x100000


def make_memory() -> GuestMemory:
    return GuestMemory(REGIONS)


@dataclass
class Buf:
    addr: int
    length: int
    write: bool = False


@dataclass
class Driver:
    mem: GuestMemory
    size: int = 16
    base: int = RING_BASE
    avail_idx: int = 0
    next_free: int = 0
    seen_used: int = 0
    _data_next: int = DATA_BASE
    heads: list[int] = field(default_factory=list)

    @property
    def desc_addr(self) -> int:
        return self.base

    @property
    def avail_addr(self) -> int:
        return self.base + 16 * self.size

    @property
    def used_addr(self) -> int:
        end = self.avail_addr + 6 + 2 * self.size
        return (end + 3) & ~3

    def queue(self, *, indirect: bool = False, max_size: int = 256) -> Virtqueue:
        """A device-side queue programmed with this driver's layout (size may be hostile)."""
        q = Virtqueue(max_size=max_size)
        q.size = self.size
        q.desc_addr, q.avail_addr, q.used_addr = self.desc_addr, self.avail_addr, self.used_addr
        q.indirect = indirect
        q.ready = True
        return q

    def alloc(self, data: bytes | int) -> int:
        """Place a buffer in guest RAM (bytes, or a zeroed length); return its address."""
        length = data if isinstance(data, int) else len(data)
        addr = self._data_next
        self._data_next += (length + 15) & ~15 or 16
        if not isinstance(data, int):
            self.mem.write(addr, data)
        return addr

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc_addr + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        slot = self.avail_idx % self.size
        self.mem.write(self.avail_addr + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail_addr + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail_addr, struct.pack("<H", flags))

    def add_chain(self, bufs: list[Buf]) -> int:
        """Lay `bufs` out as consecutive descriptors, publish the head, return it."""
        head = self.next_free
        indices = [(head + i) % self.size for i in range(len(bufs))]
        for index, desc in zip(indices, _descriptors(bufs, indices), strict=True):
            self.write_desc(index, *desc)
        self.next_free = (head + len(bufs)) % self.size
        self.publish(head)
        self.heads.append(head)
        return head

    def add_indirect_chain(self, bufs: list[Buf]) -> int:
        """Put `bufs` in an indirect table behind one descriptor, publish it, return the head."""
        table = self.alloc(16 * len(bufs))
        for i, desc in enumerate(_descriptors(bufs, list(range(len(bufs))))):
            self.mem.write(table + 16 * i, struct.pack("<QIHH", *desc))
        head = self.next_free
        self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        self.next_free = (head + 1) % self.size
        self.publish(head)
        self.heads.append(head)
        return head

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used_addr + 2, 2))[0])

    def used(self) -> list[tuple[int, int]]:
        """New used elements since the last call, as (head, length)."""
        out = []
        idx = self.used_idx()
        while self.seen_used != idx:
            slot = self.seen_used % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used_addr + 4 + 8 * slot, 8)))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out

    # --- through the MMIO registers, as the Linux driver does it -------------------------------

    def bring_up(self, transport: VirtioMmioTransport, features: int) -> int:
        """Negotiate `features`, set queue 0 up, DRIVER_OK; return the final status."""
        w = transport.mmio_write
        w(STATUS, _u32(S_ACKNOWLEDGE))
        w(STATUS, _u32(S_ACKNOWLEDGE | S_DRIVER))
        for sel in (0, 1):
            w(DRIVER_FEATURES_SEL, _u32(sel))
            w(DRIVER_FEATURES, _u32((features >> (32 * sel)) & 0xFFFFFFFF))
        w(STATUS, _u32(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK))
        status = read_u32(transport, STATUS)
        if not status & S_FEATURES_OK:
            return status
        w(QUEUE_SEL, _u32(0))
        w(QUEUE_NUM, _u32(self.size))
        for low, high, addr in (
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, self.desc_addr),
            (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, self.avail_addr),
            (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, self.used_addr),
        ):
            w(low, _u32(addr & 0xFFFFFFFF))
            w(high, _u32(addr >> 32))
        w(QUEUE_READY, _u32(1))
        w(STATUS, _u32(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK))
        return read_u32(transport, STATUS)

    def kick(self, transport: VirtioMmioTransport) -> None:
        transport.mmio_write(QUEUE_NOTIFY, _u32(0))


def _descriptors(bufs: list[Buf], indices: list[int]) -> list[tuple[int, int, int, int]]:
    """(addr, len, flags, next) of a chain of `bufs` stored at table `indices`."""
    out = []
    for i, buf in enumerate(bufs):
        last = i == len(bufs) - 1
        flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if buf.write else 0)
        out.append((buf.addr, buf.length, flags, 0 if last else indices[i + 1]))
    return out


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def read_u32(transport: VirtioMmioTransport, offset: int) -> int:
    return int(struct.unpack("<I", transport.mmio_read(offset, 4))[0])


class HookedMemory:
    """The device's view of a real GuestMemory, with optional hooks run before each access.

    Hooks see the device's accesses only (the Driver writes the GuestMemory directly), so
    a test can pause the device mid-walk or fail one access the way unmapped RAM would.
    """

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.on_read: Callable[[int, int], None] | None = None
        self.on_write: Callable[[int, bytes], None] | None = None

    def read(self, gpa: int, length: int) -> bytes:
        if self.on_read is not None:
            self.on_read(gpa, length)
        return self.mem.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        if self.on_write is not None:
            self.on_write(gpa, bytes(data))
        self.mem.write(gpa, data)

    def view(self, gpa: int, length: int) -> memoryview:
        return self.mem.view(gpa, length)


SECTORS = 2048  # 1 MiB
FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | (1 << VIRTIO_BLK_F_FLUSH)


class Rig:
    """A disk file, guest memory, the device and a driver that can bring it up."""

    def __init__(
        self,
        tmp: Path,
        *,
        read_only: bool = False,
        throttle: DiskThrottle | None = None,
        sectors: int = SECTORS,
        size: int = 16,
    ) -> None:
        self.path = tmp / "disk.img"
        if not self.path.exists():
            self.path.write_bytes(os.urandom(sectors * SECTOR_SIZE))
        self.mem: GuestMemory = make_memory()
        self.guest = HookedMemory(self.mem)
        self.irq = NullIrq()
        self.blk = VirtioBlk(
            self.path, read_only=read_only, serial="ktstr-disk0", throttle=throttle
        )
        self.transport = VirtioMmioTransport(self.blk, self.guest, self.irq)
        self.drv = Driver(self.mem, size=size)

    def up(self, features: int = FEATURES) -> int:
        return self.drv.bring_up(self.transport, features)

    def close(self) -> None:
        self.blk.close()
        self.mem.close()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def live(cls, tmp: Path, **kwargs: Any) -> Rig:
        """A Rig whose driver has negotiated FEATURES and set DRIVER_OK."""
        rig = cls(tmp, **kwargs)
        status = rig.up()
        if not status & S_DRIVER_OK:
            rig.close()
            raise AssertionError(f"bring-up failed: status {status:#x}")
        return rig

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
        return self.wait_used(count, timeout)

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        got: list[tuple[int, int]] = []
        while len(got) < count:
            got += self.drv.used()
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(got)} of {count} requests completed")
            time.sleep(0.001)
        return got

    def wait_status(self, bit: int, timeout: float = 5.0) -> int:
        """Poll the Status register until `bit` is set; return it."""
        deadline = time.monotonic() + timeout
        while not (status := read_u32(self.transport, STATUS)) & bit:
            if time.monotonic() > deadline:
                raise AssertionError(f"status {status:#x} never got bit {bit:#x}")
            time.sleep(0.001)
        return status

    def status(self) -> int:
        return self.mem.read(self.status_addr, 1)[0]

    def data_in(self) -> bytes:
        buf = self.bufs[-2]
        return self.mem.read(buf.addr, buf.length)
