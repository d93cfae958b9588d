"""The guest runtime end to end: scenario functions from this module run inside the VM.

Needs a usable KVM (natively, or inside the sandbox: ``ktstr sandbox run --
python -m pytest tests/vm/test_guest_runtime.py``). Kernel and scheduler binaries
come from the ktstr plugin (fixtures in conftest.py: ``--ktstr-kernel``,
``$KTSTR_SCHEDULER_DIR``).

Only pytest is imported at module level: this module is imported again in
the guest to find the scenario functions.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# Nothing here depends on the session's scheduler: a matrix runs it once, with eevdf.
pytestmark = [pytest.mark.vm, pytest.mark.pins_scheduler("eevdf")]
THIS = Path(__file__).resolve()
MODULE = "test_guest_runtime"


# --- scenario functions (run in the guest) --------------------------------------------------


def scenario_roundtrip(ctx: Any) -> dict[str, Any]:
    ctx.report({"phase": "start", "cpus": ctx.cpus})
    ctx.report({"phase": "end"})
    return {
        "cpus": ctx.cpus,
        "topology": ctx.topology.label if ctx.topology else None,
        "args": ctx.args,
        "nested": {"list": [1, 2.5, None, True, "ü"], "deep": {"x": {"y": [[]]}}},
        "pid": os.getpid(),
        "rt_runtime": Path("/proc/sys/kernel/sched_rt_runtime_us").read_text().strip(),
        "schedstats": Path("/proc/sys/kernel/sched_schedstats").read_text().strip(),
        "cgroup_controllers": (ctx.cgroup_root / "cgroup.controllers").read_text().split(),
        "mounts": sorted({line.split()[2] for line in open("/proc/mounts")}),
    }


def scenario_raises(ctx: Any) -> None:
    raise ValueError("boom from the guest")


def scenario_big(ctx: Any) -> dict[str, Any]:
    blob = os.urandom(ctx.args["mb"] << 19).hex()  # mb MB of hex text
    t = time.monotonic()
    ctx.report({"blob": blob})
    elapsed = time.monotonic() - t
    return {"sha256": hashlib.sha256(blob.encode()).hexdigest(), "len": len(blob),
            "send_s": elapsed}


def scenario_sched(ctx: Any) -> dict[str, Any]:
    seen = []
    end = time.monotonic() + ctx.duration_s
    while time.monotonic() < end:
        seen.append(ctx.sched_state())
        sum(range(20000))
        time.sleep(0.05)
    return {"states": sorted({s.get("state", "") for s in seen}),
            "ops": sorted({s.get("ops", "") for s in seen}), "scheduler": ctx.scheduler}


def scenario_reload(ctx: Any) -> dict[str, Any]:
    """Attach and detach a scheduler many times in one boot; the runtime must keep working."""
    from ktstr.guest.sched import Kmsg, SchedulerProcess
    from ktstr.wire.request import SchedulerSpec

    kmsg = Kmsg()
    cycles = []
    for i in range(ctx.args["cycles"]):
        proc = SchedulerProcess(SchedulerSpec(binary=ctx.args["binary"], ops_name="simple"),
                                kmsg)
        state = proc.attach()
        report = proc.stop()
        ctx.report({"cycle": i, "attached": state["state"]})  # the channel still works
        cycles.append({"attached": state["state"], "ops": state["ops"],
                       "clean": report.clean_unregister, "after": report.state_after})
    return {"cycles": cycles, "final": ctx.sched_state().get("state")}


# --- host side ------------------------------------------------------------------------------


@pytest.mark.smoke
def test_scenario_result_reaches_host_intact(guest: Any) -> None:
    args = {"k": "v", "n": [1, 2, 3]}
    from ktstr.topology import Topology

    run = guest(scenario=f"{MODULE}:scenario_roundtrip", test_file=THIS, args=args,
                    topology=Topology.parse("1n1l2c1t"), memory_mb=1024, timeout=120,
                    sysctls={"kernel.sched_rt_runtime_us": -1})
    assert run.ok, run.summary()
    assert run.result is not None
    assert run.result["args"] == args
    assert run.result["nested"] == {"list": [1, 2.5, None, True, "ü"], "deep": {"x": {"y": [[]]}}}
    assert run.result["cpus"] == [0, 1] and run.result["topology"] == "1n1l2c1t"
    assert run.result["pid"] == 1
    assert run.result["rt_runtime"] == "-1" and run.result["schedstats"] == "1"
    assert {"cpuset", "cpu"} <= set(run.result["cgroup_controllers"])
    for fs in ("proc", "sysfs", "devtmpfs", "cgroup2", "tmpfs", "debugfs", "tracefs", "bpf"):
        assert fs in run.result["mounts"]
    assert [r["phase"] for r in run.reports] == ["start", "end"]
    assert run.vm.exit_code == 0
    print(f"\nboot_ms={run.timings.get('boot_ms'):.0f} "
          f"scenario_start={run.timings['scenario_start']:.3f}s base={run.base.size} bytes")


@pytest.mark.smoke
def test_guest_exception_returns_traceback(guest: Any) -> None:
    run = guest(scenario=f"{MODULE}:scenario_raises", test_file=THIS,
                    memory_mb=1024, timeout=120)
    assert run.failure == "exception"
    assert run.traceback and "scenario_raises" in run.traceback
    assert "ValueError: boom from the guest" in run.traceback
    assert run.exit_code == 1


def test_ten_megabytes_arrive_intact(guest: Any) -> None:
    run = guest(scenario=f"{MODULE}:scenario_big", test_file=THIS, args={"mb": 10},
                    memory_mb=1024, timeout=180)
    assert run.ok, run.summary()
    assert run.result is not None
    blob = run.reports[0]["blob"]
    assert len(blob) == run.result["len"] == 10 << 20
    assert hashlib.sha256(blob.encode()).hexdigest() == run.result["sha256"]
    print(f"\n10 MB in {run.result['send_s']:.3f} s "
          f"({10 / run.result['send_s']:.0f} MB/s guest-side)")


def _shell(kernel: Any, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ktstr", "shell", "--kernel",
                           str(kernel.bzimage), "--memory-mb", "1024", "--sandbox", "never",
                           "--exec", command],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.smoke
def test_shell_exec_prints_and_exits(ktstr_kernel: Any) -> None:
    # One boot checks both: the command's output arrives, and its exit code is ours.
    proc = _shell(ktstr_kernel, "cat /sys/kernel/sched_ext/state; exit 3")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "disabled\n"


@pytest.mark.smoke
def test_scx_simple_attaches_and_unregisters_cleanly(guest: Any, scheduler_binary: Any) -> None:
    from ktstr.wire.request import SchedulerSpec

    binary = scheduler_binary("scx_simple")
    run = guest(scenario=f"{MODULE}:scenario_sched", test_file=THIS,
                    duration_s=1.0, memory_mb=1024, timeout=180,
                    scheduler=SchedulerSpec(str(binary), ops_name="simple"))
    assert run.ok, run.summary()
    assert run.result == {"states": ["enabled"], "ops": ["simple"], "scheduler": "simple"}
    assert run.sched_samples and all(s["state"] == "enabled" for s in run.sched_samples[:-1])
    assert run.sched_exit is not None
    assert run.sched_exit["clean_unregister"], run.sched_exit
    assert run.sched_exit["exit_status"] == 0
    assert run.sched_exit["disabled"][-1]["reason"] == "unregistered from user space"


@pytest.mark.smoke
def test_scx_qmap_error_fails_with_scheduler_text(guest: Any, scheduler_binary: Any) -> None:
    from ktstr.wire.request import SchedulerSpec

    binary = scheduler_binary("scx_qmap")
    run = guest(scenario=f"{MODULE}:scenario_sched", test_file=THIS,
                    duration_s=3.0, memory_mb=1024, timeout=180,
                    scheduler=SchedulerSpec(str(binary), args=["-e", "100"], ops_name="qmap"))
    assert not run.ok
    assert run.failure in ("scheduler_ejected", "scheduler_crashed"), run.summary()
    assert "scx_bpf_error" in run.message, run.message  # the kernel's exit reason
    assert "test triggering error" in run.message, run.message  # scx_bpf_error()'s text


def test_scheduler_loaded_and_unloaded_many_times_leaves_the_runtime_working(
        guest: Any, scheduler_binary: Any) -> None:
    binary = scheduler_binary("scx_simple")
    cycles = 6
    run = guest(scenario=f"{MODULE}:scenario_reload", test_file=THIS, duration_s=1.0,
                memory_mb=1024, timeout=300, args={"binary": str(binary), "cycles": cycles})
    assert run.ok, run.summary()
    assert run.result is not None
    assert [c["attached"] for c in run.result["cycles"]] == ["enabled"] * cycles
    assert all(c["clean"] and c["after"] == "disabled" for c in run.result["cycles"]), run.result
    assert run.result["final"] == "disabled"
    assert [r["cycle"] for r in run.reports] == list(range(cycles))
