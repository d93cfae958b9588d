"""The KVM plumbing under every guest: :class:`Machine` and how its run ended (:class:`RunOutcome`).

Shared by everything that runs guest code (the Linux boot in :mod:`ktstr.vmm.vm`, the
throughput probe, tiny test guests): the fds, RAM, buses, vCPU threads, the hard
timeout and a teardown that always releases every fd, mapping and thread.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ktstr.vmm import kvm, layout
from ktstr.vmm.bus import AttachContext, DeviceErrors, MmioBus, PioBus, VmDevice
from ktstr.vmm.irq import IrqLine
from ktstr.vmm.memory import GuestMemory
from ktstr.vmm.performance import Performance, PerformanceApplied
from ktstr.vmm.stats import VcpuStats
from ktstr.vmm.vcpu import (
    REASON_SIGNAL,
    CoalescedRing,
    RunControl,
    StopReason,
    Vcpu,
    VcpuRegs,
)
from ktstr.vmm.watchdog import POLL_S, ProgressWatch

STOP_GRACE_S = 1.5
"""How long teardown waits for vCPU threads after kicking them (the hard bound is +2 s)."""
PAUSE_TIMEOUT_S = 2.0


class RunObserver(Protocol):
    """Looks at a running guest from the host (``ktstr.observe``); never raises into a run.

    ``started`` comes once the vCPU threads run; ``stopped`` once they have all stopped
    (the guest is frozen) and before teardown. If ``stopped`` returns True the observer
    keeps guest RAM open past teardown and closes it itself (``GuestMemory.close``)."""

    def started(self, machine: Machine) -> None: ...
    def stopped(self, machine: Machine) -> bool: ...


@dataclass
class RunOutcome:
    """How :meth:`Machine.run` ended."""

    reason: str
    detail: str
    error: str | None
    timed_out: bool
    duration_s: float
    exit_counts: list[dict[str, int]]
    site_counts: list[dict[int, int]] = field(default_factory=list)
    """Per vCPU, exits by site key (see :func:`ktstr.vmm.vcpu.site_name`)."""
    queued_sites: dict[int, int] = field(default_factory=dict)
    """Writes KVM queued in the coalesced ring instead of exiting, by site."""
    vcpu_states: list[str] = field(default_factory=list)
    """For a hung or timed-out run (or stuck threads): one line per vCPU (see
    :meth:`ktstr.vmm.vcpu.Vcpu.state`)."""
    device_errors: dict[str, int] = field(default_factory=dict)
    """Guest accesses dropped because the device raised, by device and address."""
    device_error_messages: list[str] = field(default_factory=list)
    """The first few of those errors' messages."""
    vcpu_dilation: list[float | None] = field(default_factory=list)
    """Per vCPU, the share of the run its thread waited runnable on the host."""
    performance: PerformanceApplied | None = None
    """What performance mode got from the host (None: not asked for)."""


