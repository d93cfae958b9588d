"""The failure dump and the failure message's lines from what the observer saw."""

from __future__ import annotations

import json
from pathlib import Path

from ktstr.observe import state
from ktstr.observe.dump import findings, write_dump
from ktstr.observe.monitor import Observation, ObserverCost, Sample, StallCandidate


def _observation() -> Observation:
    obs = Observation()
    cpu = state.CpuSample(cpu=1, nr_running=3, scx_nr_running=3, clock_ns=5, local_dsq_nr=0,
                          curr_pid=7, curr_comm="worker", curr_class="ext")
    obs.samples.append(Sample(t=0.1, cpus=(cpu,), scx_enabled=True))
    obs.stalls[42] = StallCandidate(pid=42, comm="victim", cpu=1, dsq=None,
                                    ops_state="SCX_OPSS_QUEUED", runnable_age_ms=2500.0,
                                    watchdog_timeout_ms=2000.0, t=3.0)
    ext = state.ExitInfo(kind="SCX_EXIT_ERROR_STALL", exit_code=0, reason="runnable task stall",
                         message="victim[42] failed to run for 2.500s",
                         backtrace=("scx_watchdog_workfn+0x109", "worker_thread+0x13a"))
    scx = state.SchedExt(enable_state="SCX_OPS_ENABLED", ops_name="qmap",
                         exit_kind="SCX_EXIT_ERROR_STALL", bypass_depth=0, switching_all=True,
                         watchdog_timeout_ms=2000.0, nr_rejected=0, exit=ext)
    obs.exit_snapshot = state.Snapshot(jiffies=1, hz=250, cpus=(cpu,), sched_ext=scx)
    return obs


def test_findings_name_the_task_its_cpu_and_the_exit_from_guest_memory() -> None:
    lines = findings(_observation())
    assert lines[0].startswith("from guest memory: victim[42] runnable on CPU 1 for 2500 ms")
    assert "watchdog timeout 2000 ms" in lines[0] and "SCX_OPSS_QUEUED" in lines[0]
    assert "SCX_EXIT_ERROR_STALL (runnable task stall): victim[42] failed" in lines[1]
    assert "backtrace scx_watchdog_workfn+0x109 <- worker_thread+0x13a" in lines[1]
    assert findings(Observation()) == []


def test_dump_without_guest_ram_writes_the_state_only(tmp_path: Path) -> None:
    obs = _observation()
    paths = write_dump(obs, tmp_path / "d")
    assert set(paths) == {"state"}
    data = json.loads(Path(paths["state"]).read_text())
    assert data["exit_snapshot"]["sched_ext"]["exit"]["message"].startswith("victim[42]")
    assert data["stalls"][0]["pid"] == 42 and data["last_samples"][0]["cpus"][0]["cpu"] == 1
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["state.json"]  # no temp left


def test_sidecar_record_is_compact_columns() -> None:
    rec = _observation().to_record()
    assert rec["samples"] == {"t": [0.1], "cpus": {"1": {"nr_running": [3],
                                                         "scx_nr_running": [3],
                                                         "local_dsq_nr": [0]}}}
    assert rec["stalls"][0]["comm"] == "victim"
    json.dumps(rec)


def test_stats_show_and_the_report_draw_the_monitor_samples(tmp_path: Path) -> None:
    from ktstr.results.cli import monitor_line
    from ktstr.results.report import _monitor_series

    rec = _observation().to_record()
    line = monitor_line(rec)
    assert line.startswith("monitor: 1 samples over 1 CPUs, peak nr_running 3")
    assert "longest runnable wait victim[42] 2500 ms on CPU 1" in line
    assert "observer CPU" not in line  # no thread times: nothing claimed
    obs = _observation()
    obs.cost = ObserverCost(life_s=10.0, cpu_s=0.05, busy_s=0.2, vcpu_cpu_s=19.0)
    cost = obs.to_record()["cost"]
    assert cost["cpu_pct_of_vcpus"] == 0.263 and cost["busy_pct"] == 2.0
    assert "observer CPU 0.26% of the vCPUs'" in monitor_line(obs.to_record())
    assert monitor_line({"problems": ["drgn is not importable"]}) == (
        "monitor: no samples (drgn is not importable)")
    assert monitor_line(None) == "" and monitor_line({"samples": "junk"}) == ""
    times, cpus = _monitor_series({"observer": rec}) or ([], {})
    assert times == [0.1] and cpus["1"]["nr_running"] == [3.0]
    assert _monitor_series({"observer": {"samples": {"t": [], "cpus": {}}}}) is None


def test_a_stuck_vcpus_kernel_stack_is_a_finding_and_in_the_dump(tmp_path: Path) -> None:
    from ktstr.vmm.vcpu import VcpuRegs

    obs = Observation()
    gprs = {"rip": 0xFFFFFFFF8153D6B5, "rsp": 0xFFA0000000093EE8, "rflags": 0x246}
    obs.vcpu_regs = [VcpuRegs(0, gprs, cs=0x10), VcpuRegs(1, {"rip": 0x7F00, "rsp": 1}, 0x33)]
    obs.vcpu_stacks = {0: ("pv_native_safe_halt+0x17", "default_idle+0x9", "do_idle+0xba"),
                       1: ()}
    assert obs.vcpu_regs[0].kernel and not obs.vcpu_regs[1].kernel
    assert findings(obs) == ["from guest memory: vcpu 0 was in the kernel at "
                             "pv_native_safe_halt+0x17 <- default_idle+0x9 <- do_idle+0xba"]
    data = json.loads(Path(write_dump(obs, tmp_path)["state"]).read_text())
    assert data["vcpus"][0] == {"vcpu": 0, "kernel": True, "regs": gprs, "cs": 0x10,
                                "stack": list(obs.vcpu_stacks[0])}
    assert data["vcpus"][1]["kernel"] is False and data["vcpus"][1]["stack"] == []
