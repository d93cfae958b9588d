"""Result-channel framing, shared by the guest writer and the host reader (pure functions).

A message is one JSON object (UTF-8). It travels as one or more frames; each
frame is a fixed header followed by its payload chunk::

    0  magic    u32  0x4E43544B ("KTCN" little-endian)
    4  version  u8   1
    5  flags    u8   FIRST (1) | LAST (2)
    6  reserved u16  0
    8  seq      u32  frame counter, starts at 0, +1 per frame
    12 length   u32  payload bytes in this frame
    16 crc      u32  CRC32 of header bytes 0..16 and the payload
    20 pad      u32  0 (keeps the payload 8-byte aligned)

A message that does not fit one frame is split: FIRST on the first chunk,
LAST on the final one, neither in between. The reader treats every field as
hostile: a bad magic, version, length, CRC, sequence gap or a message left
unfinished is an explicit error, never a silently shortened result.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

MAGIC = 0x4E43544B
VERSION = 1
FIRST = 1
LAST = 2
HEADER = struct.Struct("<IBBHIII4x")
HEADER_SIZE = HEADER.size  # 24

DEFAULT_MAX_MESSAGE = 256 << 20
"""Largest message a reader reassembles by default (bounds host memory)."""


class FrameError(ValueError):
    """A frame or message failed validation; the text says which check and why."""


@dataclass(frozen=True)
class Frame:
    seq: int
    flags: int
    payload: bytes


def encode_message(message: Any) -> bytes:
    """The canonical byte form of a message: compact JSON, UTF-8."""
    return json.dumps(message, separators=(",", ":"), allow_nan=True).encode()


def encode_frame(seq: int, flags: int, payload: bytes) -> bytes:
    head = struct.pack("<IBBHII", MAGIC, VERSION, flags, 0, seq & 0xFFFFFFFF, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I4x", crc) + payload


def split_frames(data: bytes, first_seq: int, max_payload: int) -> list[bytes]:
    """Frames carrying ``data`` with at most ``max_payload`` bytes each."""
    if max_payload <= 0:
        raise ValueError("max_payload must be positive")
    chunks = [data[i:i + max_payload] for i in range(0, len(data), max_payload)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        flags = (FIRST if i == 0 else 0) | (LAST if i == len(chunks) - 1 else 0)
        out.append(encode_frame(first_seq + i, flags, chunk))
    return out


def parse_header(head: bytes, max_length: int) -> tuple[int, int, int, int]:
    """Validate a header; returns (flags, seq, length, crc). ``max_length`` bounds ``length``."""
    if len(head) < HEADER_SIZE:
        raise FrameError(f"short frame header ({len(head)} of {HEADER_SIZE} bytes)")
    magic, version, flags, _res, seq, length, crc = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {magic:#010x}")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}")
    if flags & ~(FIRST | LAST):
        raise FrameError(f"unknown frame flags {flags:#x}")
    if length > max_length:
        raise FrameError(f"frame length {length} exceeds the {max_length}-byte limit")
    return flags, seq, length, crc


def check_crc(head: bytes, payload: bytes, crc: int) -> None:
    actual = zlib.crc32(payload, zlib.crc32(head[:16]))
    if actual != crc:
        raise FrameError(f"frame CRC mismatch (header says {crc:#010x}, data has {actual:#010x})")


def decode_frame(blob: bytes, max_length: int = DEFAULT_MAX_MESSAGE) -> Frame:
    """Parse one complete frame from bytes (header + payload)."""
    flags, seq, length, crc = parse_header(blob, max_length)
    payload = blob[HEADER_SIZE:HEADER_SIZE + length]
    if len(payload) != length:
        raise FrameError(f"frame truncated: {len(payload)} of {length} payload bytes")
    check_crc(blob, payload, crc)
    return Frame(seq, flags, payload)


class Reassembler:
    """Turns a stream of frames into messages, enforcing order and size limits.

    ``feed`` returns a decoded message when a LAST frame completes one, else None;
    it raises :class:`FrameError` on any inconsistency. After an error the
    partial message is dropped and the next FIRST frame starts afresh.
    """

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self.next_seq = 0
        self._parts: list[bytes] | None = None
        self._size = 0

    @property
    def in_progress(self) -> bool:
        return self._parts is not None

    def feed(self, frame: Frame) -> Any | None:
        expected = self.next_seq
        self.next_seq = (frame.seq + 1) & 0xFFFFFFFF
        if frame.seq != expected:
            self._parts = None
            raise FrameError(f"frame sequence gap: expected {expected}, got {frame.seq} "
                             f"(frames were lost)")
        if frame.flags & FIRST:
            if self._parts is not None:
                self._parts = None
                raise FrameError("message truncated: a new message started before the "
                                 "previous one ended")
            self._parts, self._size = [], 0
        elif self._parts is None:
            raise FrameError("continuation frame without a message start")
        self._size += len(frame.payload)
        if self._size > self.max_message:
            self._parts = None
            raise FrameError(f"message exceeds the {self.max_message}-byte limit")
        self._parts.append(frame.payload)
        if not frame.flags & LAST:
            return None
        data = b"".join(self._parts)
        self._parts = None
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FrameError(f"message is not valid JSON: {err}") from err

    def finish(self) -> None:
        """Call at end of stream: an unfinished message is an error."""
        if self._parts is not None:
            size = self._size
            self._parts = None
            raise FrameError(f"message truncated: stream ended after {size} bytes "
                             f"without its last frame")


SERIAL_PREFIX = b"@KTSTR:"
"""Serial transport: each frame is one line, this prefix + base64(frame)."""


def serial_line(frame: bytes) -> bytes:
    import base64

    return SERIAL_PREFIX + base64.b64encode(frame) + b"\n"


def decode_serial(stream: bytes, max_message: int = DEFAULT_MAX_MESSAGE
                  ) -> tuple[list[Any], list[str]]:
    """Messages and errors from a serial-transport byte stream (other lines are ignored)."""
    import base64
    import binascii

    reasm = Reassembler(max_message)
    messages: list[Any] = []
    errors: list[str] = []
    for raw in stream.split(b"\n"):
        line = raw.strip(b"\r")
        start = line.find(SERIAL_PREFIX)
        if start < 0:
            continue
        try:
            blob = base64.b64decode(line[start + len(SERIAL_PREFIX):], validate=True)
            message = reasm.feed(decode_frame(blob, max_message))
        except (FrameError, binascii.Error) as err:
            errors.append(f"channel: {err}")
            continue
        if message is not None:
            messages.append(message)
    try:
        reasm.finish()
    except FrameError as err:
        errors.append(f"channel: {err}")
    return messages, errors
