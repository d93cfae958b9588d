"""Faults of the emulated host, told apart from failures of the guest under test.

In the sandbox the host running KVM is itself emulated (QEMU TCG with nested SVM), and
that emulation loses a guest now and then whatever the VMM: in one alternating run of
16-vCPU boots in the same sandbox QEMU's own microvm rebooted 3 times of 6 where ours
completed 6 of 6 (``benchmarks/boot_stress.py --vmm both``). What it does to a guest is
narrow: a vCPU triple-faults (KVM reports a shutdown), every vCPU stops at once (no
exit, interrupt or console byte for the stall window), or a vCPU is not run for so long
that the guest's soft-lockup watchdog blames the idle task (``clock_jump``). None of these
is something a scheduler or a test can cause without taking the kernel down visibly first
(a panic, an oops, a soft lockup of a task that is not idle), so in the sandbox such a
run is retried, up to four times, each in a fresh VM, and every lost run is recorded in
the sidecar and shown in the report, never passed over silently. (Losses come in bursts:
one sandbox lost a 4-vCPU boot twice in a row at the same boot stage, and a 16-vCPU QEMU
microvm boot beside ours, and then itself; a slower CI machine lost three runs of one
4-vCPU test in a row, and its repro run too.) On a real KVM host the same outcome is a
failure like any other.

A bare boot (no guest runtime) that times out with the kernel's boot log stopping before
it starts init, and no crash line, is lost the same way (``lost_boot``; a guest run lost
before its scenario is already inconclusive and rerun). And a run that hung or timed out
with a vCPU found spinning in kernel mode in the int3 padding between the kernel's text
sections (inside ``_stext``..``_etext``, where no function is), and no crash line, is a
``stuck_vcpu``: guest code that jumps there executes an ``int3`` at once and the kernel's
#BP handler prints an oops; a vCPU that stays there silently, inside KVM_RUN with no
exit, is an instruction fetch the emulated host never completes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ktstr.sandbox.detect import in_sandbox

if TYPE_CHECKING:
    from ktstr.vmm.vm import VmResult

T = TypeVar("T")

F_TRIPLE_FAULT = "triple_fault"
F_HUNG = "hung"
F_STUCK_VCPU = "stuck_vcpu"
F_LOST_BOOT = "lost_boot"
F_CLOCK_JUMP = "clock_jump"
HOST_FAULT_KINDS = frozenset({F_TRIPLE_FAULT, F_HUNG, F_LOST_BOOT})
STUCK_VCPU_KINDS = frozenset({F_HUNG, "timeout"})
"""Failure kinds a vCPU stuck outside kernel code (:data:`F_STUCK_VCPU`) explains."""
SANDBOX_RETRIES = 4
"""Fresh-VM reruns of a test whose run ended in a host fault, in the sandbox (per repeat).
Cheap next to a lost CI run: a 4-vCPU smoke test costs about 2 minutes a run there."""
RCU_STALL_MARKERS = ("rcu_sched detected stalls", "rcu: INFO:")
GUEST_CRASH_MARKERS = ("Kernel panic", "Oops:", "BUG: ", "general protection fault",
                       "soft lockup", "hard LOCKUP", *RCU_STALL_MARKERS)
"""Console lines that put a failure on the guest: a host fault is only a run without them
(nor a scheduler ejection the attach policy did not retry)."""


@dataclass(frozen=True)
class HostFault:
    """One run lost to the emulated host: its failure kind and first line of detail."""

    kind: str
    detail: str

    def line(self) -> str:
        return f"{self.kind}: {self.detail}"


def guest_crashed(console: str, retried_ejections: int = 0) -> bool:
    """Whether the guest's kernel said what went wrong: a crash line, or an ejection of
    the scheduler beyond the ``retried_ejections`` its attach policy retried."""
    from ktstr.console import first_ejection

    return (any(marker in console for marker in GUEST_CRASH_MARKERS)
            or first_ejection(console, skip=retried_ejections) is not None)


IDLE_SOFT_LOCKUP = re.compile(
    r"^.*BUG: soft lockup - CPU#\d+ stuck for \d+s! \[swapper/\d+:0\].*$", re.MULTILINE)
"""The soft lockup watchdog naming a CPU's idle task. An idle CPU runs its stopper (stop
class, above every scheduler, sched_ext included) as soon as it is woken, so the watchdog
finds it stale only when the guest's clock leapt past the threshold at once: the emulated
host did not run the vCPU for that long. Seen in the sandbox, in ``tick_nohz_idle_*``
under scx_simple, once in 12 runs of ``test_steady``."""


RCU_STALL = re.compile(
    "^.*(?:" + "|".join(map(re.escape, RCU_STALL_MARKERS)) + ").*$", re.MULTILINE)
"""RCU's stall report: a vCPU the emulated host stopped leaves one before the run's triple
fault (seen in the sandbox: CPU 2's rq clock stood still for 26 samples while its vCPU
thread ran, then vCPU 3 triple-faulted, and the rerun passed), so there it does not put
the failure on the guest; a panic, oops or BUG line still does, and so does a stall
before a hang (a guest can stall every CPU itself)."""


def clock_jump(console: str, retried_ejections: int = 0) -> HostFault | None:
    """:data:`F_CLOCK_JUMP` when the console's only crash lines are soft lockups of idle
    tasks (:data:`IDLE_SOFT_LOCKUP`); any other crash line keeps the failure on the guest."""
    found = IDLE_SOFT_LOCKUP.search(console)
    if found is None or guest_crashed(IDLE_SOFT_LOCKUP.sub("", console), retried_ejections):
        return None
    return HostFault(F_CLOCK_JUMP, found.group(0).strip()[:300])


def host_fault(failure_kind: str | None, message: str, console: str, *,
               retried_ejections: int = 0,
               vcpu_stacks: Mapping[int, Sequence[str]] | None = None) -> HostFault | None:
    """The host fault this failed run shows, or None when the guest may be at fault.
    ``vcpu_stacks`` (``Observation.vcpu_stacks``: innermost frame first) can show a
    vCPU stuck outside kernel code (:data:`F_STUCK_VCPU`)."""
    if failure_kind == F_TRIPLE_FAULT:
        console = RCU_STALL.sub("", console)
    if guest_crashed(console, retried_ejections):
        return clock_jump(console, retried_ejections)
    if failure_kind in HOST_FAULT_KINDS:
        first = message.strip().splitlines()[0] if message.strip() else failure_kind
        return HostFault(failure_kind, first[:300])
    if failure_kind in STUCK_VCPU_KINDS and vcpu_stacks:
        from ktstr.observe.state import TEXT_PADDING

        for index, stack in sorted(vcpu_stacks.items()):
            if stack and stack[0].endswith(TEXT_PADDING):
                return HostFault(F_STUCK_VCPU, f"{failure_kind}: vcpu {index} spun in kernel "
                                 f"mode at {stack[0]}, with no oops")
    return None


F_INCONCLUSIVE = "inconclusive"


def inconclusive_fault(status: str, reason: str) -> HostFault | None:
    """A run with no signal (verdict ``inconclusive``: the guest was lost before its
    scenario, or nothing progressed) is lost whatever its console says: it tells nothing
    about the scheduler, so in the sandbox it is rerun like a host fault (recorded, up to
    ``SANDBOX_RETRIES`` times); the last inconclusive run stands as the verdict."""
    if status != F_INCONCLUSIVE:
        return None
    return HostFault(F_INCONCLUSIVE, reason.strip().splitlines()[0][:300] if reason else "")


def should_retry(fault: HostFault | None, done: int, *, emulated: bool | None = None) -> bool:
    """Whether to rerun after ``fault`` when ``done`` host-fault reruns were made already."""
    if fault is None:
        return False
    if emulated is None:
        emulated = in_sandbox()
    return emulated and done < SANDBOX_RETRIES


BOOT_BANNER = "Linux version "
INIT_STARTED = " as init process"
"""The kernel's ``Run /init as init process``: its own boot is over."""


