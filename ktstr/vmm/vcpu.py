"""vCPU threads: the KVM_RUN loop, exit dispatch, and kicking a vCPU out of the guest.

Each vCPU runs ``KVM_RUN`` on its own thread (ctypes releases the GIL for the
ioctl). Exits are dispatched to the PIO/MMIO buses; anything that ends the VM
goes through :class:`RunControl` (first reason wins). A device raising during
an access only drops that access (the buses count it, see
:class:`~ktstr.vmm.bus.DeviceErrors`); any other Python exception on a vCPU
thread is a VMM failure and ends the VM carrying its message, never a thread
traceback.

Kicking: set ``immediate_exit`` in the shared ``kvm_run`` page (covers a vCPU
that is about to enter the guest) and send SIGUSR1 to the thread (covers one
that is inside it). The signal needs a real handler, since an ignored signal
never interrupts ``KVM_RUN``; :func:`ensure_kick_handler` installs a no-op one,
from any thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from ktstr.vmm import kvm
from ktstr.vmm.bus import MmioBus, PioBus
from ktstr.vmm.kvm import KvmIoctlError, VcpuFd
from ktstr.vmm.performance import FIFO_PRIORITY
from ktstr.vmm.threadtime import ThreadTime, dilation, thread_time

KICK_SIGNAL = signal.SIGUSR1
IMMEDIATE_EXIT_OFFSET = kvm.kvm_run.immediate_exit.offset
TRIPLE_FAULT = "triple fault"
"""How a shutdown exit is named in the stop detail (on AMD, KVM has reset the vCPU by then,
so its registers show the reset state, not the fault)."""

RUN_REQUEST = kvm.KVM_RUN
EXIT_IO = kvm.KVM_EXIT_IO
EXIT_MMIO = kvm.KVM_EXIT_MMIO
EXIT_INTR = kvm.KVM_EXIT_INTR
REASON_SIGNAL = -1

# Exit-site keys: the kind in bits 48+, the port or guest-physical address below.
SITE_IO_IN = 1 << 48
SITE_IO_OUT = 2 << 48
SITE_MMIO_READ = 3 << 48
SITE_MMIO_WRITE = 4 << 48
SITE_QUEUED_OUT = 5 << 48
"""Not an exit: a port write KVM queued in the coalesced ring (replayed later)."""
SITE_QUEUED_WRITE = 6 << 48
SITE_OTHER = 7 << 48
"""Every site first seen after :data:`MAX_EXIT_SITES` others (a guest may touch any address)."""
_SITE_KINDS = {1: "in", 2: "out", 3: "read", 4: "write", 5: "queued out", 6: "queued write"}
MAX_EXIT_SITES = 256
"""Distinct sites counted per vCPU (and in a summary); the rest are :data:`SITE_OTHER`."""

RECENT_EXITS = 16
"""IO/MMIO exit sites each vCPU remembers, for the state of a hung or timed-out guest."""

_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # kvm_run.io at offset 32
_MMIO = struct.Struct("<Q8sIB")  # kvm_run.mmio at offset 32 (data at 40)


def site_name(site: int) -> str:
    """``"out 0x3f8"`` (port) or ``"read 0xd0000050"`` (MMIO) for a site key."""
    if site == SITE_OTHER:
        return "other"
    kind = _SITE_KINDS.get(site >> 48, "?")
    return f"{kind} 0x{site & ((1 << 48) - 1):x}"


def count_site(sites: dict[int, int], site: int) -> None:
    """One more exit at ``site``; a new site past :data:`MAX_EXIT_SITES` counts as other.

    The vCPU loop counts a known site itself (a call per exit is measurable under
    emulation) and calls this for new ones only.
    """
    n = sites.get(site)
    if n is not None:
        sites[site] = n + 1
    elif len(sites) < MAX_EXIT_SITES:
        sites[site] = 1
    else:
        sites[SITE_OTHER] = sites.get(SITE_OTHER, 0) + 1


def site_summary(counts: list[dict[int, int]]) -> dict[str, int]:
    """Exit sites summed over vCPUs, most frequent first, by :func:`site_name`; at most
    :data:`MAX_EXIT_SITES` of them, the rest summed as ``"other"``."""
    total: Counter[int] = Counter()
    for c in counts:
        total.update(c)
    other = total.pop(SITE_OTHER, 0)
    ranked = total.most_common()
    out = {site_name(site): n for site, n in ranked[:MAX_EXIT_SITES]}
    other += sum(n for _, n in ranked[MAX_EXIT_SITES:])
    if other:
        out["other"] = other
    return out


# --- the kick signal handler -------------------------------------------------------------


class _sigaction(ctypes.Structure):
    # glibc x86_64 layout: handler, 1024-bit mask, flags, restorer.
    _fields_ = [
        ("sa_handler", ctypes.c_void_p),
        ("sa_mask", ctypes.c_uint64 * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_handler_lock = threading.Lock()
_handler_ready = False


def _noop_handler(signum: int, frame: object) -> None:
    """Runs (later, on the main thread) after a kick; the kick itself is the EINTR."""


def ensure_kick_handler() -> None:
    """Make sure KICK_SIGNAL has a handler (not SIG_DFL/SIG_IGN) in this process.

    On the main thread this is ``signal.signal``. ``signal.signal`` refuses other
    threads, so there the handler is set with libc ``sigaction``; the handler
    is libc's ``abs``, an async-signal-safe function that takes an int and does
    nothing observable.
    """
    global _handler_ready
    with _handler_lock:
        if _handler_ready:
            return
        old = _sigaction()
        if _libc.sigaction(int(KICK_SIGNAL), None, ctypes.byref(old)) != 0:
            raise OSError(ctypes.get_errno(), "sigaction query failed")
        if old.sa_handler not in (None, 0, 1):  # SIG_DFL = 0, SIG_IGN = 1
            _handler_ready = True
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, _noop_handler)
        else:
            new = _sigaction()
            new.sa_handler = ctypes.cast(_libc.abs, ctypes.c_void_p).value
            new.sa_flags = 0  # no SA_RESTART: KVM_RUN must return EINTR
            if _libc.sigaction(int(KICK_SIGNAL), ctypes.byref(new), None) != 0:
                raise OSError(ctypes.get_errno(), "sigaction install failed")
        _handler_ready = True


# --- stop control ------------------------------------------------------------------------


class StopReason:
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    CRASH = "crash"
    HALTED = "halted"
    TIMEOUT = "timeout"
    HUNG = "hung"
    """No guest progress for the stall timeout (see :mod:`ktstr.vmm.watchdog`)."""
    STOPPED = "stopped"
    ERROR = "error"


class RunControl:
    """Shared between vCPU threads, devices and the waiting thread: why the VM ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.reason: str | None = None
        self.detail: str = ""
        self.error: str | None = None
        # Pausing (Machine.pause): a kicked vCPU parks in its signal path while set.
        self.pause_requested = False
        self._running = threading.Event()
        self._running.set()
        self._parked = 0
        self._parked_changed = threading.Condition(self._lock)

    @property
    def stopping(self) -> bool:
        return self.done.is_set()

    def stop(self, reason: str, detail: str = "", error: str | None = None) -> bool:
        """Record why the VM ends; False if another reason was already recorded."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
            self.detail = detail
            self.error = error
        self.done.set()
        self._running.set()  # a parked vCPU must see the stop
        return True

    def request_pause(self) -> None:
        with self._lock:
            self.pause_requested = True
            self._running.clear()

    def wait_parked(self, count: int, timeout: float) -> bool:
        """Until ``count`` vCPUs are parked (True), the run ends or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._parked < count and not self.done.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._parked_changed.wait(min(left, 0.05))
            return self._parked >= count

    def resume(self) -> None:
        with self._lock:
            self.pause_requested = False
            self._running.set()

    def park(self) -> None:
        """On a vCPU thread after a kick: stay out of the guest while a pause holds."""
        with self._lock:
            if not self.pause_requested:
                return
            self._parked += 1
            self._parked_changed.notify_all()
        self._running.wait()
        with self._lock:
            self._parked -= 1


