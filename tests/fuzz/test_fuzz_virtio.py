"""Fuzzing the virtio devices the way a hostile guest drives them (hypothesis).

Three targets, each against a real small GuestMemory (two 2 MiB regions with a hole, so
out-of-RAM addresses are testable) and, for the devices, a real raw backing file and the
device's own worker thread:

- virtqueues: random descriptor tables, avail rings, ring addresses and indices; and
  valid chains with random byte flips;
- virtio-mmio registers: random reads and writes (sizes 1/2/4/8, any offset in the
  window, random values) mixed with real bring-ups, requests and ring pokes, while the
  worker serves whatever the driver kicked;
- virtio-blk requests: random headers, sectors, lengths, types and descriptor layouts,
  direct or indirect, some corrupted, with and without a throttle, read-only or not.

Properties: no exception escapes a device (it would fail the example, or be counted in
`VirtioBlk.internal_errors` if it hit the worker); no access outside guest RAM goes
unnoticed (GuestMemory refuses it, so the device must catch the refusal); every chain
handed to a device is completed in the used ring or the device reports NEEDS_RESET; the
backing file never grows (read-only: byte-identical; read-write: exactly the writes a
model of the request semantics accepts); the tracemalloc peak of one example stays under
PEAK_BYTES.

KTSTR_FUZZ_EXAMPLES sets the examples per test (default 200); runs are derandomized, so
a failure reproduces. `--hypothesis-show-statistics` lists what the examples covered.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import struct
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

# The in-process guest driver lives with the unit tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from virtio_driver import (
    DATA_BASE,
    FEATURES,
    HOLE,
    REGIONS,
    RING_BASE,
    Buf,
    Driver,
    Rig,
    make_memory,
    read_u32,
)

from ktstr.vmm.devices.virtio import mmio
from ktstr.vmm.devices.virtio.blk import (
    ID_BYTES,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR_SIZE,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    VIRTIO_BLK_F_RO,
)
from ktstr.vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    ChainError,
    QueueError,
    Virtqueue,
)
from ktstr.vmm.memory import GuestMemory
from ktstr.vmm.throttle import DiskThrottle

EXAMPLES = int(os.environ.get("KTSTR_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PEAK_BYTES = 1 << 20
"""Host memory (tracemalloc peak) one example may use: device, driver, file, thread."""
DISK_SECTORS = 64  # a 32 KiB raw backing file
T = TypeVar("T")
SETTLE_S = 10.0  # how long a device may take to answer everything it was handed


def biased(
    common: st.SearchStrategy[T], *rare: st.SearchStrategy[T], weight: int = 4
) -> st.SearchStrategy[T]:
    """`common`, `weight` times as often as each of `rare`: st.one_of picks its branches
    evenly however often one is repeated, so repeating a branch does not weight it."""
    options = [common] * weight + list(rare)
    return st.integers(0, len(options) - 1).flatmap(lambda i: options[i])


@contextmanager
def bounded_host_memory(limit: int = PEAK_BYTES) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    target(float(peak), label="tracemalloc peak bytes")
    assert peak <= limit, f"one example peaked at {peak} bytes of host memory"


# --- virtqueues -------------------------------------------------------------------------

_SIZES = st.one_of(st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([0, 3, 6, 17]))
_DATA = st.integers(DATA_BASE, DATA_BASE + 4096)  # inside RAM
_ADDRS = biased(
    _DATA,
    st.integers(0, REGIONS[1][0] + REGIONS[1][1] + 4096),  # anywhere, holes included
    st.sampled_from([HOLE, REGIONS[0][1] - 1, REGIONS[1][0] - 1, 2**64 - 1, 2**63]),
)
_LENGTHS = biased(st.integers(0, 4096), st.sampled_from([2**32 - 1, 2**31, 1 << 21]), weight=3)
_RING_ADDRS = st.one_of(st.integers(0, 0x4000), _ADDRS)


@dataclass(frozen=True)
class HostileQueue:
    size: int
    table: list[tuple[int, int, int, int]]  # (addr, len, flags, next) per descriptor
    ring: list[int]  # avail ring entries
    start: int  # the device's last_avail_idx / used_idx before the notification
    ahead: int  # how far the driver's avail idx is ahead of `start`
    indirect: bool
    fill_tables: bool  # give indirect tables plausible (still hostile) content
    rings: tuple[int, int, int] | None  # desc/avail/used addresses, None: the driver's


@st.composite
def hostile_queues(draw: st.DrawFn) -> HostileQueue:
    """Every field guest-chosen, biased towards plausible values so the deep paths (long
    chains, indirect tables, loops, wrapping indices) are reached, not just the first check."""
    size = draw(_SIZES)
    n = max(size, 1)
    index = biased(st.integers(0, n - 1), st.integers(0, 0xFFFF), weight=8)
    flags = biased(st.integers(0, 3), st.integers(0, 7), st.integers(0, 0xFFFF))
    table = draw(st.lists(st.tuples(_ADDRS, _LENGTHS, flags, index), min_size=n, max_size=n))
    return HostileQueue(
        size=size,
        table=table,
        ring=draw(st.lists(index, min_size=n, max_size=n)),
        start=draw(st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF))),
        ahead=draw(biased(st.integers(0, n), st.integers(0, 0xFFFF), weight=8)),
        indirect=draw(st.booleans()),
        fill_tables=draw(st.booleans()),
        rings=draw(biased(st.none(), st.tuples(*[_RING_ADDRS] * 3), weight=3)),
    )


def _serve(q: Virtqueue, mem: GuestMemory) -> tuple[int, bool]:
    """What a device does on one notification: take and return every available chain.
    Returns (chains returned, whether the queue had to be given up as corrupt)."""
    returned = 0
    for _ in range(q.size + 1):
        try:
            chain = q.pop(mem)
        except ChainError as err:
            assert 0 <= err.head < q.size
            event(f"chain error: {str(err).split(':', 1)[1].split()[0]}")
            q.add_used(mem, err.head, 0)
            returned += 1
            continue
        except QueueError as err:
            event(f"queue error: {str(err)[:24]}")
            return returned, True
        if chain is None:
            return returned, False
        assert 0 <= chain.head < q.size
        assert len(chain.segments) <= q.size  # indirect tables included
        event(f"good chain of {min(len(chain.segments), 3)}+ segments")
        seen_write = False
        for seg in chain.segments:
            assert mem.contains(seg.addr, seg.length)
            assert seg.write or not seen_write
            seen_write = seen_write or seg.write
        q.add_used(mem, chain.head, 0)
        returned += 1
    raise AssertionError("one notification served more chains than the queue holds")


@FUZZ
@given(hostile_queues())
def test_fuzz_virtqueue_hostile_rings(case: HostileQueue) -> None:
    with bounded_host_memory(), make_memory() as mem:
        drv = Driver(mem, size=max(case.size, 1))
        for i, (addr, length, flags, nxt) in enumerate(case.table):
            drv.write_desc(i, addr, length, flags, nxt)
            if case.fill_tables and flags & VIRTQ_DESC_F_INDIRECT and mem.contains(addr, 64):
                for j in range(4):
                    d = case.table[(i + j) % len(case.table)]
                    mem.write(addr + 16 * j, struct.pack("<QIHH", d[0], d[1], d[2] & 3, j + 1))
        for slot, head in enumerate(case.ring):
            mem.write(drv.avail_addr + 4 + 2 * slot, struct.pack("<H", head))
        mem.write(drv.avail_addr + 2, struct.pack("<H", (case.start + case.ahead) & 0xFFFF))
        q = drv.queue(indirect=case.indirect)
        q.size = case.size
        q.last_avail_idx = q.used_idx = case.start
        if case.rings is not None:
            q.desc_addr, q.avail_addr, q.used_addr = case.rings
        try:
            q.check(mem)
        except QueueError:
            event("layout refused at QueueReady")
            return
        mem.write(q.used_addr + 2, struct.pack("<H", case.start))  # where the driver left it
        try:
            pending = q.pending(mem)
        except QueueError:
            event("avail index ran ahead: needs reset")
            return
        returned, corrupt = _serve(q, mem)
        # Every chain the driver made available came back, or the device gave the queue up.
        assert corrupt or returned == pending
        used_idx = struct.unpack("<H", mem.read(q.used_addr + 2, 2))[0]
        assert used_idx == (case.start + returned) & 0xFFFF


@st.composite
def corrupted_chains(draw: st.DrawFn) -> tuple[list[list[tuple[int, bool]]], list[tuple[int, int]]]:
    """Well-formed chains (readable then writable buffers), then byte flips in the rings."""
    chains = draw(
        st.lists(
            st.lists(st.tuples(st.integers(0, 600), st.booleans()), min_size=1, max_size=5),
            min_size=1,
            max_size=4,
        )
    )
    flips = draw(st.lists(st.tuples(st.integers(0, 16 * 16 + 6 + 32 - 1), st.integers(0, 255))))
    return chains, flips


@FUZZ
@given(corrupted_chains(), st.booleans())
def test_fuzz_virtqueue_corrupted_valid_chains(
    case: tuple[list[list[tuple[int, bool]]], list[tuple[int, int]]], indirect: bool
) -> None:
    chains, flips = case
    with bounded_host_memory(), make_memory() as mem:
        drv = Driver(mem, size=16)
        for chain in chains:
            bufs = [Buf(drv.alloc(n), n, w) for n, w in sorted(chain, key=lambda c: c[1])]
            drv.add_chain(bufs)
        table_bytes = 16 * 16 + 6 + 2 * 16
        for offset, value in flips:  # descriptor table and avail ring are contiguous
            mem.write(drv.desc_addr + offset % table_bytes, bytes([value]))
        q = drv.queue(indirect=indirect)
        try:
            pending = q.pending(mem)
        except QueueError:
            event("avail index ran ahead: needs reset")
            return
        returned, corrupt = _serve(q, mem)
        assert corrupt or returned == pending
        if not flips:
            assert not corrupt and returned == len(chains)


# --- virtio-mmio registers ----------------------------------------------------------------

_REGISTERS = sorted(
    v for k, v in vars(mmio).items() if k.isupper() and isinstance(v, int) and 0 <= v <= 0x100
)
_STATUS_VALUES = [
    0,
    mmio.S_ACKNOWLEDGE,
    mmio.S_ACKNOWLEDGE | mmio.S_DRIVER,
    mmio.S_ACKNOWLEDGE | mmio.S_DRIVER | mmio.S_FEATURES_OK,
    mmio.S_ACKNOWLEDGE | mmio.S_DRIVER | mmio.S_FEATURES_OK | mmio.S_DRIVER_OK,
    mmio.S_FAILED,
    mmio.S_NEEDS_RESET,
]
_OFFSETS = biased(
    st.sampled_from(_REGISTERS),
    st.integers(0, mmio.REGION_SIZE - 1),
    st.integers(mmio.CONFIG, mmio.CONFIG + 40),
)
_VALUES = st.one_of(
    st.integers(0, 3),
    st.sampled_from(_STATUS_VALUES),
    st.sampled_from([RING_BASE, RING_BASE + 0x100, 16, 256, 512, 0xFFFF, HOLE]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
)
_ACCESS_SIZES = st.sampled_from([4, 4, 4, 4, 1, 2, 8])
_OPS = biased(
    st.tuples(st.just("write"), _OFFSETS, _ACCESS_SIZES, _VALUES),
    st.tuples(st.just("read"), _OFFSETS, _ACCESS_SIZES, st.just(0)),
    st.tuples(st.just("bring_up"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("request"), st.integers(0, DISK_SECTORS), st.just(0), st.just(0)),
    st.tuples(st.just("request"), st.integers(0, DISK_SECTORS), st.just(0), st.just(0)),
    st.tuples(st.just("poke"), st.integers(0, 16 * 16 + 6 + 32 + 6 + 128), st.just(0), _VALUES),
    st.tuples(st.just("yield"), st.just(0), st.just(0), st.just(0)),
    weight=6,
)


@FUZZ
@given(st.booleans(), st.lists(_OPS, min_size=4, max_size=60))
def test_fuzz_mmio_registers(start_live: bool, ops: list[tuple[str, int, int, int]]) -> None:
    with (
        bounded_host_memory(),
        tempfile.TemporaryDirectory() as tmp,
        Rig(Path(tmp), sectors=DISK_SECTORS) as r,
    ):
        size = r.path.stat().st_size
        t = r.transport
        if start_live:  # the random accesses then race a running worker from the start
            assert r.up() & mmio.S_DRIVER_OK
        for kind, offset, width, value in ops:
            if kind == "write":
                t.mmio_write(offset, (value & (2**64 - 1)).to_bytes(8, "little")[:width])
            elif kind == "read":
                assert len(t.mmio_read(offset, width)) == width
            elif kind == "bring_up":
                event(f"bring-up status {r.up() & 0xF:#x}")
            elif kind == "request":
                r.request(T_IN, offset, in_len=512)
                r.drv.kick(t)
            elif kind == "yield":
                time.sleep(0.002)  # let the worker serve what was kicked, mid-sequence
            else:  # the guest scribbles over its own rings
                r.mem.write(r.drv.desc_addr + offset, bytes([value & 0xFF]))
        time.sleep(0.005)  # and whatever was kicked last
        status = read_u32(t, mmio.STATUS)
        event(f"ended live: {bool(status & mmio.S_DRIVER_OK)}")
        event(f"ended needing a reset: {bool(status & mmio.S_NEEDS_RESET)}")
        event(f"writes refused: {min(t.refused_writes, 3)}+")
        # Whatever happened, a reset and a clean bring-up give a working disk again.
        t.mmio_write(mmio.STATUS, bytes(4))  # waits out the worker's request in progress
        event(f"requests served: {min(r.blk.completed, 3)}+")
        assert r.blk.internal_errors == 0
        r.mem.write(0x40000, bytes(0x1000))
        r.drv = Driver(r.mem, size=16, base=0x40000)
        assert r.up() & mmio.S_DRIVER_OK
        r.request(T_IN, 1, in_len=512)
        assert r.complete(timeout=SETTLE_S)[0][1] == 513
        assert r.status() == S_OK
        assert r.data_in() == r.path.read_bytes()[512:1024]
        assert r.path.stat().st_size == size


# --- virtio-blk requests ------------------------------------------------------------------

_KNOWN_TYPES = [T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID]
_CORRUPTIONS = ["loop", "next out of range", "buffer in the hole", "huge length", "nested"]


@dataclass(frozen=True)
class BlkCase:
    rtype: int
    sector: int
    length: int
    header_len: int  # < 16: a short header
    header_cuts: list[int]
    data_cuts: list[int]
    data_writable: bool
    status: str  # byte | readable | missing | wide | empty tail
    indirect: bool
    corrupt: str | None
    seed: int


@st.composite
def blk_cases(draw: st.DrawFn) -> BlkCase:
    rtype = draw(
        biased(
            st.sampled_from(_KNOWN_TYPES),
            st.sampled_from([3, 11, 13, 0xFFFFFFFF]),
            st.integers(0, 2**32 - 1),
            weight=8,
        )
    )
    whole = st.integers(0, 8).map(lambda n: n * SECTOR_SIZE)
    length = draw(biased(whole, st.integers(0, 5000), weight=3))
    natural = rtype in (T_IN, T_GET_ID)
    return BlkCase(
        rtype=rtype,
        sector=draw(
            biased(
                st.integers(0, DISK_SECTORS - 8),
                st.integers(DISK_SECTORS - 8, DISK_SECTORS + 2),
                st.sampled_from([DISK_SECTORS - 1, 2**63, 2**64 - 1]),
                st.integers(0, 2**64 - 1),
                weight=6,
            )
        ),
        length=length,
        header_len=draw(biased(st.just(16), st.integers(0, 15), weight=9)),
        header_cuts=draw(st.lists(st.integers(1, 15), max_size=2, unique=True)),
        data_cuts=draw(st.lists(st.integers(1, max(length - 1, 1)), max_size=3, unique=True)),
        data_writable=draw(biased(st.just(natural), st.booleans(), weight=9)),
        status=draw(st.sampled_from(["byte"] * 16 + ["readable", "missing", "wide", "empty tail"])),
        indirect=draw(st.booleans()),
        corrupt=draw(biased(st.none(), st.sampled_from(_CORRUPTIONS), weight=15)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _pieces(addr: int, length: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = [0, *sorted(c for c in cuts if 0 < c < length), length]
    return [(addr + a, b - a) for a, b in itertools.pairwise(points) if b > a]


@dataclass
class Laid:
    """One request as the driver laid it out, and what a correct device must do with it."""

    case: BlkCase
    head: int
    bufs: list[Buf]
    payload: bytes  # what the readable buffers hold, in chain order


def _lay_out(r: Rig, case: BlkCase) -> Laid:
    rnd = random.Random(case.seed)
    header = struct.pack("<IIQ", case.rtype, 0, case.sector)[: case.header_len]
    bufs: list[Buf] = []
    payload = b""
    if header:
        addr = r.drv.alloc(header)
        bufs += [Buf(a, n) for a, n in _pieces(addr, len(header), case.header_cuts)]
        payload += header
    if case.length:
        data = rnd.randbytes(case.length)
        addr = r.drv.alloc(len(data) if case.data_writable else data)
        bufs += [Buf(a, n, case.data_writable) for a, n in _pieces(addr, len(data), case.data_cuts)]
        if not case.data_writable:
            payload += data
    status = r.drv.alloc(b"\xff\xff\xff\xff")
    bufs += {
        "byte": [Buf(status, 1, True)],
        "readable": [Buf(status, 1)],
        "missing": [],
        "wide": [Buf(status, 4, True)],
        "empty tail": [Buf(status, 1, True), Buf(status + 1, 0, True)],
    }[case.status]
    if not bufs:
        bufs = [Buf(status, 0)]
    add = r.drv.add_indirect_chain if case.indirect else r.drv.add_chain
    head = add(bufs)
    if case.corrupt:
        _corrupt(r, head, len(bufs), case)
    return Laid(case, head, bufs, payload)


def _corrupt(r: Rig, head: int, count: int, case: BlkCase) -> None:
    """Break one descriptor of the chain just published (its table, if indirect)."""
    if case.indirect:
        table = struct.unpack("<Q", r.mem.read(r.drv.desc_addr + 16 * head, 8))[0]
        addrs, first = [table + 16 * i for i in range(count)], 0
    else:
        first = head
        addrs = [r.drv.desc_addr + 16 * ((head + i) % r.drv.size) for i in range(count)]
    addr, length, flags, nxt = struct.unpack("<QIHH", r.mem.read(addrs[-1], 16))
    corrupt = case.corrupt
    if corrupt == "nested" and not case.indirect and count == 1:
        # A lone direct descriptor flagged INDIRECT is a (garbage) table, not an error.
        corrupt = "loop"
    if corrupt == "loop":
        flags, nxt = flags | VIRTQ_DESC_F_NEXT, first
    elif corrupt == "next out of range":
        flags, nxt = flags | VIRTQ_DESC_F_NEXT, 0xFFFF
    elif corrupt == "buffer in the hole":
        addr = HOLE
    elif corrupt == "huge length":
        length = 2**32 - 1
    else:  # an indirect flag inside an indirect table, or inside a direct chain
        flags |= VIRTQ_DESC_F_INDIRECT
    r.mem.write(addrs[-1], struct.pack("<QIHH", addr, length, flags, nxt))


@dataclass(frozen=True)
class Expected:
    status: int | None  # None: the chain has no status byte, nothing may happen
    status_addr: int | None
    rtype: int
    sector: int
    data_out: bytes
    data_in: list[Buf]


def _expect(laid: Laid, sectors: int, read_only: bool) -> Expected | None:
    """An independent model of virtio-blk request semantics; None for a malformed chain
    (the device must fail it without doing any I/O)."""
    bufs = laid.bufs
    if laid.case.corrupt or any(a.write and not b.write for a, b in itertools.pairwise(bufs)):
        return None
    writable = [b for b in bufs if b.write and b.length]
    in_len = sum(b.length for b in writable) - 1
    if in_len < 0:
        return Expected(None, None, -1, 0, b"", [])
    status_addr = writable[-1].addr + writable[-1].length - 1
    data_in: list[Buf] = []
    left = in_len
    for b in writable:
        take = min(b.length, left)
        if take:
            data_in.append(Buf(b.addr, take, True))
        left -= take
    if len(laid.payload) < 16:
        return Expected(S_IOERR, status_addr, -1, 0, b"", data_in)
    rtype, _, sector = struct.unpack("<IIQ", laid.payload[:16])
    data_out = laid.payload[16:]

    def in_range(n: int) -> bool:
        return n % SECTOR_SIZE == 0 and sector + n // SECTOR_SIZE <= sectors

    if rtype == T_IN:
        status = S_OK if in_range(in_len) else S_IOERR
    elif rtype == T_OUT:
        status = S_OK if in_range(len(data_out)) and not read_only else S_IOERR
    elif rtype in (T_FLUSH, T_GET_ID):
        status = S_OK
    else:
        status = S_UNSUPP
    return Expected(status, status_addr, rtype, sector, data_out, data_in)


def _throttles() -> st.SearchStrategy[DiskThrottle | None]:
    # Fast enough that a drained bucket makes requests wait (a fraction of a millisecond
    # each), so the wait path runs without making the fuzz slow.
    return st.sampled_from([None, DiskThrottle(iops=20_000, bytes_per_sec=20 << 20)])


@FUZZ
@given(
    st.lists(blk_cases(), min_size=2, max_size=8),
    st.booleans(),
    _throttles(),
    st.booleans(),
)
def test_fuzz_blk_requests(
    cases: list[BlkCase], read_only: bool, throttle: DiskThrottle | None, kick_each: bool
) -> None:
    with (
        bounded_host_memory(),
        tempfile.TemporaryDirectory() as tmp,
        Rig(Path(tmp), sectors=DISK_SECTORS, read_only=read_only, throttle=throttle, size=128) as r,
    ):
        before = r.path.read_bytes()
        features = FEATURES | ((1 << VIRTIO_BLK_F_RO) if read_only else 0)
        assert r.up(features) & mmio.S_DRIVER_OK
        if r.blk.throttle is not None:  # start with both buckets empty
            for bucket in (r.blk.throttle.iops, r.blk.throttle.bytes):
                assert bucket is not None
                bucket.reserve(bucket.capacity)
        laid = []
        for case in cases:
            laid.append(_lay_out(r, case))
            if kick_each:
                r.drv.kick(r.transport)
        got = dict(r.complete(len(laid), timeout=SETTLE_S))
        # Every chain came back (no ring-level damage here, so no reset either).
        assert sorted(got) == sorted(x.head for x in laid)
        assert not read_u32(r.transport, mmio.STATUS) & mmio.S_NEEDS_RESET
        assert r.blk.internal_errors == 0
        model = bytearray(before)
        for x in laid:
            event(_check_one(r, x, _expect(x, DISK_SECTORS, read_only), got[x.head], model))
        after = r.path.read_bytes()
        assert len(after) == len(before)
        if read_only:
            assert hashlib.sha256(after).digest() == hashlib.sha256(before).digest()
        assert after == bytes(model)  # exactly the writes the model accepted, nowhere else


def _check_one(r: Rig, x: Laid, want: Expected | None, used: int, model: bytearray) -> str:
    """Check one completed request against the model (applying an accepted write to it);
    return what it covered."""
    if want is None:
        assert used <= 1
        return "malformed chain: failed without I/O"
    if want.status is None:
        assert used == 0
        return "no status byte: returned unexecuted"
    status = r.mem.read(want.status_addr or 0, 1)[0]
    name = {T_IN: "read", T_OUT: "write", T_FLUSH: "flush", T_GET_ID: "get-id", -1: "short"}
    assert status == want.status, (x.case, status, want.status)
    in_len = sum(b.length for b in want.data_in)
    if status == S_OK and want.rtype == T_IN:
        assert used == in_len + 1
        data = b"".join(r.mem.read(b.addr, b.length) for b in want.data_in)
        start = want.sector * SECTOR_SIZE
        assert data == bytes(model[start : start + in_len])
    elif status == S_OK and want.rtype == T_OUT:
        assert used == 1
        start = want.sector * SECTOR_SIZE
        model[start : start + len(want.data_out)] = want.data_out
    elif status == S_OK and want.rtype == T_GET_ID:
        room = min(in_len, ID_BYTES)
        assert used == room + 1
        data = b"".join(r.mem.read(b.addr, b.length) for b in want.data_in)[:room]
        assert data == b"ktstr-disk0".ljust(ID_BYTES, b"\0")[:room]
    else:
        assert used == 1
    return f"{name.get(want.rtype, 'other')}: status {status}"


@pytest.mark.parametrize("read_only", [False, True])
def test_blk_model_follows_a_plain_write(tmp_path: Path, read_only: bool) -> None:
    """The model is not vacuous: it accepts a plain write on a read-write disk (and the
    file then matches it) and expects IOERR and no change on a read-only one."""
    with Rig(tmp_path, sectors=DISK_SECTORS, read_only=read_only) as r:
        assert r.up() & mmio.S_DRIVER_OK
        before = r.path.read_bytes()
        x = _lay_out(r, BlkCase(T_OUT, 3, 512, 16, [], [100], False, "byte", False, None, 7))
        want = _expect(x, DISK_SECTORS, read_only)
        assert want is not None and want.status == (S_IOERR if read_only else S_OK)
        model = bytearray(before)
        _check_one(r, x, want, dict(r.complete())[x.head], model)
        assert (bytes(model) == before) is read_only
        assert r.path.read_bytes() == bytes(model)
