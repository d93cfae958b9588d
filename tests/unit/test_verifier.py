"""`ktstr verifier`'s answers and its verifier-log folding, without a VM."""

from __future__ import annotations

from stats_sidecars import BASE

from ktstr.observe.bpf import BpfProgInfo
from ktstr.observe.monitor import Observation, Sample
from ktstr.observe.state import CpuSample
from ktstr.runner import GuestRun
from ktstr.verifier.cli import judge_cell
from ktstr.verifier.log import collapse, looks_like_verifier_log
from ktstr.vmm.vm import VmResult

LOOP_LOG = "\n".join(
    ["libbpf: prog 'qmap_dispatch': BPF program load failed: Permission denied",
     "0: R1=ctx() R10=fp0", "; for (i = 0; i < 5; i++) {"]
    + [line for i in range(50) for line in
       (f"12: (07) r1 += {i}", f"13: (bf) r3 = r1 ; R3={i * 8}", "14: (05) goto pc-3")]
    + ["invalid access to map value, value_size=8 off=8 size=8",
       "processed 1000001 insns (limit 1000000)"])


def vm() -> VmResult:
    return VmResult(exit_code=0, console="", channel2=b"", timed_out=False, panicked=False,
                    boot_ms=1.0, exit_counts=[], duration_s=1.0, reason="poweroff")


def test_a_loop_the_verifier_walked_many_times_is_shown_once() -> None:
    folded = collapse(LOOP_LOG)
    assert folded.count("goto pc-3") == 1
    assert "repeat 49 more time(s)" in folded
    assert folded.splitlines()[-1].startswith("processed 1000001 insns")
    assert looks_like_verifier_log(LOOP_LOG) and not looks_like_verifier_log("attached fine")


def test_three_separate_answers() -> None:
    obs = Observation()
    ext = CpuSample(cpu=0, nr_running=1, scx_nr_running=1, clock_ns=1, local_dsq_nr=0,
                    curr_pid=42, curr_comm="w", curr_class="ext")
    obs.samples.append(Sample(t=1.0, cpus=(ext,), scx_enabled=True))
    obs.progs = (BpfProgInfo(1, "qmap_enqueue", "BPF_PROG_TYPE_STRUCT_OPS", 321, 2568, 1400,
                             0, 0),)
    result = {"workers": [{"cgroup": "probe", "work_units": 10}, {"cgroup": "probe",
                                                                  "work_units": 7}]}
    good = GuestRun(vm(), BASE, result=result, observation=obs,
                    messages=[{"type": "sched_attached"}])
    cell = judge_cell("scx_qmap", "1n1l2c1t", good)
    assert (cell.verifies, cell.attaches, cell.dispatches, cell.ok) == (True, True, True, True)
    assert cell.programs == {"qmap_enqueue": 321}
    # Attached, but nothing ever ran under the ext class: the third answer alone is no.
    idle = Observation()
    idle.samples.append(Sample(t=1.0, cpus=(CpuSample(0, 0, 0, 1, 0, 0, "swapper/0", "idle"),),
                               scx_enabled=True))
    quiet = GuestRun(vm(), BASE, result=result, observation=idle,
                     messages=[{"type": "sched_attached"}])
    assert judge_cell("s", "t", quiet).dispatches is False
    # Rejected by the verifier: the log comes back folded.
    bad = GuestRun(vm(), BASE, failure="scheduler_crashed", message="exited with status 1",
                   details={"log_tail": LOOP_LOG})
    cell = judge_cell("s", "t", bad)
    assert (cell.verifies, cell.attaches, cell.dispatches) == (False, False, False)
    assert "repeat 49 more" in cell.log and cell.failure.startswith("scheduler_crashed")
    # Failed for another reason: the log does not say whether it verified.
    other = GuestRun(vm(), BASE, failure="scheduler_missing", message="no binary")
    assert judge_cell("s", "t", other).verifies is None
