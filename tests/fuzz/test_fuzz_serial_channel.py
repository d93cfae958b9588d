"""The serial-channel fallback (COM2 lines) and the host's use of messages: any stream,
any message shape. decode_serial never raises and keeps its errors bounded; collect()
never raises, uses only messages that pass their schema, and names the others."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from ktstr.initramfs import BaseArchive
from ktstr.runner import collect
from ktstr.vmm.vm import VmResult
from ktstr.wire.frame import (
    FIRST,
    LAST,
    MAX_ERRORS,
    SERIAL_PREFIX,
    decode_serial,
    encode_frame,
    serial_line,
    split_frames,
)
from ktstr.wire.messages import NULL, SCHEMAS, Field, validate_message

Bound = Callable[[int], AbstractContextManager[None]]
BASE = BaseArchive(Path("/nonexistent"), "k", 0, True, 0.0, 0, "/py", ())
STREAM_BYTES = 256 << 10
EXAMPLE_BYTES = 64 * STREAM_BYTES
"""The stream, its decoded messages (bounded by their parsed cost) and the run."""

any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=4),
    max_leaves=12,
)


SCALARS: dict[type, st.SearchStrategy[Any]] = {
    int: st.integers(), float: st.floats(allow_nan=False), str: st.text(max_size=20),
    bool: st.booleans(), NULL: st.none(),
}


def of_type(spec: Field) -> st.SearchStrategy[Any]:
    """Values a field's schema accepts."""
    options: list[st.SearchStrategy[Any]] = []
    for kind in spec.types:
        if kind is list:
            items = st.one_of(*(SCALARS.get(t, st.builds(dict)) for t in spec.items or (str,)))
            options.append(st.lists(items, max_size=4))
        elif kind is dict:
            sub = {name: of_type(f) for name, f in (spec.fields or {}).items()}
            options.append(st.fixed_dictionaries(sub) if sub else st.dictionaries(
                st.text(max_size=6), any_json, max_size=3))
        else:
            options.append(SCALARS[kind])
    return st.one_of(*options)


@st.composite
def messages(draw: st.DrawFn) -> Any:
    """A message of a known type whose fields are each right, wrong or missing; or junk."""
    kind = draw(st.sampled_from([*SCHEMAS, "other"]))
    if kind == "other":
        return draw(any_json)
    valid = draw(st.booleans())
    body: dict[str, Any] = {"type": kind}
    for name, spec in SCHEMAS[kind].items():
        choice = 0 if valid else draw(st.integers(0, 3))
        if choice == 0 and (spec.required or draw(st.booleans())):
            body[name] = draw(of_type(spec))
        elif choice == 1:
            body[name] = draw(any_json)
        elif choice == 2:
            body[name] = draw(st.sampled_from([0, 1.5, "s", True, None, [], {}, [{}], ["s"],
                                               {"log_tail": 3}, {"log_tail": "t"}]))
    return body


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    seq = 0
    for _ in range(draw(st.integers(0, 12))):
        piece = draw(st.sampled_from(["message", "noise", "corrupt", "raw", "gap"]))
        if piece == "message":
            data = json.dumps(draw(messages())).encode()
            frames = split_frames(data, seq, draw(st.integers(1, 300)))
            seq += len(frames)
            newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r\r\n"]))
            parts.extend(serial_line(f).replace(b"\n", newline) for f in frames)
        elif piece == "noise":
            parts.append(draw(st.binary(max_size=200)).replace(SERIAL_PREFIX, b"") + b"\n")
        elif piece == "corrupt":
            line = bytearray(serial_line(encode_frame(seq, FIRST | LAST, b'{"type":"x"}')))
            if line:
                line[draw(st.integers(0, len(line) - 1))] ^= 1 << draw(st.integers(0, 7))
            parts.append(bytes(line))
        elif piece == "raw":
            parts.append(SERIAL_PREFIX + draw(st.binary(max_size=100)) + b"\n")
        else:
            seq += draw(st.integers(1, 3))  # frames lost in transit
    stream = b"".join(parts)[:STREAM_BYTES]
    return stream[:draw(st.integers(0, len(stream)))] if draw(st.booleans()) else stream


def vm(channel2: bytes) -> VmResult:
    return VmResult(exit_code=0, console="", channel2=channel2, timed_out=False,
                    panicked=False, boot_ms=None, exit_counts=[], duration_s=1.0,
                    reason="poweroff")


@given(streams(), st.booleans())
def test_serial_channel_stream_never_raises(bounded_memory: Bound, stream: bytes,
                                            scenario: bool) -> None:
    with bounded_memory(EXAMPLE_BYTES):
        msgs, errors = decode_serial(stream)
        run = collect([(float("nan"), m) for m in msgs], errors, vm(stream), BASE,
                      len(stream), scenario_mode=scenario)
    assert len(errors) <= MAX_ERRORS and len(run.channel_errors) <= MAX_ERRORS
    assert all(validate_message(m) is None for m in run.messages)
    assert len(run.messages) + len(run.channel_errors) >= min(len(msgs), MAX_ERRORS)
    event(f"failure: {run.failure}")


@given(st.lists(messages(), max_size=30), st.booleans())
def test_collect_uses_only_valid_messages(bodies: list[Any], scenario: bool) -> None:
    run = collect([(float(i), b) for i, b in enumerate(bodies)], [], vm(b""), BASE, 0,
                  scenario_mode=scenario)
    refused = [b for b in bodies if validate_message(b) is not None]
    assert run.messages == [b for b in bodies if validate_message(b) is None]
    assert len(run.channel_errors) == min(len(refused), MAX_ERRORS)
    assert (run.failure is None) == run.ok
    event("some refused" if refused else "all valid")
