"""Split virtqueues (virtio 1.x, section 2.7): parse what the guest offers, return used buffers.

Everything read from guest memory is hostile. Ring addresses, sizes, head
indices, descriptor links, lengths and indirect tables are checked before use;
memory access itself goes through GuestMemory, which refuses anything outside
guest RAM. Problems surface as two exceptions:

- `ChainError`: one request is malformed but its head index is valid, so the
  device can still complete it (with an error status) and carry on.
- `QueueError`: the ring itself is corrupt (bad addresses, head index out of
  range, avail index running ahead); the device stops using the queue and
  asks the driver for a reset. `QueueNotReady`, a subclass, means the driver
  has not enabled the queue (or stopped it).

Every chain costs at most one queue size of descriptors (indirect tables
included, spec 2.7.5.3.1), so a notification's work is bounded.

`Virtqueue.lock` serialises the device's ring walk (pop, add_used) with the
transport's configuration writes (QueueNum, ring addresses, QueueReady, reset),
which come from vCPU threads: a walk always sees one whole layout.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ktstr.vmm.memory import GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768
# A request's total buffer size beyond this is nonsense (and would overflow the u32 used.len).
MAX_CHAIN_BYTES = (1 << 32) - 1

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_AddSegment = Callable[[int, int, int], None]


class Memory(Protocol):
    """The part of GuestMemory a virtqueue uses."""

    def read(self, gpa: int, length: int) -> bytes: ...
    def write(self, gpa: int, data: bytes) -> None: ...
    def view(self, gpa: int, length: int) -> memoryview: ...


class VirtqueueError(Exception):
    """A guest-caused virtqueue problem (never a host bug)."""


class QueueError(VirtqueueError):
    """The queue as a whole is unusable until the driver resets the device."""


class QueueNotReady(QueueError):
    """The driver has not set QueueReady (or cleared it): there is nothing to serve."""


class ChainError(VirtqueueError):
    """One descriptor chain is malformed; `head` is valid and can be returned as used."""

    def __init__(self, head: int, message: str, segments: list[Segment] | None = None) -> None:
        super().__init__(f"descriptor chain {head}: {message}")
        self.head = head
        # The part of the chain that parsed cleanly (a device may still report a status in it).
        self.segments = segments or []


# What GuestMemory raises for an access outside guest RAM.
MEMORY_ERRORS: tuple[type[Exception], ...] = (GuestMemoryError,)
# What a ring access can raise when the guest broke the ring or its RAM is gone.
RING_ERRORS: tuple[type[Exception], ...] = (QueueError, *MEMORY_ERRORS)


@dataclass(frozen=True)
class Segment:
    """One guest buffer of a chain: `length` bytes at `addr`; `write` = device-writable."""

    addr: int
    length: int
    write: bool


@dataclass(frozen=True)
class DescriptorChain:
    head: int
    segments: list[Segment]

    @property
    def readable(self) -> list[Segment]:
        return [s for s in self.segments if not s.write]

    @property
    def writable(self) -> list[Segment]:
        return [s for s in self.segments if s.write]


def _read(mem: Memory, gpa: int, length: int) -> bytes:
    data = mem.read(gpa, length)
    if len(data) != length:
        raise ValueError(f"short guest read at {gpa:#x}")
    return data


@dataclass
class Virtqueue:
    """One split virtqueue's driver-programmed state plus the device's ring cursors."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    last_avail_idx: int = 0
    used_idx: int = 0
    indirect: bool = False  # VIRTIO_RING_F_INDIRECT_DESC negotiated
    _checked: bool = field(default=False, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.max_size <= MAX_QUEUE_SIZE or self.max_size & (self.max_size - 1):
            raise ValueError(f"max_size {self.max_size} must be a power of two <= 32768")
        if self.size == 0:
            self.size = self.max_size

    def reset(self) -> None:
        with self.lock:
            self.size = self.max_size
            self.ready = False
            self.desc_addr = self.avail_addr = self.used_addr = 0
            self.last_avail_idx = self.used_idx = 0
            self.indirect = False
            self._checked = False

    # --- layout checks --------------------------------------------------------------------

    def check(self, mem: Memory) -> None:
        """Validate size, alignment and that all three rings lie in guest RAM."""
        n = self.size
        if not 0 < n <= self.max_size or n & (n - 1):
            raise QueueError(f"queue size {n} is not a power of two in 1..{self.max_size}")
        rings = (
            ("descriptor table", self.desc_addr, 16, DESC_SIZE * n),
            ("avail ring", self.avail_addr, 2, 6 + 2 * n),
            ("used ring", self.used_addr, 4, 6 + 8 * n),
        )
        for name, addr, align, length in rings:
            if addr % align:
                raise QueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
            try:
                mem.view(addr, length)
            except MEMORY_ERRORS as err:
                raise QueueError(f"{name} at {addr:#x}+{length:#x} is outside guest RAM") from err
        self._checked = True

    def _ensure_checked(self, mem: Memory) -> None:
        if not self.ready:
            raise QueueNotReady("queue is not ready")
        if not self._checked:
            self.check(mem)

    # --- avail side (public methods take `lock`; the _underscored ones expect it held) -------

    def _avail_field(self, mem: Memory, offset: int) -> int:
        self._ensure_checked(mem)
        return int(_U16.unpack(_read(mem, self.avail_addr + offset, 2))[0])

    def pending(self, mem: Memory) -> int:
        """How many chains the driver has made available that we have not taken."""
        with self.lock:
            return self._pending(mem)

    def _pending(self, mem: Memory) -> int:
        pending = (self._avail_field(mem, 2) - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise QueueError(
                f"avail index ran {pending} entries ahead of the device (queue size {self.size})"
            )
        return pending

    def pop(self, mem: Memory) -> DescriptorChain | None:
        """Take the next available chain, or None. Raises ChainError / QueueError."""
        with self.lock:
            return self._pop(mem)

    def _pop(self, mem: Memory) -> DescriptorChain | None:
        if self._pending(mem) == 0:
            return None
        slot = self.last_avail_idx % self.size
        (head,) = _U16.unpack(_read(mem, self.avail_addr + 4 + 2 * slot, 2))
        if head >= self.size:
            raise QueueError(f"avail ring entry {slot} names descriptor {head} >= {self.size}")
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return DescriptorChain(head, self._walk(mem, head))

    def _walk(self, mem: Memory, head: int) -> list[Segment]:
        segments: list[Segment] = []
        total = 0
        seen_write = False

        def add(addr: int, length: int, flags: int) -> None:
            nonlocal total, seen_write
            write = bool(flags & VIRTQ_DESC_F_WRITE)
            if not write and seen_write:
                raise ChainError(head, "device-readable buffer after a writable one", segments)
            seen_write = seen_write or write
            total += length
            if total > MAX_CHAIN_BYTES:
                raise ChainError(head, f"chain longer than {MAX_CHAIN_BYTES} bytes", segments)
            try:
                mem.view(addr, length)
            except MEMORY_ERRORS:
                raise ChainError(
                    head, f"buffer {addr:#x}+{length:#x} is outside guest RAM", segments
                ) from None
            segments.append(Segment(addr, length, write))

        index = head
        for _ in range(self.size):
            raw = _read(mem, self.desc_addr + DESC_SIZE * index, DESC_SIZE)
            addr, length, flags, nxt = _DESC.unpack(raw)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(head, "indirect descriptor without INDIRECT_DESC", segments)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with NEXT set", segments)
                if segments:
                    # Spec 2.7.5.3.1: an indirect table is the whole chain.
                    raise ChainError(head, "indirect descriptor inside a chain", segments)
                self._walk_indirect(mem, head, addr, length, add)
                return segments
            add(addr, length, flags)
            if not flags & VIRTQ_DESC_F_NEXT:
                return segments
            if nxt >= self.size:
                raise ChainError(head, f"next index {nxt} >= queue size {self.size}", segments)
            index = nxt
        raise ChainError(head, f"chain longer than the queue ({self.size}): a loop", segments)

    def _walk_indirect(
        self, mem: Memory, head: int, table: int, length: int, add: _AddSegment
    ) -> None:
        if length == 0 or length % DESC_SIZE:
            raise ChainError(head, f"indirect table length {length} is not a multiple of 16")
        count = length // DESC_SIZE
        if count > self.size:
            raise ChainError(
                head, f"indirect table of {count} entries is longer than the queue ({self.size})"
            )
        try:
            raw = _read(mem, table, length)
        except MEMORY_ERRORS:
            raise ChainError(head, f"indirect table {table:#x}+{length:#x} outside RAM") from None
        index = 0
        for _ in range(count):
            addr, blen, flags, nxt = _DESC.unpack_from(raw, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise ChainError(head, "nested indirect descriptor")
            add(addr, blen, flags)
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            if nxt >= count:
                raise ChainError(head, f"indirect next index {nxt} >= table size {count}")
            index = nxt
        raise ChainError(head, f"indirect chain longer than its table ({count}): a loop")

    # --- used side ------------------------------------------------------------------------

    def add_used(self, mem: Memory, head: int, length: int) -> None:
        """Return chain `head` with `length` bytes written; publishes the new used index."""
        with self.lock:
            self._ensure_checked(mem)
            slot = self.used_idx % self.size
            mem.write(self.used_addr + 4 + 8 * slot, _USED_ELEM.pack(head, length & 0xFFFFFFFF))
            # The element must be visible before the index; the GIL and x86 TSO keep this order.
            mem.write(self.used_addr + 2, _U16.pack((self.used_idx + 1) & 0xFFFF))
            self.used_idx = (self.used_idx + 1) & 0xFFFF

    def needs_interrupt(self, mem: Memory) -> bool:
        with self.lock:
            return not self._avail_field(mem, 0) & VIRTQ_AVAIL_F_NO_INTERRUPT
