"""Guest side of the result channel: send JSON messages to the host.

Two transports, chosen by the kernel command line:

* ``ktstr.channel=mem,<gpa>,<size>,<port>`` — the host's RAM window
  (:mod:`ktstr.vmm.devices.channel`): frames are copied into the window mapped
  from ``/dev/mem``, then one byte written to ``<port>`` via ``/dev/port``
  hands the frame to the host synchronously. The host writes back the next
  expected sequence number and a status word, so every frame is acknowledged
  and a rejection raises :class:`ChannelError` here.
* ``ktstr.channel=serial,<tty>`` (default ``ttyS1``, COM2) — frames as
  base64 lines; slower, but needs nothing from the VMM but a UART.

Several processes may send (a scenario may fork): an ``flock`` on the device
serialises them, and the sequence number lives in the shared window.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any, Protocol

from ktstr.wire.frame import HEADER_SIZE, encode_message, serial_line, split_frames

FRAME_OFFSET = 64
CONTROL = struct.Struct("<III")
SERIAL_MAX_PAYLOAD = 3 << 10


class ChannelError(RuntimeError):
    """The host rejected a frame, or the channel cannot be opened."""


class Channel(Protocol):
    def send(self, message: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class WindowWriter:
    """Frames into a shared window, one doorbell per frame, each acknowledged by the host.

    ``window`` is any writable buffer laid out as the host device expects
    (control words, then the frame area); ``ring`` performs the doorbell.
    """

    def __init__(self, window: Any, ring: Callable[[], None]) -> None:
        self.window = window
        self.ring = ring
        self.max_payload = len(window) - FRAME_OFFSET - HEADER_SIZE
        if self.max_payload <= 0:
            raise ChannelError(f"channel window of {len(window)} bytes is too small")

    def send_bytes(self, data: bytes) -> None:
        seq, _status, _errors = CONTROL.unpack_from(self.window, 0)
        for i, frame in enumerate(split_frames(data, seq, self.max_payload)):
            self.window[FRAME_OFFSET:FRAME_OFFSET + len(frame)] = frame
            self.ring()
            next_seq, status, errors = CONTROL.unpack_from(self.window, 0)
            if status != 0 or next_seq != (seq + i + 1) & 0xFFFFFFFF:
                raise ChannelError(f"host rejected frame {seq + i} (status {status}, "
                                   f"{errors} errors so far)")


class MemChannel:
    """The RAM-window transport: /dev/mem for the window, /dev/port for the doorbell."""

    def __init__(self, gpa: int, size: int, port: int) -> None:
        self.gpa, self.size, self.port = gpa, size, port
        self._lock = threading.Lock()
        self._mem_fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC)
        try:
            self._map = mmap.mmap(self._mem_fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=gpa)
        except OSError as err:
            os.close(self._mem_fd)
            raise ChannelError(f"cannot map the channel window {gpa:#x}+{size:#x} from "
                               f"/dev/mem: {err}") from err
        self._port_fd = os.open("/dev/port", os.O_WRONLY)
        self._writer = WindowWriter(self._map, self._ring)

    def _ring(self) -> None:
        os.pwrite(self._port_fd, b"\x01", self.port)

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(encode_message(message))

    def send_bytes(self, data: bytes) -> None:
        with self._lock:
            lock_fd = _process_lock()
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                self._writer.send_bytes(data)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._mem_fd)
        os.close(self._port_fd)


class SerialChannel:
    def __init__(self, device: str = "/dev/ttyS1") -> None:
        self._lock = threading.Lock()
        self._fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self._fd)
        attrs = termios.tcgetattr(self._fd)
        attrs[4] = attrs[5] = termios.B115200
        termios.tcsetattr(self._fd, termios.TCSANOW, attrs)

    def send(self, message: dict[str, Any]) -> None:
        data = encode_message(message)
        with self._lock:
            lock_fd = _process_lock()
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                # The sequence number lives in a shared file so forked senders agree.
                seq = int(os.pread(lock_fd, 16, 0).decode() or 0)
                frames = split_frames(data, seq, SERIAL_MAX_PAYLOAD)
                os.pwrite(lock_fd, b"%-15d" % (seq + len(frames)), 0)
                for frame in frames:
                    _write_all(self._fd, serial_line(frame))
                termios.tcdrain(self._fd)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class NullChannel:
    """Used before a channel is open: messages go to the console only."""

    def send(self, message: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


LOCK_PATH = "/run/ktstr-channel.lock"
_lock_fds: dict[int, int] = {}


def _process_lock() -> int:
    """An fd for flock opened by *this* process: flock locks belong to the open file
    description, which a forked child would otherwise share with its parent."""
    pid = os.getpid()
    fd = _lock_fds.get(pid)
    if fd is None:
        fd = _lock_fds[pid] = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def parse_spec(cmdline: str) -> tuple[str, list[str]]:
    """('mem', [gpa, size, port]) or ('serial', [tty]) from ``ktstr.channel=``."""
    for word in cmdline.split():
        if word.startswith("ktstr.channel="):
            kind, *rest = word.split("=", 1)[1].split(",")
            return kind, rest
    return "serial", ["ttyS1"]


def open_channel(cmdline: str) -> Channel:
    kind, rest = parse_spec(cmdline)
    if kind == "mem":
        if len(rest) != 3:
            raise ChannelError(f"ktstr.channel=mem needs gpa,size,port; got {rest}")
        gpa, size, port = (int(x, 0) for x in rest)
        return MemChannel(gpa, size, port)
    if kind == "serial":
        return SerialChannel("/dev/" + (rest[0] if rest else "ttyS1"))
    raise ChannelError(f"unknown channel kind {kind!r}")
