"""Assemble a VM, run it to its end, tear it down: :class:`Machine` and :class:`Vm`.

:class:`Machine` is the KVM plumbing shared by everything that runs guest code
(the kernel boot, the throughput probe, tiny test guests): the fds, RAM, buses,
vCPU threads, the hard timeout and a teardown that always releases every fd,
mapping and thread. :class:`Vm` boots a Linux bzImage on top of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ktstr.errors import KtstrError
from ktstr.topology import Topology
from ktstr.vmm import kvm, layout
from ktstr.vmm.bus import AttachContext, DeviceErrors, MmioBus, MmioSlot, PioBus, VmDevice
from ktstr.vmm.irq import IrqLine
from ktstr.vmm.memory import GuestMemory
from ktstr.vmm.stats import VcpuStats
from ktstr.vmm.vcpu import (
    REASON_SIGNAL,
    CoalescedRing,
    RunControl,
    StopReason,
    Vcpu,
    site_summary,
)
from ktstr.vmm.watchdog import POLL_S, ProgressWatch

STOP_GRACE_S = 1.5
"""How long teardown waits for vCPU threads after kicking them (the hard bound is +2 s)."""


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


class Machine:
    """A KVM VM fd with RAM, buses and vCPUs; runs them under a hard timeout.

    With ``irqchip`` the VM gets the in-kernel PIC/IOAPIC/LAPIC and a PIT (HLT is
    then handled inside KVM); without it, HLT exits to userspace, which tiny
    test guests use to finish.
    """

    def __init__(self, regions: list[tuple[int, int]], *, irqchip: bool = True) -> None:
        self._closed = False
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
            self.memory = GuestMemory(regions)
            self.memory.register(self.vm)
        except BaseException:
            self.close()
            raise

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
        self.vcpus.append(vcpu)
        return vcpu

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
            progress: Callable[[], int] | None = None) -> RunOutcome:
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
        )

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
        if self.memory is not None:
            self.memory.close()
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- Linux boot ----------------------------------------------------------------------------

DEFAULT_CMDLINE = (
    "console=ttyS0 earlyprintk=serial nokaslr mitigations=off panic=-1 "
    "sysctl.kernel.sched_schedstats=1 rdinit=/init"
)
EXIT_FRUGAL_CMDLINE = (
    # Each port access is a VM exit; these keep the boot from probing hardware it lacks.
    # No i8042 options: the FADT has no 8042 flag and PnP finds none, so the driver does
    # not probe at all (`i8042.nopnp` would make it poll the controller: ~10000 exits).
    "8250.nr_uarts=2 reboot=k tsc=reliable no_timer_check pci=off io_delay=none"
)
QUIET_CMDLINE = "quiet loglevel=5"
"""``quiet`` boots: no info/notice chatter (each console byte is a port exit), but warnings
and worse still reach the console (``WARNING: CPU:``, BUG, Oops, panics, sched_ext errors)."""
PANIC_RE = re.compile(r"Kernel panic - not syncing[^\n]*")
CONSOLE_TAIL_BYTES = 4000
DEFAULT_STALL_S = 30.0
"""A Linux guest delivers timer interrupts many times a second, whatever its tasks do: this
long without any progress at all (:mod:`ktstr.vmm.watchdog`) means it is hung."""

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_ENABLE_WB = (1 << 11) | 6

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4


@dataclass
class VmResult:
    """How a VM run ended and what the guest said.

    ``exit_code`` is the guest's exit-port status on a clean poweroff (0 if it
    wrote none); ``None`` for any other end. ``reason`` is one of ``poweroff``,
    ``reboot``, ``crash``, ``timeout``, ``error``, ``stopped``.
    """

    exit_code: int | None
    console: str
    channel2: bytes
    timed_out: bool
    panicked: bool
    boot_ms: float | None
    exit_counts: list[dict[str, int]]
    duration_s: float
    error: str | None = None
    reason: str = ""
    detail: str = ""
    panic_message: str = ""
    cmdline: str = ""
    exit_sites: dict[str, int] = field(default_factory=dict)
    """IO/MMIO exits by site over all vCPUs, most frequent first: ``{"in 0x3fd": n, ...}``;
    ``"queued out 0x3f8"`` counts port writes KVM queued instead of exiting (not exits);
    at most ``vcpu.MAX_EXIT_SITES`` sites, the rest summed as ``"other"``."""
    vcpu_states: list[str] = field(default_factory=list)
    """A hung or timed-out run: one line per vCPU (registers, interrupt flag, MP state,
    pending LAPIC vectors, last exit sites)."""
    device_errors: dict[str, int] = field(default_factory=dict)
    """Guest accesses a device failed on (read as all ones / dropped), by
    ``"<device> <bus> <address>"``; bounded, the rest summed as ``"other"``. The VM went
    on, but the guest's I/O there did not happen: see :attr:`device_error_messages`."""
    device_error_messages: list[str] = field(default_factory=list)
    """The first few device errors, each ``"<key>: <access>: <exception>"``."""

    @property
    def console_tail(self) -> str:
        return self.console[-CONSOLE_TAIL_BYTES:]

    @property
    def total_exits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for counts in self.exit_counts:
            for name, n in counts.items():
                out[name] = out.get(name, 0) + n
        return out

    @property
    def ok(self) -> bool:
        return self.reason == StopReason.POWEROFF and self.exit_code == 0


