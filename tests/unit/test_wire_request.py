"""Guest-side pure parts: the run request schema, sched_ext log parsing, cpu lists."""

from __future__ import annotations

import pytest

from ktstr.console import disabled_events
from ktstr.wire.request import MountSpec, RunRequest, SchedulerSpec


def test_request_json_roundtrip() -> None:
    req = RunRequest(
        scenario="mod:fn", test_file="/x/mod.py", args={"a": [1, 2]},
        scheduler=SchedulerSpec(binary="/b/scx_simple", args=["-v"], ops_name="simple",
                                watchdog_timeout_ms=4000),
        sysctls={"kernel.sched_rt_runtime_us": "-1"},
        mounts=[MountSpec("/dev/vda", "/mnt/disk0", "btrfs")],
    )
    back = RunRequest.from_json(req.to_json())
    assert back == req
    assert back.scheduler is not None and back.scheduler.ops_name == "simple"
    assert back.mounts[0].mountpoint == "/mnt/disk0"


def test_request_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        RunRequest.from_dict({"scenario": "a:b", "bogus": 1})


def test_disabled_events_clean_and_error() -> None:
    lines = [
        'sched_ext: BPF scheduler "simple" enabled',
        'sched_ext: BPF scheduler "simple" disabled (unregistered from user space)',
        'sched_ext: BPF scheduler "qmap" disabled (runtime error)',
        "sched_ext: qmap: scx_bpf_error (exiting after 100 enqueues)",
        'sched_ext: BPF scheduler "qmap" disabled (runnable task stall)',
        "sched_ext: qmap: kworker/0:1[12] failed to run for 5.1s",
    ]
    events = disabled_events(lines)
    assert [e["reason"] for e in events] == [
        "unregistered from user space", "runtime error", "runnable task stall"]
    assert events[0]["message"] == ""
    assert events[1]["message"] == "scx_bpf_error (exiting after 100 enqueues)"
    assert events[2]["name"] == "qmap" and "failed to run" in events[2]["message"]


