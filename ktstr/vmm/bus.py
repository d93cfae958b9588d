"""PIO and MMIO buses: address ranges -> devices, and what a device may do at attach time.

Devices run on vCPU threads (any of them, concurrently); each device does its
own locking. An access nothing claims reads as all ones and drops writes, as on
real hardware with nothing decoding the address.

A device that raises during an access never ends the VM: the access is dropped
the same way (reads all ones), and :class:`DeviceErrors` counts it for
``VmResult.device_errors``. Whatever the guest programs into a device, only the
guest's own I/O suffers.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ktstr.vmm.irq import IrqLine
from ktstr.vmm.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

MAX_ERROR_KEYS = 64
"""Distinct ``"<device> <bus> <address>"`` error counters; later ones add to ``"other"``."""
MAX_ERROR_MESSAGES = 8
"""Messages kept (the first ones: later errors are usually the same cause repeating)."""
MAX_ERROR_TEXT = 300


class PioDevice(Protocol):
    def pio_read(self, port: int, size: int) -> bytes: ...
    def pio_write(self, port: int, data: bytes) -> None: ...


class MmioDevice(Protocol):
    def mmio_read(self, offset: int, size: int) -> bytes: ...
    def mmio_write(self, offset: int, data: bytes) -> None: ...


class BusError(Exception):
    """Two devices claim overlapping ranges (a VMM configuration bug)."""


class DeviceErrors:
    """Exceptions devices raised on guest accesses, bounded however many the guest causes.

    Shared by a machine's buses and written from every vCPU thread. A refused guest
    address (:class:`~ktstr.vmm.memory.GuestMemoryError`) is the guest's doing and only
    counted; any other exception is a VMM bug, so its first occurrence per device and
    exception class is also logged with its traceback.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._logged: set[tuple[type, type]] = set()
        self.messages: list[str] = []
        self.total = 0

    def record(self, device: object, bus: str, addr: int, access: str, exc: Exception) -> None:
        """``access`` is ``"in 0x80 (1 bytes)"``-style text for the message."""
        key = f"{type(device).__name__} {bus} 0x{addr:x}"
        with self._lock:
            self.total += 1
            if key not in self._counts and len(self._counts) >= MAX_ERROR_KEYS:
                key = "other"
            self._counts[key] = self._counts.get(key, 0) + 1
            if len(self.messages) < MAX_ERROR_MESSAGES:
                text = f"{key}: {access}: {type(exc).__name__}: {exc}"
                self.messages.append(text[:MAX_ERROR_TEXT])
            kinds = (type(device), type(exc))
            first_bug = not isinstance(exc, GuestMemoryError) and kinds not in self._logged
            if first_bug and len(self._logged) < MAX_ERROR_KEYS:
                self._logged.add(kinds)
            else:
                first_bug = False
        if first_bug:
            log.error("%s raised on a guest access (%s); the access was dropped",
                      type(device).__name__, access, exc_info=exc)

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def _sized(data: object, size: int) -> bytes:
    """A device's read answer as exactly ``size`` bytes (short answers padded with ones)."""
    return bytes(data[:size]).ljust(size, b"\xff")  # type: ignore[index]


class _RangeMap:
    """Sorted, non-overlapping ``[base, base + length)`` ranges with O(log n) lookup."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, object]] = []
        self._lock = threading.Lock()

    def add(self, base: int, length: int, device: object) -> None:
        if length <= 0 or base < 0:
            raise BusError(f"{self.what}: bad range 0x{base:x}+{length}")
        with self._lock:
            i = bisect.bisect_right(self._bases, base)
            if i > 0:
                pbase, plen, _ = self._entries[i - 1]
                if pbase + plen > base:
                    raise BusError(f"{self.what}: 0x{base:x}+{length} overlaps 0x{pbase:x}+{plen}")
            if i < len(self._entries) and base + length > self._entries[i][0]:
                nbase, nlen, _ = self._entries[i]
                raise BusError(f"{self.what}: 0x{base:x}+{length} overlaps 0x{nbase:x}+{nlen}")
            # Copy-on-write so lookups on vCPU threads never take the lock.
            bases = [*self._bases]
            entries = [*self._entries]
            bases.insert(i, base)
            entries.insert(i, (base, length, device))
            self._bases, self._entries = bases, entries

    def find(self, addr: int, size: int) -> tuple[int, object] | None:
        bases, entries = self._bases, self._entries
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        base, length, device = entries[i]
        if addr + size <= base + length:
            return base, device
        return None


class PioBus:
    def __init__(self, errors: DeviceErrors | None = None) -> None:
        self._map = _RangeMap("pio bus")
        self._cache: dict[int, object] = {}
        self.errors = errors if errors is not None else DeviceErrors()

    def add(self, port: int, length: int, device: PioDevice) -> None:
        self._map.add(port, length, device)
        self._cache = {}

    def device_for(self, port: int, size: int) -> PioDevice | None:
        """The device decoding ``size`` bytes at ``port``, or None; cached per (port, size)."""
        key = port << 3 | size
        try:
            return self._cache[key]  # type: ignore[return-value]
        except KeyError:
            pass
        hit = self._map.find(port, size)
        device = None if hit is None else hit[1]
        self._cache[key] = device
        return device  # type: ignore[return-value]

    def read(self, port: int, size: int) -> bytes:
        hit = self._map.find(port, size)
        if hit is None:
            return b"\xff" * size
        try:
            return _sized(hit[1].pio_read(port, size), size)  # type: ignore[attr-defined]
        except Exception as exc:
            self.read_failed(hit[1], port, size, exc)
            return b"\xff" * size

    def write(self, port: int, data: bytes) -> bool:
        """Dispatch a write; False if nothing claims the port."""
        hit = self._map.find(port, len(data))
        if hit is None:
            return False
        try:
            hit[1].pio_write(port, data)  # type: ignore[attr-defined]
        except Exception as exc:
            self.write_failed(hit[1], port, len(data), exc)
        return True

    def read_failed(self, device: object, port: int, size: int, exc: Exception) -> None:
        """Count a device's failed read (the caller answers all ones)."""
        self.errors.record(device, "pio", port, f"in 0x{port:x} ({size} bytes)", exc)

    def write_failed(self, device: object, port: int, size: int, exc: Exception) -> None:
        """Count a device's failed write (dropped)."""
        self.errors.record(device, "pio", port, f"out 0x{port:x} ({size} bytes)", exc)


