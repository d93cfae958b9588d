"""The driver side of a split virtqueue, for tests: lays out rings and chains in GuestMemory.

It does what the Linux virtio driver does (descriptor table, avail ring,
reading the used ring), plus raw writers that let tests put hostile values in
any field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

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
    VirtioMmioTransport,
)
from ktstr.vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
)
from ktstr.vmm.memory import GuestMemory

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
        for i, (index, buf) in enumerate(zip(indices, bufs, strict=True)):
            last = i == len(bufs) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if buf.write else 0)
            self.write_desc(index, buf.addr, buf.length, flags, 0 if last else indices[i + 1])
        self.next_free = (head + len(bufs)) % self.size
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


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def read_u32(transport: VirtioMmioTransport, offset: int) -> int:
    return int(struct.unpack("<I", transport.mmio_read(offset, 4))[0])