def _read_initramfs(initramfs: Path | Sequence[Path] | None) -> bytes:
    if initramfs is None:
        return b""
    paths = [initramfs] if isinstance(initramfs, (str, Path)) else list(initramfs)
    parts = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise KtstrError(f"initramfs {path} cannot be read: {exc.strerror}") from None
        # Concatenated cpio archives must each start 4-byte aligned.
        parts.append(data + b"\0" * (-len(data) % 4))
    return b"".join(parts)


@dataclass
class _Boot:
    """What the loader placed where (for the vCPU set-up)."""

    entry: int
    reserved: list[tuple[int, int]] = field(default_factory=list)


class Vm:
    """Boot ``kernel`` with ``initramfs`` on ``topology``; :meth:`run` returns a :class:`VmResult`.

    One run per Vm. Use as a context manager (or call :meth:`close`) when run()
    might not be reached; run() itself releases everything when it returns.
    """

    def __init__(
        self,
        kernel: Path,
        initramfs: Path | Sequence[Path] | None,
        topology: Topology,
        memory_mb: int = 2048,
        cmdline_extra: str = "",
        devices: Sequence[VmDevice] = (),
        timeout: float = 60.0,
        *,
        quiet: bool = False,
        on_console: Callable[[bytes], None] | None = None,
        console_input: bytes = b"",
        stall_timeout: float = DEFAULT_STALL_S,
        prefault: bool = False,
    ) -> None:
        from ktstr.vmm import loader

        self.prefault = prefault
        self.prefault_s: float | None = None
        self.kernel = Path(kernel)
        self.topology = topology
        self.memory_mb = memory_mb
        self.timeout = timeout
        self.devices = list(devices)
        self.quiet = quiet
        self.on_console = on_console
        self.console_input = console_input
        if stall_timeout < 0:
            raise KtstrError(f"stall timeout must be >= 0 (0 turns it off), got {stall_timeout}")
        self.stall_timeout = stall_timeout
        if not self.kernel.exists():
            raise KtstrError(f"kernel image {self.kernel} does not exist")
        self.bzimage = loader.load_bzimage(self.kernel)
        self.initrd = _read_initramfs(initramfs)
        if memory_mb * layout.MiB < layout.MIN_MEMORY_BYTES:
            raise KtstrError(
                f"guest memory {memory_mb} MB is too small: use at least "
                f"{layout.MIN_MEMORY_BYTES // layout.MiB} MB"
            )
        topology.node_memory_mb(memory_mb)
        if not timeout > 0:
            raise KtstrError(f"timeout must be positive, got {timeout}")
        self.regions = layout.ram_regions(memory_mb * layout.MiB)
        base = DEFAULT_CMDLINE + " " + EXIT_FRUGAL_CMDLINE + (" " + QUIET_CMDLINE if quiet else "")
        self.cmdline = " ".join(filter(None, [base, cmdline_extra.strip()]))
        self.machine: Machine | None = None
        self._ran = False

    # --- assembly ---

    def _reserve_ram(self, size: int) -> int:
        size = (size + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
        top = (
            min(layout.low_ram_end(self.regions), *(g for g, _ in self._reserved))
            if (self._reserved)
            else layout.low_ram_end(self.regions)
        )
        gpa = top - size
        if gpa < 64 * layout.MiB:
            raise KtstrError(f"cannot reserve {size} bytes of guest RAM: give the VM more memory")
        self._reserved.append((gpa, size))
        return gpa

    def _alloc_slot(self) -> MmioSlot:
        assert self.machine is not None
        gpa, irq = layout.virtio_mmio_slot(self._next_slot)
        self._next_slot += 1
        return MmioSlot(gpa, layout.VIRTIO_MMIO_SLOT_SIZE, self.machine.irq(irq))

    def _build(self) -> Machine:
        from ktstr.vmm import loader
        from ktstr.vmm.devices.bootport import BootPort, ExitPort, SleepControl
        from ktstr.vmm.devices.i8042 import I8042
        from ktstr.vmm.devices.serial import Serial

        machine = self.machine = Machine(self.regions, irqchip=True)
        self._reserved: list[tuple[int, int]] = []
        self._next_slot = 0
        ctx = machine.context(alloc_slot=self._alloc_slot, reserve=self._reserve_ram)
        self.com1 = Serial(machine.irq(layout.COM1_IRQ), layout.COM1_PORT, self.on_console)
        self.com2 = Serial(machine.irq(layout.COM2_IRQ), layout.COM2_PORT)
        self.bootport = BootPort()
        self.exitport = ExitPort()
        reboot = lambda: machine.stop(StopReason.REBOOT, "i8042 reset")  # noqa: E731
        poweroff = lambda: machine.stop(StopReason.POWEROFF, "ACPI S5")  # noqa: E731
        for dev in (
            self.com1,
            self.com2,
            I8042(reboot),
            self.bootport,
            self.exitport,
            SleepControl(poweroff),
            *self.devices,
        ):
            machine.attach(dev, ctx)  # type: ignore[arg-type]
        if self.console_input:
            self.com1.queue_input(self.console_input)

        mem = machine.memory
        assert mem is not None
        bz = self.bzimage
        from ktstr.vmm.x86 import regs as x86regs

        mem.write(layout.GDT_ADDR, x86regs.gdt_bytes())
        mem.write(layout.IDT_ADDR, b"\0" * layout.IDT_SIZE)
        mem.write(layout.PAGE_TABLES_ADDR, x86regs.identity_page_tables())
        mem.write(layout.KERNEL_LOAD_ADDR, bz.payload)
        initrd_addr = 0
        if self.initrd:
            initrd_addr = loader.place_initrd(
                self.regions,
                len(self.initrd),
                bz.initrd_addr_max,
                bz.kernel_end(),
                reserved=self._reserved,
            )
            mem.write(initrd_addr, self.initrd)
        self.cmdline = " ".join([self.cmdline, *ctx.cmdline])
        cmdline = loader.encode_cmdline(self.cmdline, bz.cmdline_size)
        mem.write(layout.CMDLINE_ADDR, cmdline)
        rsdp = self._write_firmware_tables(mem)
        e820 = loader.build_e820(self.regions, self._reserved)
        mem.write(
            layout.ZERO_PAGE_ADDR,
            loader.build_boot_params(
                bz,
                cmdline_addr=layout.CMDLINE_ADDR,
                cmdline_size=len(cmdline),
                initrd_addr=initrd_addr,
                initrd_size=len(self.initrd),
                e820=e820,
                rsdp_addr=rsdp,
            ),
        )
        self._setup_vcpus(machine)
        if self.prefault:
            self.prefault_s = machine.prefault()
        return machine

    def _write_firmware_tables(self, mem: GuestMemory) -> int:
        """ACPI (MADT, SRAT, SLIT, FADT/DSDT) and the MP table; returns the RSDP address."""
        import importlib

        rsdp = 0
        try:
            acpi = importlib.import_module("ktstr.vmm.x86.acpi")
        except ImportError:
            acpi = None
        if acpi is not None:
            memory_bytes = self.memory_mb * layout.MiB
            node_ranges = layout.numa_ram_ranges(memory_bytes, self.topology.numa_nodes)
            tables = acpi.build_acpi_tables(self.topology, node_ranges)
            mem.write(tables.base, tables.data)
            rsdp = tables.rsdp_addr
        try:
            mptable = importlib.import_module("ktstr.vmm.x86.mptable")
        except ImportError:
            return rsdp
        mem.write(layout.MPTABLE_ADDR, mptable.build_mptable(self.topology))
        return rsdp

    def _setup_vcpus(self, machine: Machine) -> None:
        from ktstr.vmm.x86 import cpuid as x86cpuid
        from ktstr.vmm.x86 import regs as x86regs

        assert machine.kvm is not None
        supported = [
            x86cpuid.CpuidEntry(
                function=e.function,
                index=e.index,
                flags=e.flags,
                eax=e.eax,
                ebx=e.ebx,
                ecx=e.ecx,
                edx=e.edx,
            )
            for e in machine.kvm.supported_cpuid()
        ]
        deadline = bool(machine.kvm.check_extension(kvm.KVM_CAP_TSC_DEADLINE_TIMER))
        xcr0 = x86cpuid.xcr0_for(supported)
        if xcr0 and not machine.kvm.check_extension(kvm.KVM_CAP_XCRS):
            xcr0 = 0
        for place in self.topology.places:
            vcpu = machine.add_vcpu(place.apic_id)
            entries = x86cpuid.cpuid_for_vcpu(
                supported, self.topology, place, tsc_deadline=deadline
            )
            vcpu.fd.set_cpuid2(
                [
                    kvm.kvm_cpuid_entry2(
                        function=e.function,
                        index=e.index,
                        flags=e.flags,
                        eax=e.eax,
                        ebx=e.ebx,
                        ecx=e.ecx,
                        edx=e.edx,
                    )
                    for e in entries
                ]
            )
            if xcr0:
                vcpu.fd.set_xcrs({0: xcr0})  # after SET_CPUID2, which defines the valid bits
            _set_lapic_lvts(vcpu.fd)
            vcpu.fd.set_msrs([(MSR_MTRR_DEF_TYPE, MTRR_DEF_ENABLE_WB)])
            if place.cpu == 0:
                _set_boot_state(vcpu.fd, x86regs)

    # --- running ---

    def run(self) -> VmResult:
        if self._ran:
            raise KtstrError("a Vm runs once; create a new Vm to boot again")
        self._ran = True
        try:
            machine = self._build()
            start = time.monotonic()
            com1 = self.com1
            outcome = machine.run(self.timeout, stall_s=self.stall_timeout,
                                  progress=lambda: com1.buffered + com1.dropped)
            return self._result(outcome, start)
        finally:
            self.close()

    def _result(self, outcome: RunOutcome, start: float) -> VmResult:
        console = self.com1.text()
        panic = PANIC_RE.search(console)
        exit_code: int | None = None
        if outcome.reason == StopReason.POWEROFF:
            exit_code = self.exitport.code if self.exitport.code is not None else 0
        boot_ms = None
        if self.bootport.boot_time is not None:
            boot_ms = (self.bootport.boot_time - start) * 1000.0
        error = outcome.error
        if error is None and outcome.reason not in (StopReason.POWEROFF,):
            if outcome.timed_out:
                error = f"guest did not power off within {self.timeout:g} s"
            elif outcome.reason == StopReason.HUNG:
                error = f"guest hung: {outcome.detail.splitlines()[0]}"
            elif panic:
                error = panic.group(0)
        return VmResult(
            exit_code=exit_code,
            console=console,
            channel2=bytes(self.com2.output),
            timed_out=outcome.timed_out,
            panicked=panic is not None or outcome.reason == StopReason.CRASH,
            boot_ms=boot_ms,
            exit_counts=outcome.exit_counts,
            duration_s=outcome.duration_s,
            error=error,
            reason=outcome.reason,
            detail=outcome.detail,
            panic_message=panic.group(0) if panic else "",
            cmdline=self.cmdline,
            exit_sites=site_summary([*outcome.site_counts, outcome.queued_sites]),
            vcpu_states=outcome.vcpu_states,
            device_errors=outcome.device_errors,
            device_error_messages=outcome.device_error_messages,
        )

    def stop(self) -> None:
        """Ask a running VM to stop (from another thread)."""
        if self.machine is not None:
            self.machine.stop(StopReason.STOPPED, "stop requested")

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set_lapic_lvts(fd: kvm.VcpuFd) -> None:
    """LVT0 = ExtINT (the PIC's INTR reaches the BSP), LVT1 = NMI, as firmware leaves them."""
    state = fd.get_lapic()
    regs = bytearray(state.regs)
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(regs[off : off + 4], "little")
        value = (value & ~0x700) | (mode << 8)
        value &= ~(1 << 16)  # unmasked
        regs[off : off + 4] = value.to_bytes(4, "little")
    ctypes.memmove(ctypes.addressof(state), bytes(regs), len(regs))
    fd.set_lapic(state)


def _set_boot_state(fd: kvm.VcpuFd, x86regs: object) -> None:
    """Long mode at the kernel's 64-bit entry, per the Linux boot protocol."""
    lm = x86regs.long_mode_state()  # type: ignore[attr-defined]
    br = x86regs.boot_regs()  # type: ignore[attr-defined]
    sregs = fd.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        seg = getattr(lm, name)
        target = getattr(sregs, name)
        for fname in (f[0] for f in kvm.kvm_segment._fields_):
            if fname != "padding":
                setattr(target, fname, getattr(seg, fname))
    sregs.gdt.base, sregs.gdt.limit = lm.gdt_base, lm.gdt_limit
    sregs.idt.base, sregs.idt.limit = lm.idt_base, lm.idt_limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = lm.cr0, lm.cr3, lm.cr4, lm.efer
    fd.set_sregs(sregs)
    regs = kvm.kvm_regs()
    regs.rip, regs.rsi, regs.rsp, regs.rbp, regs.rflags = (
        br.rip,
        br.rsi,
        br.rsp,
        br.rbp,
        br.rflags,
    )
    fd.set_regs(regs)
    fpu = kvm.kvm_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    fd.set_fpu(fpu)
    fd.set_msrs(
        [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        ]
    )


def fd_count() -> int:
    """Open fds of this process (tests check teardown with it)."""
    return len(os.listdir("/proc/self/fd"))


def vcpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ktstr-vcpu")]
