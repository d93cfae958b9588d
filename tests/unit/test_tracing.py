"""Tracing: the guest's Tracer on this machine's real tracefs, the trace's trip over the
channel (hostile chunks included), the timeline it is read into, the repro's probe
targets and verdicts, and the report's timeline picture."""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ktstr.guest.trace import Tracer, probe_name, trace_messages
from ktstr.testing.repro import (
    DIFFERENT,
    NOT_REACHED,
    NOT_REPRODUCED,
    REPRODUCED,
    SCX_CALLBACKS,
    classify,
    probe_targets,
)
from ktstr.tracing import assemble, parse_trace
from ktstr.wire.messages import validate_message
from ktstr.wire.request import RunRequest, TraceSpec


def _switch(cpu: int, ts: str, prev: tuple[str, int, str], nxt: tuple[str, int]) -> str:
    comm, pid, state = prev
    return (f"{comm:>16}-{pid:<6} [{cpu:03d}] d..2. {ts}: sched_switch: prev_comm={comm} "
            f"prev_pid={pid} prev_prio=120 prev_state={state} ==> next_comm={nxt[0]} "
            f"next_pid={nxt[1]} next_prio=120")


SAMPLE = "\n".join([
    "# tracer: nop",
    _switch(0, "100.000000", ("<idle>", 0, "R"), ("spin", 10)),
    _switch(0, "100.500000", ("spin", 10, "R+"), ("hog", 11)),
    "             hog-11      [000] dN.3.   100.600000: sched_wakeup: comm=sleeper pid=12 "
    "prio=120 target_cpu=001",
    _switch(1, "100.600300", ("<idle>", 0, "R"), ("sleeper", 12)),
    _switch(0, "101.500000", ("hog", 11, "S"), ("spin", 10)),
]) + "\n"


def test_timeline_segments_waits_and_latency() -> None:
    tl = parse_trace(SAMPLE)
    assert tl.cpus == [0, 1] and tl.events == 5
    spans = [(s.cpu, s.pid, round(s.end - s.start, 3)) for s in tl.segments]
    assert (0, 10, 0.5) in spans and (0, 11, 1.0) in spans
    start, end = tl.longest_wait[10]  # preempted at 100.5, back at 101.5
    assert (start, end) == (100.5, 101.5)
    lat = {t.pid: t for t in tl.latencies}
    assert lat[12].wakeups == 1 and lat[12].max_us == pytest.approx(300, abs=1)


# ---- the trace over the channel ------------------------------------------------------


def test_trace_round_trip_through_valid_messages() -> None:
    text = SAMPLE.encode() * 2000
    info = {"events": ["sched/sched_switch"], "missing": [], "kprobes": [],
            "kprobe_problems": [], "buffer_kb": 1024, "bytes": len(text), "overruns": {},
            "error": None}
    msgs = trace_messages(text, info)
    assert all(validate_message(m) is None for m in msgs)
    chunks = [m for m in msgs if m["type"] == "trace_chunk"]
    got = assemble(list(reversed(chunks)), msgs[-1])
    assert got is not None and got.problem is None and got.text == text


def _info(chunks: int) -> dict[str, Any]:
    return {"chunks": chunks}


def test_hostile_traces_are_problems_not_exceptions() -> None:
    bad64 = assemble([{"seq": 0, "data": "!!!"}], _info(1))
    assert bad64 is not None and "does not decode" in str(bad64.problem)
    gap = assemble([{"seq": 0, "data": ""}, {"seq": 2, "data": ""}], _info(3))
    assert gap is not None and "arrived" in str(gap.problem)
    bomb = base64.b64encode(zlib.compress(b"\0" * (8 << 20))).decode()
    cut = assemble([{"seq": 0, "data": bomb}], _info(1), max_bytes=1 << 20)
    assert cut is not None and len(cut.text) == 1 << 20 and "cut" in str(cut.problem)
    lost = assemble([{"seq": 0, "data": ""}], None)
    assert lost is not None and "never came" in str(lost.problem)
    assert assemble([], None) is None


def test_trace_spec_travels_in_the_run_request() -> None:
    req = RunRequest(scenario="m:f", trace=TraceSpec(kprobes=["pick_next_task"]))
    back = RunRequest.from_json(req.to_json())
    assert back.trace == TraceSpec(kprobes=["pick_next_task"])
    assert probe_name("scx_bpf_error.cold") == "p_scx_bpf_error_cold"


# ---- the Tracer on this machine's tracefs -------------------------------------------


@contextlib.contextmanager
def _tracefs() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ktstr-tracefs-"))
    try:
        if subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)],
                          capture_output=True, check=False).returncode:
            pytest.skip("cannot mount tracefs here")
        yield root
    finally:
        subprocess.run(["umount", str(root)], capture_output=True, check=False)
        root.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="tracefs needs root")