# --- diagnostics -------------------------------------------------------------------------


def _seg(name: str, seg: kvm.kvm_segment) -> str:
    return (
        f"{name}={seg.selector:04x} base={seg.base:x} limit={seg.limit:x} type={seg.type} "
        f"p={seg.present} dpl={seg.dpl} db={seg.db} s={seg.s} l={seg.l} g={seg.g} "
        f"unusable={seg.unusable}"
    )


def describe_state(fd: VcpuFd) -> str:
    """Registers and system registers, for failure diagnostics."""
    lines: list[str] = []
    try:
        r = fd.get_regs()
        names = [f[0] for f in kvm.kvm_regs._fields_]
        lines.append(" ".join(f"{n}={getattr(r, n):x}" for n in names))
    except OSError as err:
        lines.append(f"regs unavailable: {err}")
    try:
        s = fd.get_sregs()
        lines.append(
            f"cr0={s.cr0:x} cr2={s.cr2:x} cr3={s.cr3:x} cr4={s.cr4:x} cr8={s.cr8:x} "
            f"efer={s.efer:x} apic_base={s.apic_base:x}"
        )
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            lines.append(_seg(name, getattr(s, name)))
        lines.append(f"gdt={s.gdt.base:x}/{s.gdt.limit:x} idt={s.idt.base:x}/{s.idt.limit:x}")
    except OSError as err:
        lines.append(f"sregs unavailable: {err}")
    return "\n".join(lines)


