"""PIO and MMIO buses: address ranges -> devices, and what a device may do at attach time.

Devices run on vCPU threads (any of them, concurrently); each device does its
own locking. An access nothing claims reads as all ones and drops writes, as on
real hardware with nothing decoding the address.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ktstr.vmm.irq import IrqLine
from ktstr.vmm.memory import GuestMemory


class PioDevice(Protocol):
    def pio_read(self, port: int, size: int) -> bytes: ...
    def pio_write(self, port: int, data: bytes) -> None: ...


class MmioDevice(Protocol):
    def mmio_read(self, offset: int, size: int) -> bytes: ...
    def mmio_write(self, offset: int, data: bytes) -> None: ...


class BusError(Exception):
    """Two devices claim overlapping ranges (a VMM configuration bug)."""


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
    def __init__(self) -> None:
        self._map = _RangeMap("pio bus")
        self._cache: dict[int, object] = {}

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
        data = hit[1].pio_read(port, size)  # type: ignore[attr-defined]
        return bytes(data[:size]).ljust(size, b"\xff")

    def write(self, port: int, data: bytes) -> bool:
        """Dispatch a write; False if nothing claims the port."""
        hit = self._map.find(port, len(data))
        if hit is None:
            return False
        hit[1].pio_write(port, data)  # type: ignore[attr-defined]
        return True


class MmioBus:
    def __init__(self) -> None:
        self._map = _RangeMap("mmio bus")

    def add(self, base: int, length: int, device: MmioDevice) -> None:
        self._map.add(base, length, device)

    def read(self, addr: int, size: int) -> bytes:
        hit = self._map.find(addr, size)
        if hit is None:
            return b"\xff" * size
        base, device = hit
        data = device.mmio_read(addr - base, size)  # type: ignore[attr-defined]
        return bytes(data[:size]).ljust(size, b"\xff")

    def write(self, addr: int, data: bytes) -> bool:
        hit = self._map.find(addr, len(data))
        if hit is None:
            return False
        base, device = hit
        device.mmio_write(addr - base, data)  # type: ignore[attr-defined]
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