class Machine:
    """A KVM VM fd with RAM, buses and vCPUs; runs them under a hard timeout.

    With ``irqchip`` the VM gets the in-kernel PIC/IOAPIC/LAPIC and a PIT (HLT is
    then handled inside KVM); without it, HLT exits to userspace, which tiny
    test guests use to finish.
    """

    def __init__(self, regions: list[tuple[int, int]], *, irqchip: bool = True,
                 performance: Performance | None = None) -> None:
        self._closed = False
        self.performance = performance
        self.applied = PerformanceApplied() if performance is not None else None
        """What performance mode got (None: not asked for)."""
        self.kvm: kvm.Kvm | None = None
        self.vm: kvm.VmFd | None = None
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self.irq_lines: dict[int, IrqLine] = {}
        self.devices: list[VmDevice] = []
        self.device_errors = DeviceErrors()
        self.pio = PioBus(self.device_errors)
        self.mmio = MmioBus(self.device_errors)
        self.control = RunControl()
        self.keep_memory = False
        """Guest RAM outlives teardown (an observer holds it: :class:`RunObserver`)."""
        self.observer_error: str | None = None
        self.final_regs: list[VcpuRegs] = []
        """Every stopped vCPU's registers when the run ended hung or timed out."""
        self.irqchip = irqchip
        self.ring = CoalescedRing(self.pio, self.mmio)
        try:
            self.kvm = kvm.Kvm()
            self.mmap_size = self.kvm.vcpu_mmap_size()
            self.vm = self.kvm.create_vm()
            if irqchip:
                self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
                self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
                self.vm.create_irqchip()
                self.vm.create_pit2()
            if performance is not None and performance.disable_exits:
                self._disable_exits()
            self.memory = GuestMemory(regions, hugepages=bool(performance and
                                                              performance.hugepages))
            if self.applied is not None and self.memory.backing == "4k":
                self.applied.lack(f"2 MB pages: {self.memory.backing_note.lstrip('; ')}")
            self.memory.register(self.vm)
        except BaseException:
            self.close()
            raise

    def _disable_exits(self) -> None:
        """HLT and PAUSE run in the guest (its vCPUs own their host CPUs); before any vCPU."""
        assert self.kvm is not None and self.vm is not None and self.applied is not None
        want = {"hlt": kvm.KVM_X86_DISABLE_EXITS_HLT, "pause": kvm.KVM_X86_DISABLE_EXITS_PAUSE}
        supported = self.kvm.check_extension(kvm.KVM_CAP_X86_DISABLE_EXITS)
        given = {name: bit for name, bit in want.items() if supported & bit}
        for name in want.keys() - given.keys():
            self.applied.lack(f"{name} exits: this KVM cannot disable them "
                              f"(KVM_CAP_X86_DISABLE_EXITS = {supported:#x})")
        if not given:
            return
        try:
            self.vm.enable_cap(kvm.KVM_CAP_X86_DISABLE_EXITS, sum(given.values()))
        except kvm.KvmIoctlError as err:
            self.applied.lack(f"hlt/pause exits: {err}")
            return
        self.applied.disabled_exits = sorted(given)

    # --- assembly ---

    def irq(self, gsi: int) -> IrqLine:
        assert self.vm is not None
        line = self.irq_lines.get(gsi)
        if line is None:
            line = self.irq_lines[gsi] = IrqLine(self.vm, gsi)
        return line

    def add_vcpu(self, vcpu_id: int) -> Vcpu:
        assert self.vm is not None
        fd = self.vm.create_vcpu(vcpu_id)
        try:
            vcpu = Vcpu(
                len(self.vcpus),
                vcpu_id,
                fd,
                self.mmap_size,
                self.pio,
                self.mmio,
                self.control,
                on_halt=self._on_halt,
                ring=self.ring,
            )
        except BaseException:
            fd.close()
            raise
        perf = self.performance
        if perf is not None:
            vcpu.pin_cpu = perf.cpus[vcpu.index] if vcpu.index < len(perf.cpus) else None
            vcpu.fifo = perf.fifo
        self.vcpus.append(vcpu)
        return vcpu

    def performance_record(self) -> PerformanceApplied | None:
        """What performance mode got, with each vCPU thread's pinning and policy (after a
        run: the threads apply them as they start)."""
        applied = self.applied
        if applied is None:
            return None
        applied.pinned = [v.pinned for v in self.vcpus]
        applied.fifo = [v.fifo_on for v in self.vcpus]
        for v in self.vcpus:
            for line in v.tuning_errors:
                applied.lack(line)
        if self.memory is not None:
            applied.memory = self.memory.backing
            applied.huge_kb = self.memory.huge_kb()
        return applied

    def attach(self, device: VmDevice, ctx: AttachContext) -> None:
        self.devices.append(device)
        device.attach(ctx)

    def context(self, **kwargs: object) -> AttachContext:
        assert self.memory is not None
        return AttachContext(
            self.memory,
            self.pio,
            self.mmio,
            coalesce_pio=self.coalesce_pio,
            **kwargs,  # type: ignore[arg-type]
        )

    def coalesce_pio(self, port: int, length: int) -> bool:
        """Queue guest writes to ``port..port+length`` in KVM's coalesced ring (see
        :meth:`AttachContext.coalesce_pio_writes`); before the vCPUs exist only."""
        assert self.kvm is not None and self.vm is not None
        if self.vcpus:
            return False  # vCPU loops decide at start whether to look at the ring
        if self.mmap_size < (kvm.KVM_COALESCED_MMIO_PAGE_OFFSET + 1) * mmap.PAGESIZE:
            return False
        if not self.kvm.check_extension(kvm.KVM_CAP_COALESCED_PIO):
            return False
        self.vm.register_coalesced(port, length, pio=True)
        self.ring.active = True
        return True

    def prefault(self) -> float | None:
        """Map all guest RAM in KVM's stage-2 tables (NPT/EPT) now, through the first vCPU;
        seconds taken, or None where KVM cannot (no KVM_CAP_PRE_FAULT_MEMORY, no TDP).

        The guest then never takes a nested page fault while the CPU delivers an interrupt
        or exception (on a fresh per-CPU stack, say): the emulated hosts our sandbox runs
        on get that case wrong now and then (a triple fault, or a host CPU that stops
        taking interrupts). Costs host memory for all of guest RAM up front."""
        assert self.kvm is not None and self.memory is not None
        if not self.vcpus or not self.kvm.check_extension(kvm.KVM_CAP_PRE_FAULT_MEMORY):
            return None
        start = time.monotonic()
        try:
            for region in self.memory.regions:
                self.vcpus[0].fd.pre_fault_memory(region.gpa, region.size)
        except kvm.KvmIoctlError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
                return None
            raise
        return time.monotonic() - start

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> bool:
        """Hold every vCPU out of the guest (from any thread but a vCPU's); True once all
        are parked. The guest's clocks go on (kvmclock, TSC): it sees a long stall."""
        if not self.vcpus or self.control.stopping:
            return False
        self.control.request_pause()
        self.kick_all()
        if self.control.wait_parked(len(self.vcpus), timeout):
            return True
        self.resume()
        return False

    def resume(self) -> None:
        self.control.resume()

    def _on_halt(self, vcpu: Vcpu) -> None:
        if all(v.halted for v in self.vcpus):
            self.control.stop(StopReason.HALTED, "all vCPUs halted")

    # --- running ---

    def stop(self, reason: str = StopReason.STOPPED, detail: str = "") -> None:
        """End the run from any thread (device callbacks, another thread)."""
        if self.control.stop(reason, detail):
            self.kick_all()

    def kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.kick()

    def run(self, timeout: float, *, stall_s: float = 0.0,
            progress: Callable[[], int] | None = None,
            observer: RunObserver | None = None) -> RunOutcome:
        """Start every vCPU, wait for the end or ``timeout`` seconds, stop and join all.

        With ``stall_s`` > 0 the run also ends, as ``hung``, once no vCPU has shown any
        progress (:mod:`ktstr.vmm.watchdog`; ``progress`` adds a counter of its own, e.g.
        console bytes) for that long. A hung or timed-out run records every vCPU's state.
        Returns within ``timeout`` + ~2 s whatever the guest does, even with a vCPU
        thread stuck inside KVM_RUN. Ctrl-C stops the VM, tears it down and re-raises
        KeyboardInterrupt.
        """
        start = time.monotonic()
        interrupted = False
        timed_out = False
        stats = [VcpuStats.open(v.fd) for v in self.vcpus] if stall_s > 0 else []
        watch = ProgressWatch(stats, stall_s, extra=lambda: self._exits_seen(progress))
        try:
            for vcpu in self.vcpus:
                vcpu.start()
            if observer is not None:
                self._observe(observer.started)
            deadline = start + timeout
            while not self.control.done.wait(max(0.0, min(POLL_S, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    timed_out = self.control.stop(StopReason.TIMEOUT,
                                                  f"timeout after {timeout:g} s")
                    break
                if watch.hung():
                    self.control.stop(
                        StopReason.HUNG,
                        f"no guest progress for {stall_s:g} s (no port/MMIO access, "
                        "interrupt, wake-up or console output on any vCPU)\n"
                        + "\n".join(watch.describe()))
                    break
        except KeyboardInterrupt:
            interrupted = True
            self.control.stop(StopReason.STOPPED, "interrupted")
        finally:
            self.control.done.set()
            deadline = time.monotonic() + STOP_GRACE_S
            stuck = [v.index for v in self.vcpus if not v.join(deadline)]
        drain_error = None
        if self.vcpus and not stuck:
            # Writes queued after the last exit (e.g. console bytes before a poweroff).
            try:
                self.vcpus[0].drain_coalesced()
            except Exception as exc:  # a device failing here must not lose the outcome
                drain_error = f"coalesced writes: {type(exc).__name__}: {exc}"
        duration = time.monotonic() - start
        if self.control.reason in (StopReason.HUNG, StopReason.TIMEOUT):
            # Where each stuck vCPU was: the observer unwinds the kernel stacks from these.
            self.final_regs = [r for v in self.vcpus if (r := v.frozen_regs()) is not None]
        if observer is not None:
            kept = bool(self._observe(observer.stopped))
            self.keep_memory = kept and not interrupted
        if interrupted:
            self.close()
            raise KeyboardInterrupt
        error = self.control.error
        if drain_error:
            error = (error + "\n" if error else "") + drain_error
        if stuck:
            error = (error + "\n" if error else "") + f"vCPU threads {stuck} did not stop"
        states: list[str] = []
        if self.control.reason in (StopReason.HUNG, StopReason.TIMEOUT) or stuck:
            states = [v.state() for v in self.vcpus]
        for st in stats:
            if st is not None:
                st.close()
        return RunOutcome(
            vcpu_states=states,
            reason=self.control.reason or StopReason.STOPPED,
            detail=self.control.detail,
            error=error,
            timed_out=timed_out,
            duration_s=duration,
            exit_counts=[dict(v.exit_counts) for v in self.vcpus],
            site_counts=[dict(v.site_counts) for v in self.vcpus],
            queued_sites=dict(self.ring.sites),
            device_errors=self.device_errors.counts,
            device_error_messages=list(self.device_errors.messages),
            vcpu_dilation=[v.dilation for v in self.vcpus],
            performance=self.performance_record(),
        )

    def _observe(self, call: Callable[[Machine], bool | None]) -> bool | None:
        try:
            return call(self)
        except Exception as exc:  # an observer's bug never ends or loses the run
            self.observer_error = f"{type(exc).__name__}: {exc}"
            return None

    def _exits_seen(self, progress: Callable[[], int] | None) -> int:
        """Userspace exits of every vCPU (not signals) plus ``progress``; for the watchdog.

        KVM's own ``io_exits`` stat does not count every exit that reaches us on every KVM
        (the paravirtual one), so the vCPU loops' counts are part of the signature.
        """
        total = progress() if progress is not None else 0
        for v in self.vcpus:
            try:
                total += sum(n for r, n in list(v.reason_counts.items()) if r != REASON_SIGNAL)
            except RuntimeError:  # resized by its vCPU thread mid-read: that is progress
                return -1
        return total

    # --- teardown ---

    def close(self) -> None:
        """Release devices, vCPUs, irq lines, RAM and fds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.control.stop(StopReason.STOPPED, "closed")
        self.control.done.set()
        deadline = time.monotonic() + STOP_GRACE_S
        for vcpu in self.vcpus:
            vcpu.join(deadline)
        for device in self.devices:
            with contextlib.suppress(Exception):
                device.close()
        for line in self.irq_lines.values():
            line.close()
        for vcpu in self.vcpus:
            vcpu.close()
        if self.memory is not None and not self.keep_memory:
            self.memory.close()
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fd_count() -> int:
    """Open fds of this process (tests check teardown with it)."""
    return len(os.listdir("/proc/self/fd"))


def vcpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ktstr-vcpu")]