@dataclass(frozen=True)
class VcpuRegs:
    """A stopped vCPU's general registers (``kvm_regs`` names) and where it ran: what
    unwinds its stack from the host (:func:`ktstr.observe.state.vcpu_stack`)."""

    index: int
    gprs: dict[str, int]
    cs: int
    """Code segment selector: its low two bits are the privilege level (0 = kernel)."""

    @property
    def kernel(self) -> bool:
        return self.cs & 3 == 0

    @property
    def rip(self) -> int:
        return self.gprs["rip"]


def read_regs(index: int, fd: VcpuFd) -> VcpuRegs | None:
    """The vCPU's registers, or None when KVM will not say (only from the vCPU's own
    thread, or once that thread left KVM_RUN)."""
    try:
        regs, sregs = fd.get_regs(), fd.get_sregs()
    except OSError:
        return None
    return VcpuRegs(index, {f[0]: int(getattr(regs, f[0])) for f in regs._fields_},
                    int(sregs.cs.selector))


APIC_ISR = 0x100
APIC_IRR = 0x200
APIC_TPR = 0x80
RFLAGS_IF = 1 << 9


def _apic_vectors(regs: bytes, base: int) -> list[int]:
    """Set bits of a 256-bit LAPIC register array (8 x 32 bits, 16 bytes apart)."""
    out = []
    for word in range(8):
        off = base + word * 16
        value = int.from_bytes(regs[off : off + 4], "little")
        out += [word * 32 + bit for bit in range(32) if value >> bit & 1]
    return out


def summarize_state(fd: VcpuFd) -> str:
    """One line: where the vCPU is, whether it takes interrupts, what is pending for it.

    Only from the vCPU's own thread, or once that thread left KVM_RUN (the vCPU ioctls
    wait for the vCPU mutex).
    """
    parts: list[str] = []
    try:
        r = fd.get_regs()
        parts.append(f"rip={r.rip:x} rsp={r.rsp:x} rflags={r.rflags:x} "
                     f"if={'on' if r.rflags & RFLAGS_IF else 'off'}")
    except OSError as err:
        parts.append(f"regs unavailable ({err.strerror})")
    with contextlib.suppress(OSError):
        parts.append(f"mp_state={kvm.MP_STATE_NAMES.get(fd.get_mp_state(), '?')}")
    try:
        regs = bytes(fd.get_lapic().regs)
        irr, isr = _apic_vectors(regs, APIC_IRR), _apic_vectors(regs, APIC_ISR)
        tpr = int.from_bytes(regs[APIC_TPR : APIC_TPR + 4], "little")
        parts.append(f"lapic irr={irr} isr={isr} tpr={tpr:x}")
    except OSError:
        pass
    return " ".join(parts)


