"""Result channel: framing, CRC, reassembly, hostile input, and the host device on GuestMemory."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib

import pytest

from ktstr.guest.channel import FRAME_OFFSET as GUEST_FRAME_OFFSET
from ktstr.guest.channel import ChannelError, WindowWriter, parse_spec
from ktstr.vmm.devices.channel import CONTROL, FRAME_OFFSET, ResultChannel
from ktstr.vmm.memory import GuestMemory
from ktstr.wire.frame import (
    DECODE_OVERHEAD,
    FIRST,
    HEADER_SIZE,
    LAST,
    MAGIC,
    MAX_DEPTH,
    MAX_ERRORS,
    SCAN_CHUNK,
    Frame,
    FrameError,
    Reassembler,
    decode_frame,
    decode_message,
    decode_serial,
    encode_frame,
    encode_message,
    serial_line,
    split_frames,
)

MiB = 1 << 20
WINDOW_GPA = 16 * MiB


def test_frame_roundtrip_and_layout() -> None:
    blob = encode_frame(7, FIRST | LAST, b"hello")
    assert len(blob) == HEADER_SIZE + 5
    magic, version, flags, _r, seq, length, crc = struct.unpack_from("<IBBHIII", blob)
    assert (magic, version, flags, seq, length) == (MAGIC, 1, FIRST | LAST, 7, 5)
    assert crc == zlib.crc32(b"hello", zlib.crc32(blob[:16]))
    frame = decode_frame(blob)
    assert frame == Frame(7, FIRST | LAST, b"hello")


def test_split_and_reassemble_large_message() -> None:
    message = {"type": "result", "value": {"blob": "x" * 100_000, "n": list(range(100))}}
    data = encode_message(message)
    frames = split_frames(data, 0, 4096)
    assert len(frames) == -(-len(data) // 4096)
    reasm = Reassembler()
    outs = [reasm.feed(decode_frame(f)) for f in frames]
    assert outs[:-1] == [None] * (len(frames) - 1)
    assert outs[-1] == message
    reasm.finish()


def test_empty_message_is_one_frame() -> None:
    frames = split_frames(b"", 3, 100)
    assert len(frames) == 1
    assert decode_frame(frames[0]).flags == FIRST | LAST


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "version"),
        (lambda b: b[:5] + b"\x80" + b[6:], "flags"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "CRC"),
        (lambda b: b[:-3], "truncated"),
        (lambda b: b[:12] + struct.pack("<I", 0xFFFFFFFF) + b[16:], "exceeds"),
        (lambda b: b[:10], "short"),
    ],
)
def test_hostile_frames_are_rejected(mutate, needle: str) -> None:
    blob = encode_frame(0, FIRST | LAST, b'{"type":"x"}')
    with pytest.raises(FrameError, match=needle):
        decode_frame(mutate(blob), max_length=1 << 20)


def test_sequence_gap_is_reported() -> None:
    reasm = Reassembler()
    reasm.feed(Frame(0, FIRST | LAST, b'{"type":"a"}'))
    with pytest.raises(FrameError, match="gap"):
        reasm.feed(Frame(2, FIRST | LAST, b'{"type":"b"}'))


def test_missing_last_frame_is_truncation() -> None:
    reasm = Reassembler()
    assert reasm.feed(Frame(0, FIRST, b'{"type":')) is None
    with pytest.raises(FrameError, match="truncated"):
        reasm.finish()


def test_new_message_before_last_frame_is_truncation() -> None:
    reasm = Reassembler()
    reasm.feed(Frame(0, FIRST, b'{"a":'))
    with pytest.raises(FrameError, match="truncated"):
        reasm.feed(Frame(1, FIRST | LAST, b'{"type":"b"}'))


def test_continuation_without_start_and_bad_json() -> None:
    reasm = Reassembler()
    with pytest.raises(FrameError, match="without a message start"):
        reasm.feed(Frame(0, LAST, b"{}"))
    with pytest.raises(FrameError, match="JSON"):
        reasm.feed(Frame(1, FIRST | LAST, b"\xff\xfe not json"))


def test_message_size_cap() -> None:
    reasm = Reassembler(max_message=10)
    reasm.feed(Frame(0, FIRST, b"x" * 8))
    with pytest.raises(FrameError, match="limit"):
        reasm.feed(Frame(1, LAST, b"x" * 8))


def test_serial_transport_roundtrip_amid_console_noise() -> None:
    msgs = [{"type": "a", "v": 1}, {"type": "b", "blob": "y" * 10_000}]
    stream = b"random boot noise\r\n"
    seq = 0
    for m in msgs:
        frames = split_frames(encode_message(m), seq, 3000)
        seq += len(frames)
        stream += b"".join(serial_line(f).replace(b"\n", b"\r\n") for f in frames)
    got, errors = decode_serial(stream + b"tail\n")
    assert got == msgs
    assert errors == []
    # Drop one line from the middle: the loss must be explicit.
    lines = stream.split(b"\n")
    damaged = b"\n".join(lines[:3] + lines[4:])
    got, errors = decode_serial(damaged)
    assert errors and any("gap" in e or "truncated" in e for e in errors)


def test_parse_spec() -> None:
    assert parse_spec("console=ttyS0 ktstr.channel=mem,0x1000,0x100000,0x5f0 quiet") == (
        "mem", ["0x1000", "0x100000", "0x5f0"])
    assert parse_spec("console=ttyS0") == ("serial", ["ttyS1"])


# --- the host device on real guest memory, driven by the guest's writer ---------------------


@pytest.fixture
def memory():
    mem = GuestMemory([(0, 64 * MiB)])
    yield mem
    mem.close()


def _pair(memory: GuestMemory, window: int = 1 * MiB, **kw) -> tuple[ResultChannel, WindowWriter]:
    dev = ResultChannel(window_size=window, **kw)
    dev.bind(memory, WINDOW_GPA)
    view = memory.view(WINDOW_GPA, window)
    writer = WindowWriter(view, lambda: dev.pio_write(dev.port, b"\x01"))
    return dev, writer


def test_guest_writer_to_host_device_10mb_intact(memory: GuestMemory) -> None:
    assert GUEST_FRAME_OFFSET == FRAME_OFFSET
    dev, writer = _pair(memory)
    payload = os.urandom(5 * MiB).hex()  # 10 MB of text
    writer.send_bytes(encode_message({"type": "result", "value": {"blob": payload}}))
    writer.send_bytes(encode_message({"type": "end", "exit_code": 0}))
    assert dev.finish() == []
    assert [m.body["type"] for m in dev.messages] == ["result", "end"]
    assert dev.messages[0].body["value"]["blob"] == payload
    assert dev.frames > 10
    next_seq, status, errors = CONTROL.unpack_from(memory.read(WINDOW_GPA, CONTROL.size))
    assert (next_seq, status, errors) == (dev.frames, 0, 0)


def test_host_device_rejects_hostile_length_and_guest_sees_it(memory: GuestMemory) -> None:
    dev, writer = _pair(memory, window=64 * 1024)
    head = struct.pack("<IBBHII", MAGIC, 1, FIRST | LAST, 0, 0, 0xFFFFFFF0)
    memory.write(WINDOW_GPA + FRAME_OFFSET, head + struct.pack("<I4x", 0))
    dev.pio_write(dev.port, b"\x01")
    assert dev.messages == []
    assert any("exceeds" in e for e in dev.errors)
    assert dev.pio_read(dev.port, 1) == b"\x01"
    # The next well-formed frame is accepted again; the guest writer sees status ok.
    writer.send_bytes(b'{"type":"ok"}')
    assert dev.messages[-1].body == {"type": "ok"}


def test_guest_writer_raises_when_host_rejects(memory: GuestMemory) -> None:
    dev, writer = _pair(memory, window=64 * 1024)
    with pytest.raises(ChannelError, match="rejected"):
        writer.send_bytes(b"[1, 2, 3]")  # valid JSON, but not a message object
    assert any("'type'" in e for e in dev.errors)


def test_host_device_reports_unfinished_message(memory: GuestMemory) -> None:
    dev, _writer = _pair(memory, window=64 * 1024)
    frame = encode_frame(0, FIRST, b'{"type": "partial"')
    memory.write(WINDOW_GPA + FRAME_OFFSET, frame)
    dev.pio_write(dev.port, b"\x01")
    errors = dev.finish()
    assert any("truncated" in e for e in errors)


def test_host_device_total_cap(memory: GuestMemory) -> None:
    dev, writer = _pair(memory, window=64 * 1024, max_total=100_000)
    writer.send_bytes(encode_message({"type": "a", "x": "y" * 50_000}))
    with pytest.raises(ChannelError):
        writer.send_bytes(encode_message({"type": "b", "x": "y" * 60_000}))
    assert any("in total" in e for e in dev.errors)


def test_handler_runs_during_doorbell_and_can_poke_memory(memory: GuestMemory) -> None:
    dev, writer = _pair(memory)
    target = 32 * MiB

    def poke(msg: dict) -> None:
        dev.write_guest(msg["gpa"], bytes.fromhex(msg["data"]))

    dev.handlers["poke"] = poke
    writer.send_bytes(json.dumps({"type": "poke", "gpa": target, "data": "2a00"}).encode())
    assert memory.read(target, 2) == b"\x2a\x00"
    # A poke outside guest RAM is refused by GuestMemory and reported, not raised.
    with pytest.raises(ChannelError):
        writer.send_bytes(json.dumps({"type": "poke", "gpa": 1 << 40, "data": "00"}).encode())
    assert any("handler" in e for e in dev.errors)


# --- hostile JSON payloads: channel errors, and memory charged on the parsed size -----------


def _one_frame(payload: bytes) -> Frame:
    return Frame(0, FIRST | LAST, payload)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b'{"type":"a","v":' + b"[" * 65 + b"]" * 65 + b"}", "nested deeper"),
        (b'{"type":"a","v":' + b"1" * 5000 + b"}", "not valid JSON"),
        (b'{"type":"a","v":"\\', "not valid JSON"),
        (b'{"type":"a","v":"' + b'\\"' * 1000, "not valid JSON"),
        (b'{"type":"a"]', "not valid JSON"),
        (b"\xff\xfe{\x00}\x00", "not valid JSON"),  # UTF-16: only UTF-8 is a message
    ],
)
def test_hostile_json_is_a_frame_error(payload: bytes, needle: str) -> None:
    with pytest.raises(FrameError, match=needle):
        Reassembler().feed(_one_frame(payload))


def test_nesting_up_to_the_limit_is_accepted() -> None:
    deep = b'{"type":"a","v":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    message = Reassembler().feed(_one_frame(deep))
    assert message["type"] == "a"


def _retained(payload: bytes) -> tuple[object, int, int, int]:
    """(message, its estimated cost, bytes it keeps alive, peak bytes while decoding)."""
    tracemalloc.start()
    try:
        message, cost = decode_message(payload, 1 << 30)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return message, cost, kept, peak


# Shapes that cost the most host memory per byte of JSON (see the cost model in frame.py).
COSTLY = {
    "empty objects": b"[" + b",".join([b"{}"] * 20_000) + b"]",
    "one-key objects": b"[" + b",".join([b'{"a":0}'] * 20_000) + b"]",
    "empty lists": b"[" + b",".join([b"[]"] * 20_000) + b"]",
    "nested lists": b"[" + b",".join([b"[[[0]]]"] * 10_000) + b"]",
    "numbers": b"[" + b",".join([b"1000.5", b"123456789"] * 10_000) + b"]",
    "short strings": b"[" + b",".join([b'"ab"'] * 20_000) + b"]",
    "unique keys": b"{" + b",".join(b'"%d":{}' % i for i in range(20_000)) + b"}",
    "astral strings": b"[" + b",".join([b'"\\ud83d\\ude00x"'] * 10_000) + b"]",
    "one astral char": b'["' + b"a" * 200_000 + b'\\ud83d\\ude00"]',
    "big integers": b"[" + b",".join([b"9" * 4000] * 50) + b"]",
}


@pytest.mark.parametrize("name", sorted(COSTLY))
def test_parsed_cost_estimate_bounds_the_memory_a_message_keeps(name: str) -> None:
    payload = COSTLY[name]
    message, cost, kept, peak = _retained(payload)
    assert message == json.loads(payload)
    assert kept <= cost, f"{name}: keeps {kept} bytes, estimated {cost}"
    # Decoding itself needs at most a few copies of the raw bytes on top of the result.
    assert peak <= cost + DECODE_OVERHEAD * len(payload), f"{name}: peak {peak}"


def test_3mb_of_empty_objects_is_charged_as_its_parsed_size(memory: GuestMemory) -> None:
    payload = b'{"type":"r","v":[' + b",".join([b"{}"] * 1_000_000) + b"]}"
    assert len(payload) < 4 * MiB
    # 4 MB of raw bytes would fit a 32 MB budget; ~72 MB of parsed objects do not.
    dev, writer = _pair(memory, max_total=32 * MiB)
    with pytest.raises(ChannelError):
        writer.send_bytes(payload)
    assert dev.messages == []
    assert any("in total" in e for e in dev.errors)
    writer.send_bytes(b'{"type":"end","exit_code":0}')  # the channel goes on
    assert dev.of_type("end") == [{"type": "end", "exit_code": 0}]


def test_per_message_limit_is_on_parsed_size_too() -> None:
    payload = b"[" + b",".join([b"{}"] * 100_000) + b"]"
    with pytest.raises(FrameError, match="parsed"):
        Reassembler(max_message=len(payload) * 4).feed(_one_frame(payload))


def test_host_device_turns_hostile_json_into_a_channel_error(memory: GuestMemory) -> None:
    dev, writer = _pair(memory, window=64 * 1024)
    for bad in (b"[" * 50_000, b'{"type":"a","n":' + b"7" * 4500 + b"}"):
        with pytest.raises(ChannelError):
            writer.send_bytes(bad)
    assert len(dev.errors) == 2 and all("JSON" in e or "nested" in e for e in dev.errors)
    writer.send_bytes(b'{"type":"ok"}')
    assert dev.of_type("ok") == [{"type": "ok"}]


def test_serial_decoder_survives_hostile_payloads_and_bounds_its_errors() -> None:
    good = serial_line(encode_frame(0, FIRST | LAST, b'{"type":"a"}'))
    deep = serial_line(encode_frame(1, FIRST | LAST, b"[" * 10_000 + b"]" * 10_000))
    noise = b"@KTSTR:!!!\n" * 10_000
    got, errors = decode_serial(good + deep + noise)
    assert got == [{"type": "a"}]
    assert any("nested" in e for e in errors)
    assert len(errors) <= MAX_ERRORS


@pytest.mark.parametrize("shift", range(-3, 4))
def test_prescan_follows_strings_and_escapes_across_its_chunks(shift: int) -> None:
    # A backslash, a quote, a bracket pair and a string boundary land on every side of
    # the pre-scan's chunk boundaries; the result must be what json itself reads.
    pad = "x" * (SCAN_CHUNK - 12 + shift)
    value = {"type": "a", "s": pad + '\\"[]{}', "l": [[], {}, "]" * 3, ["\\\\"]],
             "t": "y" * (2 * SCAN_CHUNK) + '"'}
    payload = encode_message(value)
    message, cost = decode_message(payload, 1 << 30)
    assert message == value
    assert cost >= len(payload)
