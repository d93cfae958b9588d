"""Interrupt lines into the in-kernel irqchip (PIC + IOAPIC).

``set_level`` drives the line with ``KVM_IRQ_LINE`` (the 16550 models its IRQ
output as a level, like the real chip); ``trigger`` sends an edge through an
irqfd, which device threads can signal without an ioctl per interrupt.
"""

from __future__ import annotations

import contextlib
import os
import threading

from ktstr.vmm.kvm import VmFd


class IrqLine:
    """One GSI. Thread-safe; callable from any thread while the VM is running."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self.gsi = gsi
        self._vm = vm
        self._lock = threading.Lock()
        self._level = False
        self._eventfd: int | None = None
        self._closed = False
        self.raises = 0
        """Rising edges sent (diagnostics)."""

    def set_level(self, high: bool) -> None:
        with self._lock:
            if self._closed or high == self._level:
                return
            self._level = high
            self._vm.irq_line(self.gsi, high)
            self.raises += int(high)

    def trigger(self) -> None:
        """An edge: the irqfd if KVM accepted one, else a 1-0 pulse on the line."""
        with self._lock:
            if self._closed:
                return
            if self._eventfd is None:
                efd = -1
                try:
                    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                    self._vm.irqfd(efd, self.gsi)
                except OSError:
                    if efd >= 0:
                        os.close(efd)
                    self._eventfd = -1
                else:
                    self._eventfd = efd
            if self._eventfd >= 0:
                os.eventfd_write(self._eventfd, 1)
                return
            self._vm.irq_line(self.gsi, True)
            self._vm.irq_line(self.gsi, False)
            self._level = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._eventfd is not None and self._eventfd >= 0:
                # The vm fd may already be gone; closing the eventfd suffices then.
                with contextlib.suppress(OSError):
                    self._vm.irqfd(self._eventfd, self.gsi, deassign=True)
                os.close(self._eventfd)
            self._eventfd = None


class NullIrq:
    """An IrqLine stand-in for devices used without an irqchip (tiny guests, unit tests)."""

    gsi = -1

    def __init__(self) -> None:
        self.level = False
        self.edges = 0

    def set_level(self, high: bool) -> None:
        if high and not self.level:
            self.edges += 1
        self.level = high

    def trigger(self) -> None:
        self.edges += 1

    def close(self) -> None:
        pass
