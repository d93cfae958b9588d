"""The result channel's host device and decoder under hostile frames and payloads.

The window sits at the very top of a small real GuestMemory, so a read past it
would be outside guest RAM; the memory records every access, which must all lie
inside the window. Nothing may raise out of the doorbell (a GuestMemoryError
counts as handled only when the device caught it), every kept message is an
object with a string type, and host memory stays under a stated bound.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from ktstr.vmm.devices.channel import CONTROL, FRAME_OFFSET, ResultChannel
from ktstr.vmm.memory import GuestMemory
from ktstr.wire.frame import (
    DECODE_OVERHEAD,
    FIRST,
    HEADER_SIZE,
    LAST,
    MAGIC,
    MAX_ERRORS,
    SCAN_CHUNK,
    FrameError,
    decode_message,
    encode_frame,
)

Bound = Callable[[int], AbstractContextManager[None]]
RAM = 1 << 20
WINDOW = 64 << 10
GPA = RAM - WINDOW
MAX_MESSAGE = 1 << 20
MAX_TOTAL = 2 << 20
EXAMPLE_BYTES = MAX_TOTAL + MAX_MESSAGE + DECODE_OVERHEAD * MAX_MESSAGE + 64 * SCAN_CHUNK
"""Kept messages, one being reassembled, decoding it, the pre-scan's chunk workspace."""


TRACE_NOISE = 256
"""What tracemalloc also sees after a decode: the (value, cost) tuple and the cost int."""