def vm_fault(result: VmResult) -> HostFault | None:
    """:func:`host_fault` of a bare VM run (no guest runtime, e.g. ``ktstr boot``).

    A timed-out run whose verbose console shows the kernel booting but never starting init
    is a lost boot (:data:`F_LOST_BOOT`): a guest run that ends so is inconclusive
    (``testing.run.no_signal``), a bare boot has no such verdict to carry it."""
    from ktstr.vmm.vcpu import TRIPLE_FAULT, StopReason

    detail = result.detail or result.error or ""
    if result.reason == StopReason.REBOOT and TRIPLE_FAULT in result.detail:
        kind: str | None = F_TRIPLE_FAULT
    elif result.reason == StopReason.HUNG:
        kind = F_HUNG
    elif (result.reason == StopReason.TIMEOUT and BOOT_BANNER in result.console
          and INIT_STARTED not in result.console):
        kind = F_LOST_BOOT
        last = result.console.rstrip().splitlines()[-1].strip()
        detail = f"{detail}: the kernel's boot stopped after {last!r}"
    else:
        kind = None
    return host_fault(kind, detail, result.console)


def rerun_lost(run: Callable[[], T], fault_of: Callable[[T], HostFault | None],
               lost: list[HostFault]) -> T:
    """``run()``, and again while :func:`should_retry` says so; the faults of the runs
    thrown away are appended to ``lost``, whose length is the rerun budget spent."""
    while True:
        result = run()
        fault = fault_of(result)
        if not should_retry(fault, len(lost)):
            return result
        assert fault is not None
        lost.append(fault)


def run_vm(boot: Callable[[], VmResult]) -> tuple[VmResult, list[HostFault]]:
    """:func:`rerun_lost` for a bare VM run: the last result and the lost runs' faults."""
    lost: list[HostFault] = []
    return rerun_lost(boot, vm_fault, lost), lost
