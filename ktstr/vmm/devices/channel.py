"""Host side of the guest result channel: a RAM window plus a doorbell port.

The device reserves a window of guest RAM (e820-reserved, so the guest may
map it through ``/dev/mem`` even with ``STRICT_DEVMEM``) and one I/O port. The
guest writes a frame (see :mod:`ktstr.wire.frame`) at ``FRAME_OFFSET`` and
writes one byte to the port. That port write is a synchronous VM exit: the
frame is validated and consumed before the vCPU resumes, so the guest may
reuse the window at once and any amount of data streams through it.

Window layout::

    0   next_seq  u32   host-written: sequence number the next frame must carry
    4   status    u32   host-written: 0 ok, else STATUS_ERROR (see ``errors``)
    8   errors    u32   host-written: number of rejected frames so far
    64  frame     header + payload, at most ``size - 64`` bytes

The guest tells us nothing we trust: header lengths are bounded by the
window, every access goes through :class:`~ktstr.vmm.memory.GuestMemory`
bounds checks, and each message and all the kept messages together are capped
on the memory their parsed objects take (:func:`ktstr.wire.frame.message_cost`),
not on their byte count. Payloads are JSON objects with a string ``type``; their
fields are checked by whoever uses them (:mod:`ktstr.wire.messages`).

The guest learns the window from the kernel command line:
``ktstr.channel=mem,<gpa>,<size>,<port>`` (hex).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ktstr.vmm.bus import AttachContext
from ktstr.vmm.memory import GuestMemoryError
from ktstr.wire.frame import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_TOTAL,
    HEADER_SIZE,
    Frame,
    FrameError,
    Reassembler,
    check_crc,
    note_error,
    parse_header,
)

CHANNEL_PORT = 0x5F0
"""Doorbell port (one byte). Kept clear of layout.py's ports (0x3F0, 0x501-0x504, 0x600)."""
DEFAULT_WINDOW = 1 << 20
CONTROL = struct.Struct("<III")
FRAME_OFFSET = 64
STATUS_OK = 0
STATUS_ERROR = 1


@dataclass(frozen=True)
class ChannelMessage:
    received: float
    """Host monotonic time when the message completed."""
    body: dict[str, Any]


Handler = Callable[[dict[str, Any]], None]


class ResultChannel:
    """VmDevice: receives JSON messages from the guest.

    ``handlers`` maps a message ``type`` to a callback run on the vCPU thread
    during the doorbell exit (so it may touch guest memory before the guest
    continues); every message is also kept in ``messages``. ``max_message`` bounds
    one message (raw and parsed), ``max_total`` the parsed size of all kept ones.
    """

    def __init__(
        self,
        window_size: int = DEFAULT_WINDOW,
        port: int = CHANNEL_PORT,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_total: int = DEFAULT_MAX_TOTAL,
        handlers: dict[str, Handler] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_size < FRAME_OFFSET + HEADER_SIZE + 4096 or window_size % 4096:
            raise ValueError("channel window must be a multiple of 4 KiB and at least 8 KiB")
        self.window_size = window_size
        self.port = port
        self.max_total = max_total
        self.handlers = dict(handlers or {})
        self.clock = clock
        self.messages: list[ChannelMessage] = []
        self.errors: list[str] = []
        self.bytes_received = 0
        self.kept_cost = 0
        """Parsed size of ``messages`` (what ``max_total`` limits)."""
        self.frames = 0
        self.gpa: int | None = None
        self._memory: Any = None
        self._reasm = Reassembler(max_message)
        self._lock = threading.Lock()
        self._status = STATUS_OK

    # --- VmDevice ---------------------------------------------------------------------

    def attach(self, ctx: AttachContext) -> None:
        self._memory = ctx.memory
        self.gpa = ctx.reserve_ram(self.window_size)
        ctx.add_pio(self.port, 1, self)
        ctx.add_cmdline(self.cmdline_param())
        self._write_control()

    def bind(self, memory: Any, gpa: int) -> None:
        """Attach to a memory window directly (tests, or a VM without reserve_ram)."""
        self._memory = memory
        self.gpa = gpa
        self._write_control()

    def cmdline_param(self) -> str:
        return f"ktstr.channel=mem,{self.gpa:#x},{self.window_size:#x},{self.port:#x}"

    def close(self) -> None:
        pass

    # --- PioDevice ----------------------------------------------------------------------

    def pio_read(self, port: int, size: int) -> bytes:
        return bytes([self._status]) * size

    def pio_write(self, port: int, data: bytes) -> None:
        with self._lock:
            self._status = STATUS_OK
            try:
                self._consume()
            except (FrameError, GuestMemoryError) as err:
                self._reject(str(err))
            finally:  # even past a VMM bug the guest gets an answer, not a stale status
                self._write_control()

    # --- results ------------------------------------------------------------------------

    def finish(self) -> list[str]:
        """Call after the VM stopped: a message left half-sent becomes an error. All errors."""
        with self._lock:
            try:
                self._reasm.finish()
            except FrameError as err:
                note_error(self.errors, str(err))
            return list(self.errors)

    def write_guest(self, gpa: int, data: bytes) -> None:
        """Write guest RAM on the guest's request (bounds-checked by GuestMemory)."""
        if self._memory is None:
            raise FrameError("channel not attached")
        self._memory.write(gpa, data)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m.body for m in self.messages if m.body.get("type") == kind]

    # --- internals ----------------------------------------------------------------------

    def _reject(self, why: str) -> None:
        self._status = STATUS_ERROR
        note_error(self.errors, f"channel: {why}")

    def _consume(self) -> None:
        if self._memory is None or self.gpa is None:
            raise FrameError("doorbell before the channel was attached")
        base = self.gpa + FRAME_OFFSET
        head = self._memory.read(base, HEADER_SIZE)
        flags, seq, length, crc = parse_header(head, self.window_size - FRAME_OFFSET - HEADER_SIZE)
        # The raw bytes of a message in progress are held too; its parsed size is known
        # once it is complete.
        if self.kept_cost + self._reasm.pending + length > self.max_total:
            raise FrameError(self._over_total())
        payload = self._memory.read(base + HEADER_SIZE, length)
        check_crc(head, payload, crc)
        self.frames += 1
        self.bytes_received += length
        message = self._reasm.feed(Frame(seq, flags, payload))
        if message is None:
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise FrameError("message is not a JSON object with a string 'type'")
        if self.kept_cost + self._reasm.last_cost > self.max_total:
            raise FrameError(self._over_total())
        self.kept_cost += self._reasm.last_cost
        self.messages.append(ChannelMessage(self.clock(), message))
        handler = self.handlers.get(message["type"])
        if handler is not None:
            try:
                handler(message)
            except Exception as err:  # a handler bug is reported, not a vCPU thread crash
                self._reject(f"handler for {message['type']!r} failed: {err}")

    def _over_total(self) -> str:
        return (f"guest messages would take more than {self.max_total} bytes of host memory "
                "in total")

    def _write_control(self) -> None:
        if self._memory is None or self.gpa is None:
            return
        self._memory.write(self.gpa, CONTROL.pack(self._reasm.next_seq, self._status,
                                                   len(self.errors)))