# --- coalesced writes -------------------------------------------------------------------

_RING_HDR = struct.Struct("<II")
_RING_ENTRY = struct.Struct("<QII")  # phys_addr/port, len, pio; data[8] follows


class CoalescedRing:
    """The consumer side of KVM's coalesced-write ring (one per VM, shared by all vCPUs).

    KVM appends guest writes to registered zones to a ring page inside every vCPU's
    ``kvm_run`` mapping instead of exiting. :meth:`drain` replays them, in order, to the
    buses; vCPU loops call it before handling any exit once :attr:`active` is set, so a
    device never sees a later access before an earlier queued write.
    """

    def __init__(self, pio: PioBus, mmio: MmioBus) -> None:
        self.pio = pio
        self.mmio = mmio
        self.active = False
        self.offset = kvm.KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        self.entries = kvm.coalesced_ring_entries()
        self.sites: dict[int, int] = {}
        """Replayed writes by site (``SITE_QUEUED_OUT | port``, ...)."""
        self._lock = threading.Lock()

    def pending(self, mapping: mmap.mmap) -> bool:
        first, last = _RING_HDR.unpack_from(mapping, self.offset)
        return first != last

    def drain(self, mapping: mmap.mmap) -> None:
        """Replay every queued write through the buses and free the ring slots."""
        off = self.offset
        with self._lock:
            first, last = _RING_HDR.unpack_from(mapping, off)
            while first != last:
                if first >= self.entries or last >= self.entries:
                    raise RuntimeError(f"corrupt coalesced ring: first={first} last={last}")
                entry = off + kvm.KVM_COALESCED_RING_HEADER + first * kvm.KVM_COALESCED_ENTRY_SIZE
                addr, length, pio = _RING_ENTRY.unpack_from(mapping, entry)
                data = mapping[entry + 16 : entry + 16 + min(length, 8)]
                if pio:
                    self.pio.write(addr, data)
                    site = SITE_QUEUED_OUT | addr
                else:
                    self.mmio.write(addr, data)
                    site = SITE_QUEUED_WRITE | addr
                first = (first + 1) % self.entries
                _U32.pack_into(mapping, off, first)  # frees the slot for KVM
                count_site(self.sites, site)
                last = _U32.unpack_from(mapping, off + 4)[0]


# --- the vCPU ----------------------------------------------------------------------------