class MmioBus:
    def __init__(self, errors: DeviceErrors | None = None) -> None:
        self._map = _RangeMap("mmio bus")
        self.errors = errors if errors is not None else DeviceErrors()

    def add(self, base: int, length: int, device: MmioDevice) -> None:
        self._map.add(base, length, device)

    def read(self, addr: int, size: int) -> bytes:
        hit = self._map.find(addr, size)
        if hit is None:
            return b"\xff" * size
        base, device = hit
        try:
            return _sized(device.mmio_read(addr - base, size), size)  # type: ignore[attr-defined]
        except Exception as exc:
            self.errors.record(device, "mmio", addr, f"read 0x{addr:x} ({size} bytes)", exc)
            return b"\xff" * size

    def write(self, addr: int, data: bytes) -> bool:
        hit = self._map.find(addr, len(data))
        if hit is None:
            return False
        base, device = hit
        try:
            device.mmio_write(addr - base, data)  # type: ignore[attr-defined]
        except Exception as exc:
            self.errors.record(device, "mmio", addr, f"write 0x{addr:x} ({len(data)} bytes)",
                               exc)
        return True


@dataclass
class MmioSlot:
    base: int
    size: int
    irq: IrqLine


class AttachContext:
    """What :class:`~ktstr.vmm.vm.Vm` hands each device before the guest starts.

    ``alloc_virtio_mmio_slot`` and ``reserve_ram`` are provided by the Vm (they
    depend on the memory map and the irqchip); a bare context (tiny guests) has
    neither.
    """

    def __init__(
        self,
        memory: GuestMemory,
        pio: PioBus,
        mmio: MmioBus,
        *,
        alloc_slot: Callable[[], MmioSlot] | None = None,
        reserve: Callable[[int], int] | None = None,
        coalesce_pio: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.cmdline: list[str] = []
        self._alloc_slot = alloc_slot
        self._reserve = reserve
        self._coalesce_pio = coalesce_pio

    def add_pio(self, port: int, length: int, device: PioDevice) -> None:
        self.pio.add(port, length, device)

    def add_mmio(self, base: int, length: int, device: MmioDevice) -> None:
        self.mmio.add(base, length, device)

    def alloc_virtio_mmio_slot(self) -> MmioSlot:
        """A free virtio-mmio window and its IRQ; the cmdline gets ``virtio_mmio.device=``."""
        if self._alloc_slot is None:
            raise BusError("this VM has no virtio-mmio slots (no irqchip)")
        slot = self._alloc_slot()
        self.add_cmdline(f"virtio_mmio.device={slot.size}@0x{slot.base:x}:{slot.irq.gsi}")
        return slot

    def reserve_ram(self, size: int) -> int:
        """Carve ``size`` bytes (page-rounded) from the top of low RAM, e820-reserved; the gpa."""
        if self._reserve is None:
            raise BusError("this VM cannot reserve RAM windows")
        return self._reserve(size)

    def add_cmdline(self, text: str) -> None:
        self.cmdline.append(text)

    def coalesce_pio_writes(self, port: int, length: int) -> bool:
        """Ask for guest writes to these (already added) ports to be queued, not exits.

        The device then sees such a write later, but always before any other exit is
        handled (the vCPU loop drains the queue first) and before the VM's end. Only for
        write-only registers whose effects nothing in the guest can observe without
        another port access. False if this VM cannot (no KVM_CAP_COALESCED_PIO).
        """
        if self._coalesce_pio is None:
            return False
        return self._coalesce_pio(port, length)


class VmDevice(Protocol):
    def attach(self, ctx: AttachContext) -> None: ...
    def close(self) -> None: ...