def test_tracer_on_a_real_tracefs() -> None:
    with _tracefs() as root:
        spec = TraceSpec(buffer_kb=512, kprobes=["do_sys_openat2", "no_such_function_ktstr"])
        tracer = Tracer(spec, root)
        tracer.start()
        for _ in range(20):
            subprocess.run(["true"], check=True)
            Path("/proc/self/status").read_text()
        text, info = tracer.stop()
        assert info["error"] is None, info
        assert "sched/sched_switch" in info["events"]
        decoded = text.decode(errors="replace")
        assert "sched_switch:" in decoded
        if (root / "kprobe_events").exists():
            assert info["kprobes"] == ["do_sys_openat2"]
            assert "p_do_sys_openat2:" in decoded
        else:  # a kernel without kprobe events: each probe is a problem, the run goes on
            assert info["kprobes"] == []
            assert info["kprobe_problems"][0].startswith("do_sys_openat2: cannot be probed")
        assert info["kprobe_problems"][-1].startswith("no_such_function_ktstr: cannot be probed")
        assert parse_trace(decoded).segments
        # Left as found: no events on, our kprobes gone.
        assert (root / "events/enable").read_text().strip() in ("0", "X")
        if (root / "kprobe_events").exists():
            assert "ktstr/" not in (root / "kprobe_events").read_text()


def test_tracer_without_tracefs_says_so(tmp_path: Path) -> None:
    tracer = Tracer(TraceSpec(), tmp_path)
    tracer.start()
    text, info = tracer.stop()
    assert text == b"" and "no tracefs" in info["error"]


# ---- repro -------------------------------------------------------------------------


def _attempt(status: str, failure: str | None = None, check: str | None = None) -> Any:
    checks = [SimpleNamespace(name=check, passed=False)] if check else []
    return SimpleNamespace(verdict=SimpleNamespace(status=status, passed=status == "pass",
                                                   checks=checks),
                           run=SimpleNamespace(failure=failure))


def test_repro_verdicts() -> None:
    first = _attempt("fail", check="starvation")
    assert classify(first, _attempt("fail", check="starvation")) == REPRODUCED
    assert classify(first, _attempt("fail", failure="scheduler_ejected")) == DIFFERENT
    assert classify(first, _attempt("pass")) == NOT_REPRODUCED
    assert classify(first, _attempt("inconclusive")) == NOT_REACHED


def test_probe_targets_from_the_exit_backtrace() -> None:
    exit_info = SimpleNamespace(backtrace=("scx_bpf_error_bstr+0x5c", "bpf_prog:qmap_enqueue+0x3f",
                                           "0xffffffff81000000", "do_enqueue_task+0x1a1"))
    obs = SimpleNamespace(exit_snapshot=SimpleNamespace(sched_ext=SimpleNamespace(exit=exit_info)),
                          final=None, stalls={})
    got = probe_targets(obs, sched_ext=True)  # type: ignore[arg-type]
    assert got.functions[:2] == ("scx_bpf_error_bstr", "do_enqueue_task")
    assert set(SCX_CALLBACKS) <= set(got.functions)
    assert any("a BPF program" in s for s in got.skipped)
    assert any(s.startswith("0xffffffff81000000: no symbol") for s in got.skipped)


# ---- the report's timeline -----------------------------------------------------------


def test_report_draws_the_timeline_of_a_traced_result(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from ktstr.results.report import timeline_figure, write_report

    fig = timeline_figure(parse_trace(SAMPLE), {10}, "sample")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["CPU 0", "CPU 1"]
    trace = tmp_path / "t.trace.txt"
    trace.write_text(SAMPLE)
    run = tmp_path / "run"
    run.mkdir()
    from ktstr.results.sidecar import write_sidecar

    record = {"test": "tests/x.py::t", "scheduler": {"name": "eevdf"}, "topology": "1n1l2c1t",
              "verdict": "fail", "reason": "starved",
              "checks": [{"name": "starvation", "passed": False, "worker": "cg[0] pid 10"}],
              "metrics": {"workers": [{"pid": 10}, {"pid": 12}]},
              "trace": {"path": str(trace)}}
    write_sidecar(record, root=tmp_path, run="run")
    out = write_report(run)
    page = out.read_text()
    assert "run timeline" in page and "wake-to-run p99 us" in page
    assert page.count("data:image/png;base64,") == 2


def test_a_guests_claims_about_its_trace_cost_no_host_memory() -> None:
    # A claimed chunk count of 10**18 once became list(range(10**18)) on the host.
    huge = assemble([{"seq": 0, "data": ""}], {"chunks": 10**18})
    assert huge is not None and "of 1000000000000000000 arrived" in str(huge.problem)
    far = assemble([{"seq": 10**18, "data": ""}], {"chunks": 1})
    assert far is not None and "arrived" in str(far.problem)
    big = assemble([{"seq": 0, "data": "A" * 64}], {"chunks": 1}, max_bytes=16)
    assert big is not None and "exceed" in str(big.problem)