class Vcpu:
    """One vCPU fd, its ``kvm_run`` mapping and its thread.

    The exit path reads ``kvm_run`` with precompiled ``struct`` unpackers on the
    mapping (no ctypes attribute walks), dispatches single-element port accesses
    through the bus's per-port cache and counts exits by reason and by site in
    plain int-keyed dicts; names are made only when somebody asks.
    """

    def __init__(
        self,
        index: int,
        vcpu_id: int,
        fd: VcpuFd,
        mmap_size: int,
        pio: PioBus,
        mmio: MmioBus,
        control: RunControl,
        on_halt: Callable[[Vcpu], None] | None = None,
        ring: CoalescedRing | None = None,
    ) -> None:
        self.index = index
        self.ring = ring
        self.vcpu_id = vcpu_id
        self.fd = fd
        self.pio = pio
        self.mmio = mmio
        self.control = control
        self.on_halt = on_halt
        self.reason_counts: dict[int, int] = {}
        """Exits by KVM exit reason (-1: KVM_RUN interrupted by a signal)."""
        self.site_counts: dict[int, int] = {}
        """Exits by site: ``SITE_IO_IN/OUT | port`` or ``SITE_MMIO_READ/WRITE | address``."""
        self.halted = False
        self.recent: deque[int] = deque(maxlen=RECENT_EXITS)
        """The last IO/MMIO exit sites, oldest first (what a stuck guest was poking)."""
        self._map = fd.map_run(mmap_size)
        self._map_size = mmap_size
        self.run_state: kvm.kvm_run | None = kvm.kvm_run.from_buffer(self._map)
        self.thread: threading.Thread | None = None
        self.started = threading.Event()
        self.pin_cpu: int | None = None
        self.fifo = False
        """Asked by performance mode: pin the thread to this host CPU; run it SCHED_FIFO."""
        self.pinned: int | None = None
        self.fifo_on = False
        self.tuning_errors: list[str] = []
        """What the thread applied of those, and what the host refused (one line each)."""
        self.host_start: ThreadTime | None = None
        self.host_end: ThreadTime | None = None
        """The thread's host schedstat when its loop began and ended (see :attr:`dilation`)."""

    @property
    def exit_counts(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for reason, n in self.reason_counts.items():
            out["signal" if reason == REASON_SIGNAL else kvm.exit_reason_name(reason)] += n
        return out

    # --- thread control ---

    def start(self) -> None:
        ensure_kick_handler()
        self.thread = threading.Thread(
            target=self._thread_main, name=f"ktstr-vcpu{self.index}", daemon=True
        )
        self.thread.start()

    def kick(self) -> None:
        if self.run_state is not None:
            self.run_state.immediate_exit = 1
        thread = self.thread
        if thread is not None and thread.is_alive() and thread.ident is not None:
            # The thread may exit between the check and the kill.
            with contextlib.suppress(OSError):
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    @property
    def dilation(self) -> float | None:
        """The share of its run this vCPU's thread was runnable on the host but not running."""
        return dilation(self.host_start, self.host_end)

    def _tune_thread(self) -> None:
        """Performance mode's pinning and policy, from inside the thread (they are per thread);
        a refusal is recorded, never raised."""
        if self.pin_cpu is not None:
            try:
                os.sched_setaffinity(0, {self.pin_cpu})
                self.pinned = self.pin_cpu
            except OSError as err:
                self.tuning_errors.append(f"pinning vCPU {self.index} to host CPU "
                                          f"{self.pin_cpu}: {err.strerror}")
        if self.fifo:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
                self.fifo_on = True
            except OSError as err:
                self.tuning_errors.append(f"SCHED_FIFO for vCPU {self.index}: {err.strerror}")

    def _thread_main(self) -> None:
        self._tune_thread()
        self.host_start = thread_time()
        self.started.set()
        try:
            self._loop()
        except BaseException as exc:  # every failure must end the VM, not the thread
            self.control.stop(
                StopReason.ERROR,
                error=f"vcpu {self.index}: {type(exc).__name__}: {exc}",
            )
        finally:
            self.host_end = thread_time()

    def _loop(self) -> None:
        # Everything the hot path touches is a local: under emulation every
        # attribute lookup on the exit path is measurable.
        m = self._map
        fd = self.fd.fd
        ioctl = kvm.run_ioctl
        get_errno = ctypes.get_errno
        stopping = self.control.done.is_set
        control = self.control
        park = control.park
        reasons = self.reason_counts
        sites = self.site_counts
        recent = self.recent.append
        u32 = _U32.unpack_from
        io_hdr = _IO.unpack_from
        mmio_hdr = _MMIO.unpack_from
        pio_read = self.pio.read
        pio_write = self.pio.write
        pio_device = self.pio.device_for
        pio_read_failed = self.pio.read_failed
        pio_write_failed = self.pio.write_failed
        mmio_read = self.mmio.read
        mmio_write = self.mmio.write
        map_size = self._map_size
        data_min = ctypes.sizeof(kvm.kvm_run)
        ring = self.ring
        coalescing = ring is not None and ring.active and map_size >= ring.offset + mmap.PAGESIZE
        ring_hdr = _RING_HDR.unpack_from
        ring_off = ring.offset if ring is not None else 0
        while not stopping():
            if ioctl(fd, RUN_REQUEST, 0) < 0:
                err = get_errno()
                if err == errno.EINTR or err == errno.EAGAIN:
                    reasons[REASON_SIGNAL] = reasons.get(REASON_SIGNAL, 0) + 1
                    if control.pause_requested:  # a pause kick, not a stop
                        park()
                        m[IMMEDIATE_EXIT_OFFSET] = 0
                    continue
                raise KvmIoctlError(err, f"KVM_RUN on {self.fd.what} failed: {os.strerror(err)}")
            reason = u32(m, 8)[0]
            reasons[reason] = reasons.get(reason, 0) + 1
            if coalescing:
                first, last = ring_hdr(m, ring_off)
                if first != last:
                    ring.drain(m)  # type: ignore[union-attr]
            if reason == EXIT_IO:
                direction, size, port, count, off = io_hdr(m, 32)
                site = (SITE_IO_OUT if direction else SITE_IO_IN) | port
                recent(site)
                n = sites.get(site)
                if n is None:
                    count_site(sites, site)  # a new site: the bounded path
                else:
                    sites[site] = n + 1
                end = off + size * count
                if end > map_size or off < data_min or size not in (1, 2, 4):
                    raise RuntimeError(
                        f"bad io exit: port=0x{port:x} size={size} count={count} "
                        f"data_offset={off}"
                    )
                if count == 1:
                    # The bus's dispatch, without its range lookup: a device that raises
                    # loses this access only (as PioBus.read/write do).
                    dev = pio_device(port, size)
                    if direction:
                        if dev is not None:
                            try:
                                dev.pio_write(port, m[off:end])
                            except Exception as exc:
                                pio_write_failed(dev, port, size, exc)
                    elif dev is None:
                        m[off:end] = b"\xff" * size
                    else:
                        try:
                            data = dev.pio_read(port, size)
                            if len(data) != size:
                                data = bytes(data[:size]).ljust(size, b"\xff")
                            m[off:end] = data
                        except Exception as exc:
                            pio_read_failed(dev, port, size, exc)
                            m[off:end] = b"\xff" * size
                elif direction:
                    for start in range(off, end, size):
                        pio_write(port, m[start : start + size])
                else:
                    for start in range(off, end, size):
                        m[start : start + size] = pio_read(port, size)
            elif reason == EXIT_MMIO:
                addr, data8, length, is_write = mmio_hdr(m, 32)
                site = (SITE_MMIO_WRITE if is_write else SITE_MMIO_READ) | addr
                recent(site)
                n = sites.get(site)
                if n is None:
                    count_site(sites, site)  # a new site: the bounded path
                else:
                    sites[site] = n + 1
                if not 1 <= length <= 8:
                    raise RuntimeError(f"bad mmio exit: addr=0x{addr:x} len={length}")
                if is_write:
                    mmio_write(addr, data8[:length])
                else:
                    m[40 : 40 + length] = mmio_read(addr, length)
            elif reason == EXIT_INTR:
                continue
            elif reason == kvm.KVM_EXIT_HLT:
                self.halted = True
                if self.on_halt is not None:
                    self.on_halt(self)
                return
            elif reason == kvm.KVM_EXIT_SHUTDOWN:
                # A Linux guest reboots through the i8042 or ACPI; a triple fault is a crash
                # nobody could print, so keep where it happened.
                self.control.stop(StopReason.REBOOT, self._shutdown_detail())
                return
            elif reason == kvm.KVM_EXIT_SYSTEM_EVENT:
                run = self.run_state
                assert run is not None
                self._system_event(run)
                return
            elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
                run = self.run_state
                assert run is not None
                fe = run.u.fail_entry
                self._fail(
                    f"KVM_EXIT_FAIL_ENTRY: hardware_entry_failure_reason="
                    f"0x{fe.hardware_entry_failure_reason:x} cpu={fe.cpu}"
                )
                return
            elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
                run = self.run_state
                assert run is not None
                ie = run.u.internal
                words = " ".join(f"{ie.data[i]:x}" for i in range(min(ie.ndata, 16)))
                self._fail(
                    f"KVM_EXIT_INTERNAL_ERROR: suberror={ie.suberror} "
                    f"({_INTERNAL_SUBERRORS.get(ie.suberror, 'unknown')}) data=[{words}]"
                )
                return
            else:
                self._fail(f"unhandled exit reason {reason} ({kvm.exit_reason_name(reason)})")
                return

    def drain_coalesced(self) -> None:
        """Replay writes still queued in the coalesced ring (after the vCPUs stopped)."""
        if self.ring is not None and self.ring.active and self.run_state is not None:
            self.ring.drain(self._map)

    def state(self) -> str:
        """What this vCPU was doing when the run ended (registers, pending vectors, exits)."""
        last = ", ".join(site_name(site) for site in self.recent) or "none"
        head = f"vcpu {self.index} (apic id {self.vcpu_id})"
        if self.thread is not None and self.thread.is_alive():
            return (f"{head}: thread still inside KVM_RUN (did not answer the kick); "
                    f"last exits: {last}")
        return f"{head}: {summarize_state(self.fd)}; last exits: {last}"

    def frozen_regs(self) -> VcpuRegs | None:
        """Registers at the run's end; None while the thread is still inside KVM_RUN."""
        if self.thread is not None and self.thread.is_alive():
            return None
        return read_regs(self.index, self.fd)

    def _shutdown_detail(self) -> str:
        """A triple fault's detail. On AMD, KVM re-INITs the vCPU at the shutdown intercept
        (the VMCB is undefined after it), so registers at the reset vector say nothing of
        where it faulted: the last exit sites are then all there is."""
        head = f"vcpu {self.index}: {TRIPLE_FAULT} (shutdown)"
        last = ", ".join(site_name(site) for site in self.recent) or "none"
        try:
            regs, sregs = self.fd.get_regs(), self.fd.get_sregs()
            reset = regs.rip == 0xFFF0 and sregs.cs.selector == 0xF000 and not sregs.cr0 & 1
        except OSError:
            reset = False
        if reset:
            return (f"{head}\nits registers are the reset state (KVM re-INITs a vCPU on an AMD "
                    f"shutdown intercept): where it faulted is lost; last exits: {last}")
        return f"{head}\n{describe_state(self.fd)}\nlast exits: {last}"

    def _fail(self, what: str) -> None:
        self.control.stop(
            StopReason.ERROR,
            error=f"vcpu {self.index} (apic id {self.vcpu_id}): {what}\n{describe_state(self.fd)}",
        )

    def _system_event(self, run: kvm.kvm_run) -> None:
        kind = run.u.system_event.type
        if kind == kvm.KVM_SYSTEM_EVENT_SHUTDOWN:
            self.control.stop(StopReason.POWEROFF, f"vcpu {self.index}: system event shutdown")
        elif kind == kvm.KVM_SYSTEM_EVENT_RESET:
            self.control.stop(StopReason.REBOOT, f"vcpu {self.index}: system event reset")
        elif kind == kvm.KVM_SYSTEM_EVENT_CRASH:
            self.control.stop(StopReason.CRASH, f"vcpu {self.index}: system event crash")
        else:
            self._fail(f"unhandled system event type {kind}")

    # --- teardown ---

    def join(self, deadline: float) -> bool:
        """Kick until the thread exits or ``deadline`` (monotonic) passes; True if it exited."""
        thread = self.thread
        if thread is None:
            return True
        while thread.is_alive():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.kick()
            thread.join(min(0.05, remaining))
        return True

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd (only once the thread is gone)."""
        if self.thread is not None and self.thread.is_alive():
            return  # leaking beats a use-after-unmap on a thread stuck in a device
        if self.run_state is not None:
            self.run_state = None
            self._map.close()
        self.fd.close()


_INTERNAL_SUBERRORS = {
    kvm.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    kvm.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    kvm.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    kvm.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}
