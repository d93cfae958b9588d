"""Guest message schemas: what the host checks before it uses a message, and collect()
turning an invalid one into a channel error instead of an exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ktstr.guest.sched import ExitReport
from ktstr.guest.trace import trace_messages
from ktstr.initramfs import BaseArchive
from ktstr.runner import collect, decode_serial
from ktstr.vmm.vm import VmResult
from ktstr.wire.frame import FIRST, LAST, encode_frame, serial_line
from ktstr.wire.messages import SCHEMAS, validate_message

BASE = BaseArchive(Path("/nonexistent"), "k", 0, True, 0.0, 0, "/py", ())


def vm() -> VmResult:
    return VmResult(exit_code=0, console="", channel2=b"", timed_out=False, panicked=False,
                    boot_ms=None, exit_counts=[], duration_s=1.0, reason="poweroff")


def run_of(*bodies: Any) -> Any:
    return collect([(float(i), b) for i, b in enumerate(bodies)], [], vm(), BASE, 0,
                   scenario_mode=True)


GOOD: list[dict[str, Any]] = [
    {"type": "hello", "uptime": 1.5, "kernel": "6.12.0"},
    {"type": "sched_attached", "state": {"state": "enabled"}, "uptime": 2},
    {"type": "poke", "gpa": 4096, "data": "2a00", "what": "scx_watchdog_timeout"},
    {"type": "warning", "text": "no watchdog"},
    {"type": "scenario_start", "uptime": 3.0},
    {"type": "report", "data": {"x": 1}},
    {"type": "log", "text": "hi"},
    {"type": "scenario_end", "uptime": 4.0},
    {"type": "sched_samples", "samples": [{"t": 0.1, "state": "enabled"}]},
    {"type": "sched_exit", **ExitReport(0, "sigint", "disabled", True).to_dict()},
    {"type": "result", "value": {"answer": 42}},
    {"type": "result", "value": None},
    {"type": "shell", "exit_code": 0, "stdout": "", "stderr": ""},
    {"type": "failure", "kind": "exception", "message": "boom", "traceback": "tb",
     "details": {"log_tail": "x"}},
    {"type": "end", "exit_code": 0, "uptime": 5.0},
    # What ktstr.guest.trace sends: the trace in chunks, then what it holds.
    *trace_messages(b"# tracer: nop\n", {
        "events": ["sched/sched_switch"], "missing": [], "kprobes": [], "kprobe_problems": [],
        "buffer_kb": 1024, "bytes": 14, "overruns": {}, "error": None}),
    {"type": "something_new", "whatever": [1, 2]},  # unknown types pass (kept, unused)
]


@pytest.mark.parametrize("body", GOOD, ids=lambda b: b["type"])
def test_what_the_guest_sends_is_valid(body: dict[str, Any]) -> None:
    assert validate_message(body) is None


def test_every_schema_has_a_valid_example() -> None:
    assert set(SCHEMAS) <= {b["type"] for b in GOOD}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([1, 2, 3], "not a JSON object"),
        ("end", "not a JSON object"),
        ({"exit_code": 0}, "'type'"),
        ({"type": 7}, "'type'"),
        ({"type": "end"}, "end: field 'exit_code' is missing"),
        ({"type": "end", "exit_code": "0"}, "end: field 'exit_code' is str, expected int"),
        ({"type": "end", "exit_code": True}, "end: field 'exit_code' is bool, expected int"),
        ({"type": "result", "value": [1]}, "result: field 'value' is list"),
        ({"type": "report", "data": "x"}, "report: field 'data' is str"),
        ({"type": "sched_samples", "samples": 5}, "sched_samples: field 'samples' is int"),
        ({"type": "sched_samples", "samples": [1]}, "sched_samples: field 'samples[0]' is int"),
        ({"type": "failure", "kind": "scheduler_x", "message": "m",
          "details": {"log_tail": 5}}, "failure: field 'details.log_tail' is int"),
        ({"type": "failure", "kind": None, "message": "m"}, "failure: field 'kind' is NoneType"),
        ({"type": "shell", "exit_code": 0, "stdout": b"x"}, "shell: field 'stdout'"),
        ({"type": "poke", "gpa": "0x1000", "data": "00"}, "poke: field 'gpa' is str"),
        ({"type": "hello", "uptime": "soon"}, "hello: field 'uptime' is str, expected"),
        ({"type": "warning", "text": {"a": 1}}, "warning: field 'text' is dict"),
    ],
)
def test_invalid_messages_name_the_type_and_field(body: Any, needle: str) -> None:
    problem = validate_message(body)
    assert problem is not None and needle in problem


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2, 3],
        {"type": "sched_samples", "samples": 5},
        {"type": "failure", "kind": "scheduler_crashed", "message": "m",
         "details": {"log_tail": 5}},
        {"type": "report", "data": "x"},
        {"type": "end", "exit_code": "0"},
        {"type": "result", "value": [1]},
    ],
    ids=["list", "samples", "log_tail", "report", "exit_code", "result"],
)
def test_collect_turns_an_invalid_message_into_a_channel_error(bad: Any) -> None:
    run = run_of({"type": "hello"}, bad, {"type": "result", "value": {"a": 1}},
                 {"type": "end", "exit_code": 0})
    assert run.failure == "channel"
    assert len(run.channel_errors) == 1 and "channel: " in run.channel_errors[0]
    assert run.result == {"a": 1}  # the valid messages were still used
    assert bad not in run.messages


def test_serial_fallback_with_a_non_object_message_is_a_channel_error() -> None:
    stream = b"".join(serial_line(encode_frame(i, FIRST | LAST, p)) for i, p in enumerate(
        [b'"just a string"', b'{"type":"end","exit_code":0}']))
    msgs, errors = decode_serial(stream)
    run = collect([(float("nan"), m) for m in msgs], errors, vm(), BASE, len(stream),
                  scenario_mode=False)
    assert run.failure == "channel" and "not a JSON object" in run.message
    assert run.exit_code == 0


def test_device_errors_are_a_warning_of_the_run() -> None:
    result = vm()
    result.device_errors = {"VirtioMmio mmio 0xd0000050": 3}
    result.device_error_messages = ["VirtioMmio mmio 0xd0000050: write: QueueError: x"]
    run = collect([(0.0, {"type": "result", "value": None}), (1.0, {"type": "end",
                   "exit_code": 0})], [], result, BASE, 0, scenario_mode=True)
    assert run.ok
    assert any("0xd0000050" in w and "QueueError" in w for w in run.warnings)


def test_poke_handler_refuses_a_malformed_request() -> None:
    from ktstr.runner import _poke
    from ktstr.vmm.devices.channel import ResultChannel
    from ktstr.vmm.memory import GuestMemory

    with GuestMemory([(0, 1 << 20)]) as mem:
        chan = ResultChannel(window_size=64 * 1024)
        chan.bind(mem, 0x80000)
        _poke(chan, {"type": "poke", "gpa": 0x1000, "data": "2a"})
        assert mem.read(0x1000, 1) == b"\x2a"
        for bad, needle in (({"gpa": "0x1000", "data": "2a"}, "'gpa'"),
                            ({"gpa": 0x1000, "data": "00" * 9}, "8 bytes"),
                            ({"gpa": 0x1000}, "'data' is missing")):
            with pytest.raises(ValueError, match=needle):
                _poke(chan, {"type": "poke", **bad})