class WatchedMemory(GuestMemory):
    """Real guest RAM that remembers the extent of every access."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        super().__init__(regions)
        self.accesses: list[tuple[int, int]] = []

    def read(self, gpa: int, length: int) -> bytes:
        self.accesses.append((gpa, length))
        return super().read(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.accesses.append((gpa, len(data)))
        super().write(gpa, data)

    def view(self, gpa: int, length: int) -> memoryview:
        self.accesses.append((gpa, length))
        return super().view(gpa, length)


# --- hostile JSON --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=6),
    max_leaves=40,
)


@st.composite
def hostile_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["deep", "int", "empties", "value", "message", "bytes", "cut"]))
    if kind == "deep":
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"),
                                               (b'[{"b":', b"}]"), (b"[", b"}")]))
        depth = draw(st.integers(1, 40) | st.integers(60, 70) | st.integers(1000, 20_000))
        return opener * depth + b"0" + closer * depth
    if kind == "int":
        digits = draw(st.integers(1, 30) | st.integers(4250, 4350) | st.integers(5000, 20_000))
        return b'{"type":"n","v":' + b"9" * digits + b"}"
    if kind == "empties":
        item = draw(st.sampled_from([b"{}", b"[]", b'""', b"0", b'{"k":[]}']))
        count = draw(st.integers(0, 100) | st.integers(10_000, 30_000))
        return b'{"type":"e","v":[' + b",".join([item] * count) + b"]}"
    if kind == "value":
        value = draw(json_values)
        return json.dumps(value, ensure_ascii=draw(st.booleans())).encode()
    if kind == "message":
        body = {"type": draw(st.text(max_size=10)), "v": draw(json_values)}
        return json.dumps(body, ensure_ascii=draw(st.booleans())).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=2000))
    whole = json.dumps({"type": "c", "v": draw(json_values)}).encode()
    return whole[:draw(st.integers(0, len(whole)))]


# --- frames into the window ----------------------------------------------------------------


def header(flags: int, seq: int, length: int, payload: bytes, *, magic: int = MAGIC,
           version: int = 1, crc: int | None = None) -> bytes:
    head = struct.pack("<IBBHII", magic, version, flags, 0, seq & 0xFFFFFFFF, length)
    if crc is None:
        crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I4x", crc)


op = st.one_of(
    # A whole message, split into frames the way the guest writer does.
    st.tuples(st.just("message"), hostile_payloads(), st.integers(1, WINDOW)),
    # One frame with any header fields (mostly plausible ones).
    st.tuples(st.just("frame"), st.tuples(
        st.integers(0, 3) | st.integers(0, 255),  # flags
        st.integers(-2, 2) | st.integers(0, 1 << 32),  # seq, relative to the expected one
        st.none() | st.integers(0, (1 << 32) - 1),  # length (None: the payload's)
        st.booleans(),  # right CRC
        st.booleans() | st.just(True),  # right magic and version
        st.binary(max_size=256) | hostile_payloads(),
    ), st.just(0)),
    # Random bytes anywhere in the window (control words included).
    st.tuples(st.just("scribble"), st.binary(max_size=512), st.integers(0, WINDOW - 1)),
    st.tuples(st.just("ring"), st.just(b""), st.just(0)),
    st.tuples(st.just("status"), st.just(b""), st.sampled_from([1, 2, 4])),
)


def _run(dev: ResultChannel, mem: WatchedMemory, kind: str, arg: Any, num: int) -> None:
    base = GPA + FRAME_OFFSET
    room = WINDOW - FRAME_OFFSET - HEADER_SIZE
    if kind == "message":
        seq = dev._reasm.next_seq
        size = min(max(num, len(arg) // 64), room)  # at most ~64 frames: bounded run time
        for i, start in enumerate(range(0, max(len(arg), 1), size)):
            chunk = arg[start:start + size]
            last = start + len(chunk) >= len(arg)
            flags = (FIRST if i == 0 else 0) | (LAST if last else 0)
            GuestMemory.write(mem, base, encode_frame(seq + i, flags, chunk))
            dev.pio_write(dev.port, b"\x01")
    elif kind == "frame":
        flags, dseq, length, good_crc, good_head, payload = arg
        seq = dev._reasm.next_seq + dseq if -2 <= dseq <= 2 else dseq
        payload = payload[:room]
        head = header(flags, seq, len(payload) if length is None else length, payload,
                      magic=MAGIC if good_head else 0x12345678,
                      crc=None if good_crc else 0xDEADBEEF)
        GuestMemory.write(mem, base, head + payload)
        dev.pio_write(dev.port, b"\x01")
    elif kind == "scribble":
        GuestMemory.write(mem, GPA + num, arg[:WINDOW - num])
        dev.pio_write(dev.port, b"\x01")
    elif kind == "ring":
        dev.pio_write(dev.port, b"\x01")
    else:
        assert len(dev.pio_read(dev.port, num)) == num


@given(st.lists(op, max_size=25))
def test_channel_device_survives_any_frame(bounded_memory: Bound,
                                           ops: list[tuple[str, Any, int]]) -> None:
    with WatchedMemory([(0, RAM)]) as mem:
        dev = ResultChannel(window_size=WINDOW, max_message=MAX_MESSAGE, max_total=MAX_TOTAL)
        dev.bind(mem, GPA)
        with bounded_memory(EXAMPLE_BYTES):
            for kind, arg, num in ops:
                _run(dev, mem, kind, arg, num)
            errors = dev.finish()
        control = CONTROL.unpack_from(GuestMemory.read(mem, GPA, CONTROL.size))
    event(f"messages kept: {min(len(dev.messages), 5)}{'+' if len(dev.messages) > 5 else ''}")
    event(f"errors: {min(len(errors), 5)}{'+' if len(errors) > 5 else ''}")
    assert all(GPA <= gpa <= gpa + n <= GPA + WINDOW for gpa, n in mem.accesses)
    assert all(isinstance(m.body, dict) and isinstance(m.body["type"], str)
               for m in dev.messages)
    assert dev.kept_cost <= MAX_TOTAL
    assert len(errors) <= MAX_ERRORS
    assert control[0] == dev._reasm.next_seq


@given(json_values, st.booleans())
def test_decoded_value_is_json_and_costs_no_more_than_estimated(value: Any, ascii: bool) -> None:
    payload = json.dumps(value, ensure_ascii=ascii).encode()
    tracemalloc.start()
    try:
        decoded, cost = decode_message(payload, 1 << 30)
        kept, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded == value
    assert kept <= cost + TRACE_NOISE


@given(hostile_payloads())
def test_hostile_payload_decodes_or_is_a_frame_error(bounded_memory: Bound,
                                                     payload: bytes) -> None:
    with bounded_memory(EXAMPLE_BYTES):
        try:
            decode_message(payload, MAX_MESSAGE)
        except FrameError as err:
            event(f"refused: {str(err).split(':')[0]}")
        else:
            event("decoded")
