"""virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2).

The transport owns the register file, feature negotiation, the virtqueue
configuration and the interrupt status; a `VirtioBackend` (virtio-blk, ...)
supplies the device type, its feature bits, its config space, and handles
queue notifications.

Locking: `_lock` guards registers and is held across backend.reset() and
backend.activate(); the backend may call `signal_used` / `signal_config` /
`needs_reset` from its own threads at any time, which only take `_irq_lock`.
Each queue's configuration writes also take that queue's `Virtqueue.lock`,
which the backend's worker holds while it walks or updates the rings, so a
walk never sees a half-written layout. `_lock` is never taken from a backend
thread, so the order is always _lock -> backend -> Virtqueue.lock -> _irq_lock.

The guest is hostile: every register write is accepted or refused, never
raises. Writes the spec forbids (queue layout while the queue is ready or the
device is live, re-enabling a queue of a live device, driver features after
FEATURES_OK, clearing status bits other than by a reset) are ignored and
counted in `refused_writes`.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Protocol

from ktstr.vmm.devices.virtio.queue import Memory, QueueError, Virtqueue

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4B545354  # "KTST"

# Register offsets.
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100
REGION_SIZE = 0x1000

# Device status bits.
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 0x40
S_FAILED = 0x80

# InterruptStatus bits.
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28

# Queue registers that describe the rings: frozen while the queue is ready or DRIVER_OK is set.
_LAYOUT_REGISTERS = frozenset(
    {
        QUEUE_NUM,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
    }
)

_U32 = struct.Struct("<I")


class Irq(Protocol):
    def trigger(self) -> None: ...


class VirtioBackend(Protocol):
    """A device type behind the transport."""

    device_id: int
    num_queues: int
    queue_max_size: int

    def device_features(self) -> int:
        """Device-type feature bits (the transport adds VERSION_1 and INDIRECT_DESC)."""
        ...

    def config_read(self, offset: int, size: int) -> bytes: ...
    def config_write(self, offset: int, data: bytes) -> None: ...

    def activate(self, transport: VirtioMmioTransport) -> None:
        """DRIVER_OK was set: the queues in `transport.queues` are live."""
        ...

    def notify(self, queue_index: int) -> None:
        """The driver kicked a queue (called on the vCPU thread: keep it short)."""
        ...

    def reset(self) -> None:
        """Stop using the queues; when this returns nothing touches guest memory."""
        ...


class VirtioMmioTransport:
    """An MmioDevice for one virtio device at one slot."""

    def __init__(self, backend: VirtioBackend, memory: Memory, irq: Irq) -> None:
        self.backend = backend
        self.memory = memory
        self.irq = irq
        self.queues = [Virtqueue(backend.queue_max_size) for _ in range(backend.num_queues)]
        self._lock = threading.Lock()
        self._irq_lock = threading.Lock()
        self.offered = (
            backend.device_features() | VIRTIO_F_VERSION_1 | (VIRTIO_RING_F_INDIRECT_DESC)
        )
        self.refused_writes = 0  # spec-forbidden driver writes ignored (kept across resets)
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self._needs_reset = False

    @property
    def negotiated(self) -> int:
        return self.driver_features

    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features & (1 << bit))

    # --- interrupts (any thread) ----------------------------------------------------------

    def signal_used(self) -> None:
        with self._irq_lock:
            self.interrupt_status |= INT_USED_BUFFER
        self.irq.trigger()

    def signal_config(self) -> None:
        with self._irq_lock:
            self.interrupt_status |= INT_CONFIG_CHANGE
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self.irq.trigger()

    def needs_reset(self, why: str) -> None:
        """The device hit a guest-caused error it cannot recover from by itself."""
        log.warning("virtio device %d needs reset: %s", self.backend.device_id, why)
        with self._irq_lock:
            self._needs_reset = True
        if self.status & S_DRIVER_OK:
            self.signal_config()

    # --- MmioDevice -----------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG:
            return self._config_read(offset - CONFIG, size)
        if size != 4 or offset % 4:
            return bytes(size)  # registers are 32-bit only (spec 4.2.2.2)
        with self._lock:
            value = self._register(offset)
        return _U32.pack(value & 0xFFFFFFFF)

    def _config_read(self, offset: int, size: int) -> bytes:
        if size <= 0 or offset + size > REGION_SIZE - CONFIG:
            return bytes(max(size, 0))
        data = self.backend.config_read(offset, size)
        return data[:size].ljust(size, b"\0")

    def _register(self, offset: int) -> int:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.backend.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (
                (self.offered >> (32 * self.device_features_sel))
                if (self.device_features_sel < 2)
                else 0
            )
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == INTERRUPT_STATUS:
            with self._irq_lock:
                return self.interrupt_status
        if offset == STATUS:
            with self._irq_lock:
                return self.status | (S_NEEDS_RESET if self._needs_reset else 0)
        if offset == CONFIG_GENERATION:
            with self._irq_lock:
                return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions
        return 0

    def mmio_write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            if offset - CONFIG + len(data) <= REGION_SIZE - CONFIG:
                self.backend.config_write(offset - CONFIG, data)
            return
        if len(data) != 4 or offset % 4:
            return
        (value,) = _U32.unpack(data)
        with self._lock:
            self._write_register(offset, value)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == QUEUE_NOTIFY:
            if value < len(self.queues) and self.status & S_DRIVER_OK and not self._needs_reset:
                self.backend.notify(value)
            return
        if offset == INTERRUPT_ACK:
            with self._irq_lock:
                self.interrupt_status &= ~value
            return
        if offset == STATUS:
            self._write_status(value)
            return
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
            return
        if offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
            return
        if offset == DRIVER_FEATURES:
            if self.status & S_FEATURES_OK or self.driver_features_sel >= 2:
                self._refuse("DriverFeatures after FEATURES_OK or beyond bit 63")
                return
            shift = 32 * self.driver_features_sel
            mask = 0xFFFFFFFF << shift
            self.driver_features = (self.driver_features & ~mask) | (value << shift)
            return
        if offset == QUEUE_SEL:
            self.queue_sel = value
            return
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if q is None:
            return
        with q.lock:  # the worker never sees a half-written layout
            if offset == QUEUE_READY:
                self._write_queue_ready(q, bool(value & 1))
            elif offset in _LAYOUT_REGISTERS:
                if q.ready or self.status & S_DRIVER_OK:
                    # spec 4.2.2.2: not while QueueReady; the device is live after DRIVER_OK
                    self._refuse(f"queue layout register {offset:#x} of a live queue")
                else:
                    self._write_layout(q, offset, value)

    def _refuse(self, what: str) -> None:
        self.refused_writes += 1
        log.debug("virtio device %d: refused write: %s", self.backend.device_id, what)

    @staticmethod
    def _write_layout(q: Virtqueue, offset: int, value: int) -> None:
        if offset == QUEUE_NUM:
            q.size = value
        elif offset == QUEUE_DESC_LOW:
            q.desc_addr = (q.desc_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DESC_HIGH:
            q.desc_addr = (q.desc_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DRIVER_LOW:
            q.avail_addr = (q.avail_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DRIVER_HIGH:
            q.avail_addr = (q.avail_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DEVICE_LOW:
            q.used_addr = (q.used_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DEVICE_HIGH:
            q.used_addr = (q.used_addr & 0xFFFFFFFF) | (value << 32)

    def _write_queue_ready(self, q: Virtqueue, ready: bool) -> None:
        if not ready:
            q.ready = False  # stopping a queue is always allowed (Linux reads it back)
            return
        if q.ready:
            return
        if self.status & S_DRIVER_OK:
            # Without VIRTIO_F_RING_RESET there is no re-enabling a queue of a live device.
            self._refuse("QueueReady=1 after DRIVER_OK")
            return
        try:
            q.check(self.memory)
        except QueueError as err:
            self.needs_reset(str(err))
            return
        q.indirect = bool(self.driver_features & VIRTIO_RING_F_INDIRECT_DESC)
        q.ready = True

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.backend.reset()
            for q in self.queues:
                q.reset()
            with self._irq_lock:
                self._reset_registers()
            return
        if self.status & ~value:
            # Spec 2.1.2: the driver only sets bits; taking DRIVER_OK away without a reset
            # would leave the worker serving a device whose queues the driver may now reprogram.
            self._refuse(f"status {value:#x} clears bits of {self.status:#x}")
            return
        new = value & ~self.status
        if new & S_FEATURES_OK:
            ok = (
                self.driver_features & VIRTIO_F_VERSION_1
                and not self.driver_features & ~self.offered
            )
            if not ok:
                value &= ~S_FEATURES_OK  # the driver reads it back and gives up
        if new & S_DRIVER_OK and not self.status & S_DRIVER_OK:
            if not value & S_FEATURES_OK:
                value = (value & ~S_DRIVER_OK) | S_FAILED
            else:
                self.status = value & ~S_NEEDS_RESET
                self.backend.activate(self)
                return
        self.status = value & ~S_NEEDS_RESET
