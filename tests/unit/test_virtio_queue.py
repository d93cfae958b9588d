"""Split virtqueue parsing against a real GuestMemory, including hostile rings and chains.

The property-based versions (random tables, rings and indices) are in tests/fuzz.
"""

from __future__ import annotations

import struct

import pytest
from virtio_driver import HOLE, REGIONS, Buf, Driver, make_memory

from ktstr.vmm.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    ChainError,
    DescriptorChain,
    QueueError,
    Segment,
    Virtqueue,
)
from ktstr.vmm.memory import GuestMemory


@pytest.fixture
def mem():
    m = make_memory()
    yield m
    m.close()


def test_simple_chain_round_trip(mem: GuestMemory) -> None:
    drv = Driver(mem, size=8)
    q = drv.queue()
    a, b = drv.alloc(b"header..........."), drv.alloc(512)
    head = drv.add_chain([Buf(a, 16), Buf(b, 512, write=True)])
    chain = q.pop(mem)
    assert chain == DescriptorChain(head, [Segment(a, 16, False), Segment(b, 512, True)])
    assert q.pop(mem) is None
    q.add_used(mem, head, 512)
    assert drv.used() == [(head, 512)]


def test_avail_index_wraps_at_16_bits(mem: GuestMemory) -> None:
    drv = Driver(mem, size=4)
    q = drv.queue()
    drv.avail_idx = q.last_avail_idx = 0xFFFE
    drv.seen_used = q.used_idx = 0xFFFE
    mem.write(drv.used_addr + 2, struct.pack("<H", 0xFFFE))
    buf = drv.alloc(8)
    heads = [drv.add_chain([Buf(buf, 8, write=True)]) for _ in range(3)]
    got = []
    while (chain := q.pop(mem)) is not None:
        got.append(chain.head)
        q.add_used(mem, chain.head, 8)
    assert got == heads
    assert q.last_avail_idx == 1 and q.used_idx == 1
    assert [h for h, _ in drv.used()] == heads


def test_indirect_table(mem: GuestMemory) -> None:
    drv = Driver(mem, size=4)
    q = drv.queue(indirect=True)
    bufs = [drv.alloc(16), drv.alloc(4096), drv.alloc(1)]
    table = drv.alloc(48)
    for i, (addr, length, write) in enumerate(
        [(bufs[0], 16, False), (bufs[1], 4096, True), (bufs[2], 1, True)]
    ):
        flags = (VIRTQ_DESC_F_NEXT if i < 2 else 0) | (VIRTQ_DESC_F_WRITE if write else 0)
        mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, i + 1))
    drv.write_desc(2, table, 48, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(2)
    chain = q.pop(mem)
    assert chain is not None and chain.head == 2
    assert [(s.addr, s.length, s.write) for s in chain.segments] == [
        (bufs[0], 16, False),
        (bufs[1], 4096, True),
        (bufs[2], 1, True),
    ]


def _single(mem: GuestMemory, addr: int, length: int, flags: int = 0, nxt: int = 0) -> Driver:
    drv = Driver(mem, size=8)
    drv.write_desc(0, addr, length, flags, nxt)
    drv.publish(0)
    return drv


@pytest.mark.parametrize(
    ("addr", "length", "why"),
    [
        (HOLE, 16, "outside guest RAM"),
        (REGIONS[0][1] - 8, 16, "outside guest RAM"),  # straddles the end of a region
        (2**64 - 8, 16, "outside guest RAM"),
        (0x100000, 2**32 - 1, "outside guest RAM"),
    ],
)
def test_buffer_outside_ram_is_a_chain_error(
    mem: GuestMemory, addr: int, length: int, why: str
) -> None:
    drv = _single(mem, addr, length)
    q = drv.queue()
    with pytest.raises(ChainError, match=why) as exc:
        q.pop(mem)
    assert exc.value.head == 0
    assert q.pop(mem) is None  # the bad chain was consumed; the queue goes on


def test_descriptor_loop_is_detected(mem: GuestMemory) -> None:
    drv = Driver(mem, size=4)
    buf = drv.alloc(8)
    drv.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, buf, 8, VIRTQ_DESC_F_NEXT, 0)
    drv.publish(0)
    with pytest.raises(ChainError, match="loop"):
        drv.queue().pop(mem)


def test_next_index_out_of_range(mem: GuestMemory) -> None:
    drv = _single(mem, 0x100000, 8, VIRTQ_DESC_F_NEXT, 8)
    with pytest.raises(ChainError, match="next index 8"):
        drv.queue().pop(mem)


def test_readable_after_writable_rejected(mem: GuestMemory) -> None:
    drv = Driver(mem, size=4)
    buf = drv.alloc(16)
    drv.add_chain([Buf(buf, 8, write=True), Buf(buf, 8)])
    with pytest.raises(ChainError, match="readable buffer after a writable"):
        drv.queue().pop(mem)


