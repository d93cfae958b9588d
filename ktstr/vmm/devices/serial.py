"""A 16550A UART: enough of the chip for Linux's 8250 driver (console and a byte channel).

Transmission is instant: a THR write lands in the output buffer (and the
optional callback) and THR is empty again. The IRQ output is a level that is
high while an enabled interrupt is pending, as on the real chip; the in-kernel
irqchip turns its rising edges into interrupts.

The guest decides how much it prints, so the buffer kept for ``VmResult.console``
is bounded: the first :data:`KEEP_HEAD_BYTES` (the boot) and the last
:data:`KEEP_TAIL_BYTES` (where a failure shows), with a marker line where the
middle was dropped. The callback still sees every byte.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ktstr.vmm.bus import AttachContext

# Register offsets.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_FIFO_SIZE = 16
"""Only this many queued input bytes are visible at once; the rest wait in the host queue."""
KEEP_HEAD_BYTES = 256 << 10
"""Output kept from the start: the boot log, the command line, early errors."""
KEEP_TAIL_BYTES = 4 << 20
"""Output kept from the end: the run's last messages, panics, scheduler ejections."""
DROPPED_MARKER = b"\n[ktstr: %d bytes dropped here]\n"
"""Stands where the middle of a long output was dropped (own line: no regex joins across)."""


def tail_slack(keep_tail: int) -> int:
    """How far the tail may grow past ``keep_tail`` before it is trimmed (amortises the cut)."""
    return max(keep_tail // 4, 64)


class _Irq(Protocol):
    def set_level(self, high: bool) -> None: ...


class Serial:
    """One UART at ``port`` (8 ports). ``output`` is what the guest sent, head and tail kept."""

    def __init__(
        self,
        irq: _Irq,
        port: int = 0x3F8,
        on_output: Callable[[bytes], None] | None = None,
        *,
        keep_head: int = KEEP_HEAD_BYTES,
        keep_tail: int = KEEP_TAIL_BYTES,
    ) -> None:
        if keep_head < 0 or keep_tail < 0:
            raise ValueError("serial output bounds must not be negative")
        self.port = port
        self.irq = irq
        self.on_output = on_output
        self.keep_head = keep_head
        self.keep_tail = keep_tail
        self._head = bytearray()
        self._tail = bytearray()
        self._tail_limit = keep_tail + tail_slack(keep_tail)
        self._trimmed = 0
        self._lock = threading.Lock()
        self._input: deque[int] = deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.dll = 0x0C  # 9600 baud until the guest programs it
        self.dlm = 0
        self.thr_ipending = False
        self.lsr_errors = 0

    # --- host side -------------------------------------------------------------------

    def attach(self, ctx: AttachContext) -> None:
        ctx.add_pio(self.port, 8, self)
        # THR (and DLL) writes need no exit each: the 8250 driver always reads LSR or IIR,
        # or writes IER, after a burst of THR writes (console: LSR polling; tty: the IRQ
        # handler re-reads IIR), and the VMM replays queued writes before those exits.
        ctx.coalesce_pio_writes(self.port + RBR_THR_DLL, 1)

    def close(self) -> None:
        pass

    def queue_input(self, data: bytes) -> None:
        """Bytes for the guest to read (interactive console)."""
        with self._lock:
            self._input.extend(data)
            self._update_irq()

    @property
    def head(self) -> bytes:
        return bytes(self._head)

    @property
    def tail(self) -> bytes:
        """The last ``keep_tail`` bytes after the head (all of them if nothing was dropped)."""
        return bytes(self._tail[max(len(self._tail) - self.keep_tail, 0) :])

    @property
    def dropped(self) -> int:
        """Bytes sent but kept in neither the head nor the tail."""
        return self._trimmed + max(len(self._tail) - self.keep_tail, 0)

    @property
    def buffered(self) -> int:
        """Host memory the output buffer holds (bytes)."""
        return len(self._head) + len(self._tail)

    @property
    def output(self) -> bytes:
        """Head, the :data:`DROPPED_MARKER` line if the middle was dropped, and tail."""
        with self._lock:
            dropped = self.dropped
            if not dropped:
                return bytes(self._head + self._tail)
            return self.head + DROPPED_MARKER % dropped + self.tail

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    # --- chip model ------------------------------------------------------------------

    def _lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT | self.lsr_errors
        if self._input:
            value |= LSR_DR
        return value

    def _iir_id(self) -> int:
        if self.ier & IER_RLSI and self.lsr_errors:
            return IIR_RLSI
        if self.ier & IER_RDI and self._input:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        self.irq.set_level(self._iir_id() != IIR_NO_INT)

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            value = 0
            if self.mcr & MCR_RTS:
                value |= MSR_CTS
            if self.mcr & MCR_DTR:
                value |= MSR_DSR
            if self.mcr & MCR_OUT1:
                value |= MSR_RI
            if self.mcr & MCR_OUT2:
                value |= MSR_DCD
            return value
        return MSR_CTS | MSR_DSR | MSR_DCD  # a modem that is always ready

    def pio_read(self, port: int, size: int) -> bytes:
        if size <= 0:
            return b""
        with self._lock:
            value = self._read(port - self.port)
            self._update_irq()
        return bytes([value]) + b"\xff" * (size - 1)

    def pio_write(self, port: int, data: bytes) -> None:
        if not data:
            return
        emitted = b""
        with self._lock:
            emitted = self._write(port - self.port, data[0])
            self._update_irq()
        if emitted and self.on_output is not None:
            self.on_output(emitted)

    def _read(self, off: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                return self.dll
            if not self._input:
                return 0
            value = self._input.popleft()
            return value
        if off == IER_DLM:
            return self.dlm if dlab else self.ier
        if off == IIR_FCR:
            ident = self._iir_id()
            if ident == IIR_THRI:
                self.thr_ipending = False  # reading IIR acknowledges THRE
            return ident | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0)
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            value = self._lsr()
            self.lsr_errors = 0
            return value
        if off == MSR:
            return self._msr()
        if off == SCR:
            return self.scr
        return 0xFF

    def _write(self, off: int, value: int) -> bytes:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return b""
            if self.mcr & MCR_LOOP:
                if len(self._input) < RX_FIFO_SIZE:
                    self._input.append(value)
                self.thr_ipending = True
                return b""
            if len(self._head) < self.keep_head:
                self._head.append(value)
            else:
                tail = self._tail
                tail.append(value)
                if len(tail) > self._tail_limit:
                    cut = len(tail) - self.keep_tail
                    del tail[:cut]
                    self._trimmed += cut
            self.thr_ipending = True  # the byte left at once; THR is empty again
            return bytes([value])
        if off == IER_DLM:
            if dlab:
                self.dlm = value
                return b""
            old = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_THRI and not old & IER_THRI:
                self.thr_ipending = True  # a 16550 re-asserts THRE when it is enabled
            return b""
        if off == IIR_FCR:
            self.fcr = value & 0xC9
            if value & FCR_CLEAR_RCVR:
                self._input.clear()
            return b""
        if off == LCR:
            self.lcr = value
        elif off == MCR:
            self.mcr = value & 0x1F
        elif off == SCR:
            self.scr = value
        return b""
