"""virtio-blk (virtio 1.x, section 5.2) backed by a host file.

Requests are served by one worker thread per disk: the vCPU's QueueNotify
exit only wakes it, so a throttled disk sleeps in the worker and never stalls
a vCPU. Every request is bounds-checked against the capacity fixed at open
time: nothing is read or written past the end and the file never grows.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ktstr.disk import DiskConfig, DiskThrottle, disk_serial
from ktstr.vmm.devices.virtio.mmio import VirtioMmioTransport
from ktstr.vmm.devices.virtio.queue import (
    MEMORY_ERRORS,
    ChainError,
    DescriptorChain,
    Memory,
    QueueError,
    Segment,
)
from ktstr.vmm.throttle import Throttle

if TYPE_CHECKING:
    from ktstr.vmm.bus import AttachContext

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

    def execute(self, mem: Memory, req: BlkRequest) -> int:
        """Perform `req`, write its status byte; return the used length for the ring."""
        if req.status_addr is None:
            self.errors += 1
            return 0
        written = 0
        try:
            status, written = self._dispatch(mem, req)
        except MEMORY_ERRORS as err:
            log.warning("virtio-blk %s: request %d: %s", self.path, req.head, err)
            status = S_IOERR
        except OSError as err:
            log.warning("virtio-blk %s: request %d: host I/O error: %s", self.path, req.head, err)
            status = S_IOERR
        if status != S_OK:
            self.errors += 1
        mem.write(req.status_addr, bytes([status]))
        return written + 1

    def _dispatch(self, mem: Memory, req: BlkRequest) -> tuple[int, int]:
        if req.type == T_IN:
            if not self._in_range(req.sector, _total(req.data_in)):
                return S_IOERR, 0
            self._transfer(os.preadv, mem, req.data_in, req.sector * SECTOR_SIZE)
            return S_OK, _total(req.data_in)
        if req.type == T_OUT:
            if self.read_only or not self._in_range(req.sector, _total(req.data_out)):
                return S_IOERR, 0
            self._transfer(os.pwritev, mem, req.data_out, req.sector * SECTOR_SIZE)
            return S_OK, 0
        if req.type == T_FLUSH:
            if not self.read_only:
                os.fdatasync(self.fd)
            return S_OK, 0
        if req.type == T_GET_ID:
            room = min(_total(req.data_in), ID_BYTES)
            ident = self.serial.ljust(ID_BYTES, b"\0")[:room]
            pos = 0
            for seg in _split(req.data_in, room)[0]:
                mem.write(seg.addr, ident[pos : pos + seg.length])
                pos += seg.length
            return S_OK, room
        return (S_IOERR if req.type == -1 else S_UNSUPP), 0

    def _in_range(self, sector: int, length: int) -> bool:
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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._sleep = sleep
        self.file = BlkFile(path, read_only=read_only, serial=serial)
        self.throttle = Throttle(throttle) if throttle and throttle.active else None
        self._qlock = threading.Lock()
        self._kick = threading.Event()
        self._stop = False
        self._transport: VirtioMmioTransport | None = None
        self._generation = 0
        self._thread: threading.Thread | None = None
        self.completed = 0

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
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._worker, name=f"virtio-blk:{self.file.path.name}", daemon=True
            )
            self._thread.start()
        self._kick.set()

    def notify(self, queue_index: int) -> None:
        self._kick.set()

    def reset(self) -> None:
        with self._qlock:
            self._transport = None
            self._generation += 1

    def close(self) -> None:
        self.reset()
        self._stop = True
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
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
                log.exception("virtio-blk %s: worker failed", self.file.path)
                transport = self._transport
                if transport is not None:
                    transport.needs_reset("internal device error")

    def process_queue(self) -> int:
        """Serve every available request; return how many were completed."""
        done = 0
        signal = False
        while True:
            with self._qlock:
                transport, generation = self._transport, self._generation
                if transport is None:
                    return done
                item = self._next_request(transport)
            if item is None:
                break
            delay = self.throttle.reserve(item.io_bytes) if self.throttle else 0.0
            if delay > 0:
                if signal:  # let the guest see earlier completions while this one waits
                    transport.signal_used()
                    signal = False
                self._sleep(delay)
            with self._qlock:
                if self._generation != generation:
                    return done  # the driver reset the device meanwhile: drop the request
                used = self.file.execute(transport.memory, item)
                queue = transport.queues[0]
                queue.add_used(transport.memory, item.head, used)
                signal = signal or queue.needs_interrupt(transport.memory)
            done += 1
            self.completed += 1
        if signal:
            transport.signal_used()
        return done

    def _next_request(self, transport: VirtioMmioTransport) -> BlkRequest | None:
        """Pop and parse one request (with _qlock held); a broken chain is failed right here."""
        queue, mem = transport.queues[0], transport.memory
        while True:
            try:
                chain = queue.pop(mem)
            except ChainError as err:
                log.warning("virtio-blk %s: %s", self.file.path, err)
                self.file.errors += 1
                queue.add_used(mem, err.head, _fail_partial(mem, err.segments))
                continue
            except QueueError as err:
                transport.needs_reset(str(err))
                return None
            except MEMORY_ERRORS as err:
                transport.needs_reset(f"ring access failed: {err}")
                return None
            if chain is None:
                return None
            return parse_request(mem, chain)


def _fail_partial(mem: Memory, segments: Sequence[Segment]) -> int:
    """Best effort for a malformed chain: IOERR into its last writable byte, if any."""
    writable = [s for s in segments if s.write and s.length]
    if not writable:
        return 0
    last = writable[-1]
    mem.write(last.addr + last.length - 1, bytes([S_IOERR]))
    return 1


class VirtioBlkDisk:
    """A VmDevice: one virtio-blk disk at its own virtio-mmio slot (guest /dev/vdX)."""

    def __init__(self, path: Path, config: DiskConfig, index: int = 0) -> None:
        self.path = Path(path)
        self.config = config
        self.index = index
        self.blk = VirtioBlk(
            self.path,
            read_only=config.read_only,
            serial=disk_serial(index),
            throttle=config.throttle,
        )
        self.transport: VirtioMmioTransport | None = None

    def attach(self, ctx: AttachContext) -> None:
        slot = ctx.alloc_virtio_mmio_slot()
        self.transport = VirtioMmioTransport(self.blk, ctx.memory, slot.irq)
        ctx.add_mmio(slot.base, slot.size, self.transport)

    def close(self) -> None:
        self.blk.close()