def test_indirect_without_negotiation_or_nested(mem: GuestMemory) -> None:
    drv = _single(mem, 0x100000, 16, VIRTQ_DESC_F_INDIRECT)
    with pytest.raises(ChainError, match="without INDIRECT_DESC"):
        drv.queue().pop(mem)
    table = 0x100000
    mem.write(table, struct.pack("<QIHH", table, 16, VIRTQ_DESC_F_INDIRECT, 0))
    drv = _single(mem, table, 16, VIRTQ_DESC_F_INDIRECT)
    with pytest.raises(ChainError, match="nested indirect"):
        drv.queue(indirect=True).pop(mem)


@pytest.mark.parametrize("length", [0, 15, 17, 16 * 40000])
def test_indirect_table_bad_length(mem: GuestMemory, length: int) -> None:
    drv = _single(mem, 0x100000, length, VIRTQ_DESC_F_INDIRECT)
    with pytest.raises(ChainError, match="indirect table"):
        drv.queue(indirect=True).pop(mem)


def test_indirect_table_longer_than_the_queue(mem: GuestMemory) -> None:
    """Spec 2.7.5.3.1: no chain may be longer than the queue, indirect tables included."""
    table = 0x100000

    def lay_out(count: int) -> None:
        for i in range(count):
            flags, nxt = (VIRTQ_DESC_F_NEXT, i + 1) if i < count - 1 else (0, 0)
            mem.write(table + 16 * i, struct.pack("<QIHH", 0x101000, 8, flags, nxt))

    lay_out(9)
    drv = _single(mem, table, 16 * 9, VIRTQ_DESC_F_INDIRECT)  # the queue holds 8
    with pytest.raises(ChainError, match="longer than the queue"):
        drv.queue(indirect=True).pop(mem)
    lay_out(8)
    drv = _single(mem, table, 16 * 8, VIRTQ_DESC_F_INDIRECT)  # exactly the queue: fine
    chain = drv.queue(indirect=True).pop(mem)
    assert chain is not None and len(chain.segments) == 8


def test_indirect_loop(mem: GuestMemory) -> None:
    table = 0x100000
    mem.write(table, struct.pack("<QIHH", 0x101000, 8, VIRTQ_DESC_F_NEXT, 1))
    mem.write(table + 16, struct.pack("<QIHH", 0x101000, 8, VIRTQ_DESC_F_NEXT, 0))
    drv = _single(mem, table, 32, VIRTQ_DESC_F_INDIRECT)
    with pytest.raises(ChainError, match="loop"):
        drv.queue(indirect=True).pop(mem)


@pytest.mark.parametrize("size", [0, 3, 12, 512, 65535])
def test_bad_queue_size(mem: GuestMemory, size: int) -> None:
    drv = Driver(mem, size=8)
    q = drv.queue()
    q.size = size
    with pytest.raises(QueueError, match="not a power of two"):
        q.check(mem)


@pytest.mark.parametrize("ring", ["desc_addr", "avail_addr", "used_addr"])
def test_ring_outside_ram(mem: GuestMemory, ring: str) -> None:
    q = Driver(mem, size=8).queue()
    setattr(q, ring, HOLE)
    with pytest.raises(QueueError, match="outside guest RAM"):
        q.check(mem)
    setattr(q, ring, REGIONS[0][1] - 16)  # aligned, but runs off the end of the region
    with pytest.raises(QueueError, match="outside guest RAM"):
        q.check(mem)


def test_misaligned_ring(mem: GuestMemory) -> None:
    q = Driver(mem, size=8).queue()
    q.desc_addr += 8
    with pytest.raises(QueueError, match="aligned"):
        q.check(mem)


def test_head_out_of_range_and_runaway_avail_index(mem: GuestMemory) -> None:
    drv = Driver(mem, size=8)
    drv.publish(9)
    with pytest.raises(QueueError, match="descriptor 9"):
        drv.queue().pop(mem)
    drv = Driver(mem, size=8)
    mem.write(drv.avail_addr + 2, struct.pack("<H", 9))
    with pytest.raises(QueueError, match="ahead"):
        drv.queue().pop(mem)


def test_not_ready_queue_refuses(mem: GuestMemory) -> None:
    q = Driver(mem, size=8).queue()
    q.ready = False
    with pytest.raises(QueueError, match="not ready"):
        q.pop(mem)


def test_no_interrupt_flag(mem: GuestMemory) -> None:
    drv = Driver(mem, size=8)
    q = drv.queue()
    assert q.needs_interrupt(mem)
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_interrupt(mem)


def test_virtqueue_rejects_bad_max_size() -> None:
    with pytest.raises(ValueError):
        Virtqueue(max_size=100)
