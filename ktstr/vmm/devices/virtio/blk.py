"""virtio-blk (virtio 1.x, section 5.2) backed by a host file.

Requests are served by one worker thread per disk: the vCPU's QueueNotify
exit only wakes it, so a throttled disk sleeps in the worker and never stalls
a vCPU. Every request is bounds-checked against the capacity fixed at open
time, before it is charged to the throttle: nothing is read or written past
the end, the file never grows, and a request that fails costs no tokens.

Every chain the worker takes is returned in the used ring with an interrupt,
or, if the ring itself fails, the device sets DEVICE_NEEDS_RESET: a request
is never silently left pending. One pass serves at most a queue-full, so the
worker announces completions and sees close()/reset between passes.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ktstr.vmm.devices.virtio.mmio import VirtioMmioTransport
from ktstr.vmm.devices.virtio.queue import (
    MEMORY_ERRORS,
    RING_ERRORS,
    ChainError,
    DescriptorChain,
    Memory,
    QueueError,
    QueueNotReady,
    Segment,
)
from ktstr.vmm.throttle import DiskThrottle, Throttle

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
QUEUE_SIZE = 256
SEG_MAX = 128
ID_BYTES = 20
IOV_MAX = 1024

# Feature bits.
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

# Request types.
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8

# Status values.
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

_HEADER = struct.Struct("<IIQ")


def _split(segments: Sequence[Segment], n: int) -> tuple[list[Segment], list[Segment]]:
    """The first `n` bytes of a buffer list and the rest (n must not exceed the total)."""
    head: list[Segment] = []
    tail: list[Segment] = []
    for seg in segments:
        if n >= seg.length:
            head.append(seg)
            n -= seg.length
        elif n > 0:
            head.append(Segment(seg.addr, n, seg.write))
            tail.append(Segment(seg.addr + n, seg.length - n, seg.write))
            n = 0
        else:
            tail.append(seg)
    return head, tail


def _total(segments: Sequence[Segment]) -> int:
    return sum(s.length for s in segments)


@dataclass(frozen=True)
class BlkRequest:
    head: int
    type: int
    sector: int
    data_out: list[Segment]  # device-readable payload (T_OUT)
    data_in: list[Segment]  # device-writable payload (T_IN, T_GET_ID)
    status_addr: int | None  # None: the chain has no room for a status byte

    @property
    def io_bytes(self) -> int:
        if self.type == T_IN:
            return _total(self.data_in)
        if self.type == T_OUT:
            return _total(self.data_out)
        return 0


def parse_request(mem: Memory, chain: DescriptorChain) -> BlkRequest:
    """Split a chain into header, payload and status (any descriptor layout is accepted)."""
    readable, writable = chain.readable, chain.writable
    status_addr = None
    data_in: list[Segment] = []
    if _total(writable) >= 1:
        data_in, status = _split(writable, _total(writable) - 1)
        status_addr = status[0].addr
    if _total(readable) < _HEADER.size:
        return BlkRequest(chain.head, -1, 0, [], data_in, status_addr)
    header_segs, data_out = _split(readable, _HEADER.size)
    raw = b"".join(mem.read(s.addr, s.length) for s in header_segs)
    rtype, _reserved, sector = _HEADER.unpack(raw)
    return BlkRequest(chain.head, rtype, sector, data_out, data_in, status_addr)


class BlkFile:
    """The host file behind one disk, with the request semantics of virtio-blk."""

    def __init__(self, path: Path, *, read_only: bool, serial: str) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        self.path = path
        self.read_only = read_only
        self.serial = serial.encode()[:ID_BYTES]
        self.sectors = os.fstat(self.fd).st_size // SECTOR_SIZE
        self.errors = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def runnable(self, req: BlkRequest) -> bool:
        """Whether `req` will touch the file or guest buffers (what the throttle charges)."""
        return req.status_addr is not None and self._reject(req) is None

    def _reject(self, req: BlkRequest) -> int | None:
        """The status of a request that fails without any I/O, or None if it can run."""
        if req.type == T_IN:
            return None if self._in_range(req.sector, _total(req.data_in)) else S_IOERR
        if req.type == T_OUT:
            in_range = self._in_range(req.sector, _total(req.data_out))
            return None if in_range and not self.read_only else S_IOERR
        if req.type in (T_FLUSH, T_GET_ID):
            return None
        return S_IOERR if req.type == -1 else S_UNSUPP

    def execute(self, mem: Memory, req: BlkRequest) -> int:
        """Perform `req`, write its status byte; return the used length for the ring."""
        if req.status_addr is None:
            self.errors += 1  # nowhere to report to: not executed
            return 0
        written = 0
        status = self._reject(req)
        if status is None:
            try:
                written = self._dispatch(mem, req)
                status = S_OK
            except MEMORY_ERRORS as err:
                log.warning("virtio-blk %s: request %d: %s", self.path, req.head, err)
                status = S_IOERR
            except OSError as err:
                log.warning(
                    "virtio-blk %s: request %d: host I/O error: %s", self.path, req.head, err
                )
                status = S_IOERR
        if status != S_OK:
            self.errors += 1
        try:
            mem.write(req.status_addr, bytes([status]))
        except MEMORY_ERRORS:
            return written  # guest RAM went away (teardown); the ring update will say so
        return written + 1

    def _dispatch(self, mem: Memory, req: BlkRequest) -> int:
        """Run a request `_reject` let through; return the bytes written to guest buffers."""
        if req.type == T_IN:
            self._transfer(os.preadv, mem, req.data_in, req.sector * SECTOR_SIZE)
            return _total(req.data_in)
        if req.type == T_OUT:
            self._transfer(os.pwritev, mem, req.data_out, req.sector * SECTOR_SIZE)
            return 0
        if req.type == T_FLUSH:
            if not self.read_only:  # a read-only disk has nothing to flush
                os.fdatasync(self.fd)
            return 0
        room = min(_total(req.data_in), ID_BYTES)  # T_GET_ID
        ident = self.serial.ljust(ID_BYTES, b"\0")[:room]
        pos = 0
        for seg in _split(req.data_in, room)[0]:
            mem.write(seg.addr, ident[pos : pos + seg.length])
            pos += seg.length
        return room

    def _in_range(self, sector: int, length: int) -> bool:
        # Exact integers: a sector near 2**64 cannot wrap into range.
        if length % SECTOR_SIZE:
            return False
        return sector <= self.sectors and sector + length // SECTOR_SIZE <= self.sectors

    def _transfer(
        self,
        op: Callable[[int, Sequence[memoryview], int], int],
        mem: Memory,
        segments: Sequence[Segment],
        offset: int,
    ) -> None:
        """preadv/pwritev straight between the file and guest RAM, resuming short transfers."""
        views = [mem.view(s.addr, s.length) for s in segments if s.length]
        while views:
            batch = views[:IOV_MAX]
            done = op(self.fd, batch, offset)
            if done <= 0:
                raise OSError(errno.EIO, "unexpected end of file")
            offset += done
            while views and done >= len(views[0]):
                done -= len(views.pop(0))
            if done:
                views[0] = views[0][done:]


class VirtioBlk:
    """The virtio-blk device: a VirtioBackend with one request queue and a worker thread."""

    device_id = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_max_size = QUEUE_SIZE

    def __init__(
        self,
        path: Path,
        *,
        read_only: bool = False,
        serial: str = "",
        throttle: DiskThrottle | None = None,
    ) -> None:
        self.file = BlkFile(path, read_only=read_only, serial=serial)
        self.throttle = Throttle(throttle) if throttle and throttle.active else None
        self._qlock = threading.Lock()
        self._kick = threading.Event()
        self._stop = False
        self._transport: VirtioMmioTransport | None = None
        self._generation = 0
        self.thread: threading.Thread | None = None
        self.completed = 0
        self.internal_errors = 0  # host bugs caught in the worker (never guest-caused)

    # --- VirtioBackend --------------------------------------------------------------------

    def device_features(self) -> int:
        bits = [VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH]
        if self.file.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        return sum(1 << b for b in bits)

    def config_bytes(self) -> bytes:
        # struct virtio_blk_config up to blk_size: capacity, size_max, seg_max, geometry, blk_size
        return struct.pack("<QIIHBBI", self.file.sectors, 0, SEG_MAX, 0, 0, 0, SECTOR_SIZE)

    def config_read(self, offset: int, size: int) -> bytes:
        return self.config_bytes()[offset : offset + size]

    def config_write(self, offset: int, data: bytes) -> None:
        pass  # writeback toggling (F_CONFIG_WCE) is not offered

    def activate(self, transport: VirtioMmioTransport) -> None:
        with self._qlock:
            self._transport = transport
            self._generation += 1
        if self.thread is None:
            self.thread = threading.Thread(
                target=self._worker, name=f"virtio-blk:{self.file.path.name}", daemon=True
            )
            self.thread.start()
        self._kick.set()

    def notify(self, queue_index: int) -> None:
        self._kick.set()

    def reset(self) -> None:
        with self._qlock:
            self._transport = None
            self._generation += 1

    def close(self) -> None:
        """Stop the worker (cutting any throttle wait short) and close the file."""
        self._stop = True
        if self.throttle is not None:
            self.throttle.close()
        self.reset()  # waits out a request in progress; later ones are dropped
        self._kick.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.file.close()

    # --- request processing ---------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            self._kick.wait()
            if self._stop:
                return
            self._kick.clear()
            try:
                self.process_queue()
            except Exception:  # a host bug must not silently kill the disk
                self.internal_errors += 1
                log.exception("virtio-blk %s: worker failed", self.file.path)
                transport = self._transport
                if transport is not None:
                    transport.needs_reset("internal device error")

    def process_queue(self) -> int:
        """Serve up to one queue-full of available requests; return how many were completed.

        If that many were served, the kick is re-armed and the rest waits for the next
        pass. Completions are announced before any throttle wait and when the pass ends,
        however it ends.
        """
        done = 0
        generation = self._generation
        unannounced: VirtioMmioTransport | None = None
        try:
            while True:
                with self._qlock:
                    transport, generation = self._transport, self._generation
                    if transport is None:
                        return done
                    queue = transport.queues[0]
                    if done >= queue.size:
                        self._kick.set()
                        return done
                    item = self._next_request(transport)
                    if isinstance(item, ChainError):
                        used = _fail_partial(transport.memory, item.segments)
                        done += 1
                        unannounced = transport
                        if not self._complete(transport, item.head, used):
                            return done
                        continue
                if item is None:
                    return done
                if self.throttle is not None and self.file.runnable(item):
                    delay = self.throttle.reserve(item.io_bytes)
                    if delay > 0:
                        if unannounced is not None:  # the guest sees those while this waits
                            _announce(unannounced)
                            unannounced = None
                        self.throttle.pause(delay)
                with self._qlock:
                    if self._generation != generation:
                        return done  # the driver reset the device meanwhile: drop the request
                    used = self.file.execute(transport.memory, item)
                    done += 1
                    unannounced = transport
                    if not self._complete(transport, item.head, used):
                        return done
                self.completed += 1
        finally:
            if unannounced is not None and self._generation == generation:
                _announce(unannounced)

    @staticmethod
    def _complete(transport: VirtioMmioTransport, head: int, used: int) -> bool:
        """Return chain `head` in the used ring; False (and the device needs a reset) if the
        ring cannot take it, e.g. the driver stopped the queue or it is no longer in RAM."""
        try:
            transport.queues[0].add_used(transport.memory, head, used)
        except RING_ERRORS as err:
            transport.needs_reset(f"used ring update for chain {head} failed: {err}")
            return False
        return True

    def _next_request(self, transport: VirtioMmioTransport) -> BlkRequest | ChainError | None:
        """Pop and parse one request (with _qlock held): the request, a malformed chain to fail,
        or None when there is nothing (more) to serve."""
        queue, mem = transport.queues[0], transport.memory
        try:
            chain = queue.pop(mem)
            return None if chain is None else parse_request(mem, chain)
        except ChainError as err:
            log.warning("virtio-blk %s: %s", self.file.path, err)
            self.file.errors += 1
            return err
        except QueueNotReady:
            return None  # not enabled, or stopped by the driver: nothing to serve
        except QueueError as err:
            transport.needs_reset(str(err))
        except MEMORY_ERRORS as err:
            transport.needs_reset(f"ring access failed: {err}")
        return None


def _announce(transport: VirtioMmioTransport) -> None:
    """Raise the used-buffer interrupt unless the driver suppressed it. If the ring cannot
    be read any more, raise it anyway: a spurious interrupt is harmless, a lost one hangs."""
    queue = transport.queues[0]
    try:
        wanted = queue.needs_interrupt(transport.memory)
    except RING_ERRORS:
        wanted = True
    if wanted:
        transport.signal_used()


def _fail_partial(mem: Memory, segments: Sequence[Segment]) -> int:
    """Best effort for a malformed chain: IOERR into its last writable byte, if any."""
    writable = [s for s in segments if s.write and s.length]
    if not writable:
        return 0
    last = writable[-1]
    try:
        mem.write(last.addr + last.length - 1, bytes([S_IOERR]))
    except MEMORY_ERRORS:
        return 0
    return 1
