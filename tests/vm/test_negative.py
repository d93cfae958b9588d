"""Negative tests: a misbehaving scheduler must fail the run, and the harness must say why.

``scx_qmap``'s fault knobs: ``-t N`` stalls every N'th user thread, so the
kernel's sched_ext watchdog ejects the scheduler ("runnable task stall");
``-e N`` calls ``scx_bpf_error()`` after N enqueues. Both pin scx_qmap, so
kernels without sched_ext skip them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ktstr.scenario import CgroupDef
from ktstr.scheduler import BUILTIN
from ktstr.testing import execute_defs, ktstr_test

if TYPE_CHECKING:
    from ktstr.observe.monitor import Observation
    from ktstr.runner import GuestRun

QMAP_STALL = BUILTIN["scx_qmap"].with_args("-t", "5", name="scx_qmap_stall")
QMAP_ERROR = BUILTIN["scx_qmap"].with_args("-e", "200", name="scx_qmap_error")


@pytest.mark.smoke
@ktstr_test(topology="1n1l2c1t", scheduler=QMAP_STALL, duration=6.0, watchdog_timeout=2.0,
            expect_err=r"runnable task stall: \S+ failed to run for", gauntlet=False)
def test_qmap_stall_is_ejected(ctx):
    """Stalled threads: the watchdog ejects the scheduler within its timeout.

    The kernel names the stalled task ("T[pid] failed to run for N s"); its other
    stall exit, "watchdog failed to check in", means the watchdog itself did not
    run and is not what -t provokes.
    """
    return execute_defs(ctx, [CgroupDef("victims", workers=6)])


@ktstr_test(topology="1n1l2c1t", scheduler=QMAP_ERROR, duration=3.0,
            expect_err=r"scx_bpf_error: test triggering error", gauntlet=False)
def test_qmap_error_is_reported(ctx):
    """scx_bpf_error() after 200 enqueues: the kernel disables the scheduler with
    reason scx_bpf_error and scx_qmap's message (not a generic runtime error)."""
    return execute_defs(ctx, [CgroupDef("load", workers=4)])


def _stall_seen_in_guest_memory(run: GuestRun) -> None:
    """The observer names the stalled task and its CPU from guest RAM, not the console."""
    obs = run.observation
    assert obs is not None, "no observer (drgn missing?)"
    assert obs.open_s is not None, f"the observer never opened the guest: {obs.problems}"
    snap = obs.exit_snapshot
    assert snap is not None and snap.sched_ext is not None, (
        f"no snapshot at the scheduler's exit: {obs.problems}")
    ext = snap.sched_ext.exit
    assert ext is not None and ext.kind == "SCX_EXIT_ERROR_STALL", f"exit info: {ext}"
    assert ext.backtrace, "the exit's backtrace is empty"
    timeout_ms = snap.sched_ext.watchdog_timeout_ms
    assert timeout_ms is not None
    # The kernel's message names the task ("<comm>[<pid>] failed to run for N s"), unless
    # its watchdog itself was starved ("watchdog failed to check in"): then the monitor's
    # own reading of the runnable lists names the starved task.
    match = re.match(r"(\S+)\[(\d+)\] failed to run for", ext.message)
    if match:
        pid = int(match.group(2))
    else:
        assert ext.message.startswith("watchdog failed to check in"), ext.message
        pid = max(obs.stalls.values(), key=lambda s: s.runnable_age_ms).pid
    stall = obs.stalls.get(pid)
    assert stall is not None, f"pid {pid} not among the stalls seen in guest memory: {obs.stalls}"
    assert stall.runnable_age_ms > timeout_ms, (stall, timeout_ms)
    if match:
        assert stall.comm == match.group(1), (stall, ext.message)
    # The paused guest's snapshot at the exit still holds the task, on its CPU's run queue.
    task = next((t for t in snap.tasks if t.pid == pid), None)
    assert task is not None, f"pid {pid} is not among the runnable tasks at the exit"
    dump = obs.dump_paths.get("state")
    assert dump and json.loads(Path(dump).read_text())["exit_snapshot"], dump
    _vmcore_opens_with_drgn(obs)


