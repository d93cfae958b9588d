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

The payload is hostile too. :func:`decode_message` pre-scans the bytes before
``json.loads`` sees them: nesting deeper than :data:`MAX_DEPTH` is refused
(``json`` would raise RecursionError), and the memory the parsed objects would
take is estimated from the tokens (``[{},{},...]`` costs 24 times its bytes),
so limits are charged on the parsed size, not the byte count.
"""

from __future__ import annotations

import json
import re
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
"""Largest message a reader reassembles by default, in raw bytes and in parsed size."""
DEFAULT_MAX_TOTAL = 1 << 30
"""Parsed size of all the messages a reader keeps, by default."""
MAX_DEPTH = 64
"""Deepest nesting of arrays and objects in a message (the guest's own go a few levels)."""
MAX_ERRORS = 100
"""Errors a reader keeps: a guest spinning on bad frames must not grow host memory."""
MAX_ERROR_TEXT = 1000

# Parsed-size model: upper bounds on what json.loads keeps alive per token, CPython 3.11
# on 64 bits (tests/unit/test_channel.py checks them with tracemalloc on the costliest
# shapes). Charged on a count of the tokens, so an estimate never needs the parse.
COST_VALUE = 48
"""Any value: its list slot (with over-allocation) and an int or float object."""
COST_EMPTY = 64
"""``[]`` or ``{}``."""
COST_LIST = 96
"""A non-empty list: header and first allocation."""
COST_DICT = 192
"""A non-empty dict: header and its first keys table."""
COST_ENTRY = 64
"""Each object member: its share of the dict's growth and of the decoder's key memo."""
COST_STRING = 80
"""A str object's header."""
WIDE_CHARS = 4
"""Bytes per character of a string that may hold characters beyond Latin-1."""
DECODE_OVERHEAD = 6
"""Bytes decoding needs per raw byte on top of the result (pre-scan copies, the text)."""


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


def note_error(errors: list[str], text: str) -> None:
    """Keep ``text`` if fewer than :data:`MAX_ERRORS` are kept, cut to MAX_ERROR_TEXT."""
    if len(errors) < MAX_ERRORS:
        errors.append(text[:MAX_ERROR_TEXT])


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_BRACKET_KINDS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_RUNS = re.compile(rb"\[+|\]+")
_OPEN = ord("[")
SCAN_CHUNK = 1 << 14
"""The pre-scan's unit: ``re.sub`` allocates per match, so it only ever sees this much."""


def message_cost(data: bytes, max_cost: int | None = None) -> int:
    """Upper bound on the bytes ``json.loads(data)`` keeps alive.

    FrameError if nesting is deeper than :data:`MAX_DEPTH`, or as soon as the cost
    passes ``max_cost``. Linear in ``len(data)``: C string operations on one
    :data:`SCAN_CHUNK` at a time (a string or an escape may cross chunks). Escapes
    go first, so every quote left delimits a string; strings become ``0``, so every
    bracket, comma and colon left is structure; those are counted. For valid UTF-8
    JSON this sees what ``json`` will; anything else ``json.loads`` rejects afterwards.
    """
    # Characters beyond Latin-1 (raw, or as \u escapes) may make every string 4 bytes
    # a character.
    char_cost = WIDE_CHARS if not data.isascii() or b"\\u" in data else 1
    cost = COST_VALUE  # the top-level value
    nests: list[bytes] = []
    in_string = escaped = False
    for off in range(0, len(data), SCAN_CHUNK):
        chunk = data[off:off + SCAN_CHUNK]
        if escaped:  # the previous chunk ended in a backslash
            chunk, escaped = chunk[1:], False
        if b"\\" in chunk:
            chunk = _ESCAPE.sub(b"", chunk)
            if chunk.endswith(b"\\"):  # unpaired: it escapes the next chunk's first byte
                chunk, escaped = chunk[:-1], True
        if in_string:
            close = chunk.find(b'"')
            cost += char_cost * (len(chunk) if close < 0 else close)
            if close < 0:
                _check_cost(cost, max_cost)
                continue
            chunk, in_string = chunk[close + 1:], False
        quotes = chunk.count(b'"')
        if quotes % 2:  # the last quote opens a string that goes on in the next chunk
            opening = chunk.rfind(b'"')
            cost += char_cost * (len(chunk) - opening)
            chunk, in_string = chunk[:opening] + b'""', True
            quotes += 1
        strings = quotes // 2
        if strings:
            before = len(chunk)
            chunk = _STRING.sub(b"0", chunk)
            cost += COST_STRING * strings + char_cost * (before - len(chunk))
        lists, dicts = chunk.count(b"["), chunk.count(b"{")
        empty_lists, empty_dicts = chunk.count(b"[]"), chunk.count(b"{}")  # split ones: non-empty
        # Every value is the first in its container or follows a comma.
        values = chunk.count(b",") + lists + dicts - empty_lists - empty_dicts
        cost += (COST_EMPTY * (empty_lists + empty_dicts) + COST_LIST * (lists - empty_lists)
                 + COST_DICT * (dicts - empty_dicts) + COST_ENTRY * chunk.count(b":")
                 + COST_VALUE * values
                 + len(chunk))  # number literals (a big int takes less than its digits)
        _check_cost(cost, max_cost)
        nests.append(chunk.translate(_BRACKET_KINDS, _NOT_BRACKETS))
    if in_string:
        raise FrameError("message is not valid JSON: unterminated string")
    _check_depth(b"".join(nests))
    return cost


def _check_cost(cost: int, max_cost: int | None) -> None:
    if max_cost is not None and cost > max_cost:
        raise FrameError(f"message would take more than its limit of {max_cost} bytes "
                         "parsed")


def _check_depth(nest: bytes) -> None:
    """Refuse brackets (``{}`` mapped to ``[]``) nested deeper than MAX_DEPTH, or unbalanced.

    Removing every ``[]`` takes exactly one level off, in C: wide trees vanish in a few
    passes. A deep, narrow rest is walked a run of same brackets at a time.
    """
    limit = MAX_DEPTH
    while nest and limit > 0:
        shorter = nest.replace(b"[]", b"")
        if len(shorter) > len(nest) * 3 // 4:
            break
        nest, limit = shorter, limit - 1
    depth = 0
    for run in _RUNS.finditer(nest):
        if nest[run.start()] == _OPEN:
            depth += run.end() - run.start()
            if depth > limit:
                raise FrameError(f"message is nested deeper than {MAX_DEPTH} levels")
        else:
            depth -= run.end() - run.start()
            if depth < 0:
                break
    if depth:
        raise FrameError("message is not valid JSON: unbalanced brackets")


def decode_message(data: bytes, max_cost: int) -> tuple[Any, int]:
    """The JSON value in ``data`` (UTF-8) and its :func:`message_cost`.

    Every failure is a :class:`FrameError`: bad UTF-8 or JSON, too deep, a number
    beyond Python's int-string limit, or a parsed size over ``max_cost``.
    """
    cost = message_cost(data, max_cost)
    try:
        return json.loads(data.decode("utf-8")), cost
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError, JSONDecodeError, int limit
        raise FrameError(f"message is not valid JSON: {err}") from None


class Reassembler:
    """Turns a stream of frames into messages, enforcing order and size limits.

    ``feed`` returns a decoded message when a LAST frame completes one, else None;
    it raises :class:`FrameError` on any inconsistency. After an error the
    partial message is dropped and the next FIRST frame starts afresh.
    ``max_message`` bounds a message's raw bytes and its parsed size; ``last_cost``
    is the parsed size of the message ``feed`` last returned.
    """

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self.next_seq = 0
        self.last_cost = 0
        self._parts: list[bytes] | None = None
        self._size = 0

    @property
    def in_progress(self) -> bool:
        return self._parts is not None

    @property
    def pending(self) -> int:
        """Bytes held for the message in progress."""
        return self._size if self._parts is not None else 0

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
        message, self.last_cost = decode_message(data, self.max_message)
        return message

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


def decode_serial(stream: bytes, max_message: int = DEFAULT_MAX_MESSAGE,
                  max_total: int = DEFAULT_MAX_TOTAL) -> tuple[list[Any], list[str]]:
    """Messages and errors from a serial-transport byte stream (other lines are ignored).

    Messages are any JSON values, unchecked: see :mod:`ktstr.wire.messages`.
    """
    import base64
    import binascii

    reasm = Reassembler(max_message)
    messages: list[Any] = []
    errors: list[str] = []
    kept = 0
    start = stream.find(SERIAL_PREFIX)
    while start >= 0:  # only prefixed lines: no list of every console line
        end = stream.find(b"\n", start)
        end = len(stream) if end < 0 else end
        line = stream[start + len(SERIAL_PREFIX):end].rstrip(b"\r")
        start = stream.find(SERIAL_PREFIX, end)
        try:
            blob = base64.b64decode(line, validate=True)
            message = reasm.feed(decode_frame(blob, max_message))
            if message is not None and kept + reasm.last_cost > max_total:
                raise FrameError(f"guest messages would take more than {max_total} bytes "
                                 "of host memory in total")
        except (FrameError, binascii.Error) as err:
            note_error(errors, f"channel: {err}")
            continue
        if message is not None:
            kept += reasm.last_cost
            messages.append(message)
    try:
        reasm.finish()
    except FrameError as err:
        note_error(errors, f"channel: {err}")
    return messages, errors
