"""Boot a Linux bzImage on a :class:`~ktstr.vmm.machine.Machine`: :class:`Vm` and :class:`VmResult`.

The vCPU state the Linux boot protocol expects is :mod:`ktstr.vmm.x86.boot`'s; the
plumbing (fds, RAM, buses, vCPU threads, timeout, teardown) is the Machine's.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktstr.errors import KtstrError
from ktstr.topology import Topology
from ktstr.vmm import kvm, layout
from ktstr.vmm.bus import MmioSlot, VmDevice
from ktstr.vmm.machine import Machine, RunObserver, RunOutcome
from ktstr.vmm.memory import GuestMemory
from ktstr.vmm.performance import Performance
from ktstr.vmm.threadtime import mean_dilation
from ktstr.vmm.vcpu import StopReason, site_summary

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
SWITCH_INTERVAL_S = 0.0005
"""Python's GIL switch interval while a VM runs (default 5 ms). Every vCPU exit we handle
needs the GIL; a thread computing in Python (the observer's drgn reads) keeps it until
the interval ends, and console output is two exits per byte, often with the guest's
interrupts off (``benchmarks/gil_latency.py``)."""
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def gil_switch_interval(seconds: float) -> Iterator[None]:
    """Python's switch interval at most ``seconds`` while any VM of this process runs."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
        _switch_users += 1
        sys.setswitchinterval(min(seconds, _switch_saved))
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


DEFAULT_STALL_S = 30.0
"""A Linux guest delivers timer interrupts many times a second, whatever its tasks do: this
long without any progress at all (:mod:`ktstr.vmm.watchdog`) means it is hung."""


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
    observer_error: str | None = None
    """The host-side observer (``Vm(observer=)``) failed: the run itself is unaffected."""
    vcpu_dilation: list[float | None] = field(default_factory=list)
    """Per vCPU, the share of the run its host thread was runnable but not running (None:
    the host has no schedstat, or the thread never stopped)."""
    performance: dict[str, Any] | None = None
    """What performance mode got (``PerformanceApplied.to_record``; None: not asked for)."""

    @property
    def dilation(self) -> float | None:
        """The vCPUs' mean :attr:`vcpu_dilation` (None when none was measured)."""
        return mean_dilation(self.vcpu_dilation)

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
        observer: RunObserver | None = None,
        performance: Performance | None = None,
    ) -> None:
        from ktstr import bzimage

        if performance is not None:
            performance.check_fits(topology.nr_cpus)
        self.performance = performance
        self.prefault = prefault
        self.observer = observer
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
        self.bzimage = bzimage.load_bzimage(self.kernel)
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
        self.switch_interval_s = SWITCH_INTERVAL_S

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

        machine = self.machine = Machine(self.regions, irqchip=True,
                                         performance=self.performance)
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
        from ktstr.vmm.x86 import boot as x86boot
        from ktstr.vmm.x86 import cpuid as x86cpuid

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
        # Pinned vCPUs that halt in the guest are never preempted: say so to the guest.
        realtime = machine.applied is not None and "hlt" in machine.applied.disabled_exits
        if realtime and machine.applied is not None:
            machine.applied.hints_realtime = x86cpuid.has_leaf(
                supported, x86cpuid.KVM_CPUID_FEATURES)
            if not machine.applied.hints_realtime:
                machine.applied.lack("KVM_HINTS_REALTIME: this KVM has no paravirt CPUID leaf")
        xcr0 = x86cpuid.xcr0_for(supported)
        if xcr0 and not machine.kvm.check_extension(kvm.KVM_CAP_XCRS):
            xcr0 = 0
        for place in self.topology.places:
            vcpu = machine.add_vcpu(place.apic_id)
            entries = x86cpuid.cpuid_for_vcpu(
                supported, self.topology, place, tsc_deadline=deadline,
                hints_realtime=True if realtime else None,
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
            x86boot.set_lapic_lvts(vcpu.fd)
            vcpu.fd.set_msrs([(x86boot.MSR_MTRR_DEF_TYPE, x86boot.MTRR_DEF_ENABLE_WB)])
            if place.cpu == 0:
                x86boot.set_boot_state(vcpu.fd)

    # --- running ---

    def run(self) -> VmResult:
        if self._ran:
            raise KtstrError("a Vm runs once; create a new Vm to boot again")
        self._ran = True
        try:
            machine = self._build()
            start = time.monotonic()
            com1 = self.com1
            with gil_switch_interval(self.switch_interval_s):
                outcome = machine.run(self.timeout, stall_s=self.stall_timeout,
                                      progress=lambda: com1.buffered + com1.dropped,
                                      observer=self.observer)
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
            observer_error=self.machine.observer_error if self.machine else None,
            vcpu_dilation=outcome.vcpu_dilation,
            performance=outcome.performance.to_record() if outcome.performance else None,
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