def _vmcore_opens_with_drgn(obs: Observation) -> None:
    """The dump's vmcore is a kernel core drgn opens by itself, as a user would:
    ``drgn -c vmcore -s vmlinux``."""
    import drgn
    from drgn.helpers.linux.cpumask import for_each_present_cpu
    from drgn.helpers.linux.percpu import per_cpu

    vmcore = obs.dump_paths.get("vmcore")
    assert vmcore and Path(vmcore).stat().st_blocks * 512 < Path(vmcore).stat().st_size, vmcore
    prog = drgn.Program()
    prog.set_core_dump(vmcore)
    prog.load_debug_info([str(obs.vmlinux)])
    assert prog["init_task"].comm.string_() == b"swapper/0"
    cpus = list(for_each_present_cpu(prog))
    assert len(cpus) == 2, cpus
    final = obs.final_snapshot()
    assert final is not None, obs.problems
    for cpu in cpus:
        nr = int(per_cpu(prog["runqueues"], cpu).nr_running)
        assert nr == final.cpus[cpu].nr_running, (cpu, nr, final.cpus[cpu])


@ktstr_test(topology="1n1l2c1t", scheduler=QMAP_STALL, duration=6.0, watchdog_timeout=2.0,
            expect_err=r"runnable task stall", gauntlet=False,
            host_check=_stall_seen_in_guest_memory)
def test_qmap_stall_seen_from_guest_memory(ctx):
    """The same stall, judged from guest memory: the task, its CPU and runnable age at
    the moment the watchdog fired, the exit message and backtrace, and a dump on disk."""
    return execute_defs(ctx, [CgroupDef("victims", workers=6)])


def _qmap_maps_seen_from_guest_memory(run: GuestRun) -> None:
    """The scheduler's .bss map, read from guest RAM each second, counts its enqueues;
    its programs verified and were JITed."""
    obs = run.observation
    assert obs is not None and obs.open_s is not None, obs and obs.problems
    series = []
    for sample in obs.map_samples:
        for m in sample.maps:
            if m.name.endswith(".bss") and m.entries:
                value = m.entries[0].value
                assert isinstance(value, dict), value
                series.append(value.get("nr_enqueued"))
    assert len(series) >= 2 and all(isinstance(v, int) for v in series), (
        series, obs.problems)
    assert series[-1] > series[0], f"nr_enqueued did not grow: {series}"
    names = {p.name for p in obs.progs}
    assert "qmap_enqueue" in names, names
    assert all(p.verified_insns > 0 and p.jited_bytes > 0 for p in obs.progs), obs.progs


@ktstr_test(topology="1n1l2c1t", scheduler="scx_qmap", duration=4.0, gauntlet=False,
            watch_bpf_maps=[".bss"], host_check=_qmap_maps_seen_from_guest_memory)
def test_qmap_maps_are_watched_from_guest_memory(ctx):
    """A watched map changes over the run: scx_qmap's global counters."""
    return execute_defs(ctx, [CgroupDef("load", workers=4)])


def _error_seen_from_guest_memory(run: GuestRun) -> None:
    """scx_bpf_error(): the exit's kind, reason, message and backtrace from guest RAM."""
    obs = run.observation
    assert obs is not None and obs.exit_snapshot is not None, obs and obs.problems
    scx = obs.exit_snapshot.sched_ext
    assert scx is not None and scx.exit is not None, obs.problems
    ext = scx.exit
    assert ext.kind == "SCX_EXIT_ERROR_BPF" and ext.reason == "scx_bpf_error", ext
    assert "test triggering error" in ext.message, ext.message
    assert any(f.startswith("scx_bpf_error") for f in ext.backtrace), ext.backtrace
    # The scheduler's own frame, named from its JITed program's range.
    assert any(f.startswith("bpf_prog:qmap_enqueue+") for f in ext.backtrace), ext.backtrace
    dump = json.loads(Path(obs.dump_paths["state"]).read_text())
    assert dump["exit_snapshot"]["sched_ext"]["exit"]["backtrace"] == list(ext.backtrace)


@ktstr_test(topology="1n1l2c1t", scheduler=QMAP_ERROR, duration=3.0,
            expect_err=r"scx_bpf_error: test triggering error", gauntlet=False,
            host_check=_error_seen_from_guest_memory)
def test_qmap_error_seen_from_guest_memory(ctx):
    """The same error, read from guest memory at the moment of the exit."""
    return execute_defs(ctx, [CgroupDef("load", workers=4)])
