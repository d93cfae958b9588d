"""The KVM ABI as ctypes: struct layouts, ioctl request numbers, thin fd wrappers.

The one place that knows ``<linux/kvm.h>``. Request numbers are computed with
``ioctl_opt`` from the ctypes struct they carry, so a wrong layout shows up as a
wrong size in the unit tests rather than as a silent ``EINVAL``. Ioctls go
through libc with ``use_errno`` (ctypes drops the GIL around foreign calls, so a
vCPU thread blocked in ``KVM_RUN`` does not stall the others).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from ctypes import (
    c_char,
    c_int32,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)
from typing import Any

from ioctl_opt import IO, IOR, IOW, IOWR

from ktstr.errors import KtstrError

KVMIO = 0xAE
KVM_API_VERSION = 12
KVM_DEV = "/dev/kvm"


# --- structs -----------------------------------------------------------------


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """Header only; :func:`make_msrs` builds the variable-length form."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class kvm_cpuid2(ctypes.Structure):
    """Header only; :func:`make_cpuid2` builds the variable-length form."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_irq_level(ctypes.Structure):
    # union { __u32 irq; __s32 status; } -- irq in, status out; same bytes.
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4),
                ("pad", ctypes.c_uint8 * 64)]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("pio", c_uint32)]


KVM_COALESCED_MMIO_PAGE_OFFSET = 2
"""x86: the coalesced-write ring is this page of every vCPU's ``kvm_run`` mapping."""
KVM_COALESCED_RING_HEADER = 8
"""``struct kvm_coalesced_mmio_ring``: u32 first (consumer), u32 last (producer), entries."""
KVM_COALESCED_ENTRY_SIZE = 24
"""``struct kvm_coalesced_mmio``: u64 phys_addr, u32 len, u32 pio, u8 data[8]."""


def coalesced_ring_entries(page_size: int = mmap.PAGESIZE) -> int:
    """KVM_COALESCED_MMIO_MAX: how many entries fit in the ring page."""
    return (page_size - KVM_COALESCED_RING_HEADER) // KVM_COALESCED_ENTRY_SIZE


KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_pre_fault_memory(ctypes.Structure):
    _fields_ = [
        ("gpa", c_uint64),
        ("size", c_uint64),
        ("flags", c_uint64),
        ("padding", c_uint64 * 5),
    ]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_stats_header(ctypes.Structure):
    """Start of a binary stats fd (``KVM_GET_STATS_FD``): where ids, descriptors, data are."""

    _fields_ = [
        ("flags", c_uint32),
        ("name_size", c_uint32),
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """One stats descriptor; ``name_size`` bytes of NUL-padded name follow it."""

    _fields_ = [
        ("flags", c_uint32),
        ("exponent", ctypes.c_int16),
        ("size", c_uint16),
        ("offset", c_uint32),
        ("bucket_size", c_uint32),
    ]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


# kvm_run and its exit union --------------------------------------------------


class _exit_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _exit_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _exit_ex(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _exit_io(ctypes.Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class _exit_mmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class _exit_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _exit_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _exit_union(ctypes.Union):
    _fields_ = [
        ("hw", _exit_hw),
        ("fail_entry", _exit_fail_entry),
        ("ex", _exit_ex),
        ("io", _exit_io),
        ("mmio", _exit_mmio),
        ("internal", _exit_internal),
        ("system_event", _exit_system_event),
        ("padding", c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    """The head of the shared ``kvm_run`` page (the sync-regs area after it is unused)."""

    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("u", _exit_union),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
    ]


def make_cpuid2(entries: int) -> Any:
    """A ``kvm_cpuid2`` instance with room for ``entries`` entries (``nent`` preset)."""

    class _cpuid2(ctypes.Structure):
        _fields_ = [
            ("nent", c_uint32),
            ("padding", c_uint32),
            ("entries", kvm_cpuid_entry2 * entries),
        ]

    out = _cpuid2()
    out.nent = entries
    return out


def make_msrs(pairs: list[tuple[int, int]]) -> Any:
    """A ``kvm_msrs`` instance holding ``(index, value)`` pairs."""

    class _msrs(ctypes.Structure):
        _fields_ = [
            ("nmsrs", c_uint32),
            ("pad", c_uint32),
            ("entries", kvm_msr_entry * len(pairs)),
        ]

    out = _msrs()
    out.nmsrs = len(pairs)
    for i, (index, value) in enumerate(pairs):
        out.entries[i].index = index
        out.entries[i].data = value
    return out


# --- constants ---------------------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_REASON_NAMES = {
    value: name[len("KVM_EXIT_") :].lower()
    for name, value in dict(globals()).items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
MP_STATE_NAMES = {0: "runnable", 1: "uninitialized", 2: "init-received", 3: "halted",
                  4: "sipi-received"}

KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0
KVM_STATS_TYPE_INSTANT = 1
KVM_STATS_TYPE_PEAK = 2

KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT2 = 33
KVM_CAP_IRQFD = 32
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_XCRS = 56
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_X86_DISABLE_EXITS_HLT = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2

# --- request numbers ---------------------------------------------------------

KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
KVM_IRQ_LINE = IOW(KVMIO, 0x61, kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = IOW(KVMIO, 0x67, kvm_coalesced_mmio_zone)
KVM_IRQFD = IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_XCRS = IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_GET_STATS_FD = IO(KVMIO, 0xCE)
KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_PRE_FAULT_MEMORY = IOWR(KVMIO, 0xD5, kvm_pre_fault_memory)
KVM_GET_MP_STATE = IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = IOW(KVMIO, 0x99, kvm_mp_state)

REQUEST_NAMES = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_") and isinstance(value, int) and (value >> 8) & 0xFF == KVMIO
}

# --- libc --------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

run_ioctl = _libc.ioctl
"""A separate libc ``ioctl`` handle for the KVM_RUN hot path: ``(fd, request, 0)``, all ints
(cheaper argument conversion than the pointer-typed one); errno via ``ctypes.get_errno``."""
run_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
run_ioctl.restype = ctypes.c_int


class KvmIoctlError(OSError):
    """An ioctl on a KVM fd failed; the message names the request and the fd's role."""


def _request_name(request: int) -> str:
    return REQUEST_NAMES.get(request, f"ioctl 0x{request:x}")


class KvmFd:
    """An owned fd with errno-rich ioctls. ``close()`` is idempotent."""

    def __init__(self, fd: int, what: str) -> None:
        self.fd = fd
        self.what = what

    def ioctl(self, request: int, arg: Any = None) -> int:
        if self.fd < 0:
            raise KvmIoctlError(errno.EBADF, f"{_request_name(request)} on closed {self.what}")
        if arg is None:
            ptr: int | None = 0
        elif isinstance(arg, int):
            ptr = arg
        else:
            ptr = ctypes.addressof(arg)
        ret = _ioctl(self.fd, request, ptr)
        if ret < 0:
            err = ctypes.get_errno()
            raise KvmIoctlError(
                err,
                f"{_request_name(request)} on {self.what} failed: "
                f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})",
            )
        return ret

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> KvmFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Kvm(KvmFd):
    """``/dev/kvm``: the system fd."""

    def __init__(self, path: str = KVM_DEV) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KtstrError(
                f"{path} does not exist: load kvm_intel/kvm_amd, or use --sandbox"
            ) from None
        except PermissionError:
            raise KtstrError(
                f"{path}: permission denied; add yourself to the kvm group or run as root"
            ) from None
        super().__init__(fd, path)
        version = self.ioctl(KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            self.close()
            raise KtstrError(f"{path}: KVM API version {version}, need {KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return self.ioctl(KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self.ioctl(KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[kvm_cpuid_entry2]:
        nent = 256
        while True:
            buf = make_cpuid2(nent)
            try:
                self.ioctl(KVM_GET_SUPPORTED_CPUID, buf)
            except KvmIoctlError as err:
                if err.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def create_vm(self) -> VmFd:
        return VmFd(self.ioctl(KVM_CREATE_VM, 0), "vm fd")


class VmFd(KvmFd):
    def set_tss_addr(self, addr: int) -> None:
        self.ioctl(KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        self.ioctl(KVM_SET_IDENTITY_MAP_ADDR, c_uint64(addr))

    def create_irqchip(self) -> None:
        self.ioctl(KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        self.ioctl(KVM_CREATE_PIT2, kvm_pit_config(flags=flags))

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, hva: int, flags: int = 0
    ) -> None:
        self.ioctl(
            KVM_SET_USER_MEMORY_REGION,
            kvm_userspace_memory_region(
                slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva
            ),
        )

    def register_coalesced(self, addr: int, size: int, *, pio: bool) -> None:
        """Let KVM queue guest writes to this range in the coalesced ring instead of exiting."""
        self.ioctl(
            KVM_REGISTER_COALESCED_MMIO,
            kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio)),
        )

    def irq_line(self, irq: int, level: bool) -> None:
        self.ioctl(KVM_IRQ_LINE, kvm_irq_level(irq=irq, level=int(level)))

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        flags = KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        self.ioctl(KVM_IRQFD, kvm_irqfd(fd=fd, gsi=gsi, flags=flags))

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        self.ioctl(
            KVM_IOEVENTFD,
            kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags),
        )

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        return VcpuFd(self.ioctl(KVM_CREATE_VCPU, vcpu_id), f"vcpu {vcpu_id} fd")

    def enable_cap(self, cap: int, *args: int) -> None:
        request = kvm_enable_cap(cap=cap)
        for i, value in enumerate(args):
            request.args[i] = value
        self.ioctl(KVM_ENABLE_CAP, request)


class VcpuFd(KvmFd):
    def run(self) -> int:
        return self.ioctl(KVM_RUN)

    def map_run(self, size: int) -> mmap.mmap:
        return mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def get_regs(self) -> kvm_regs:
        regs = kvm_regs()
        self.ioctl(KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        self.ioctl(KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        sregs = kvm_sregs()
        self.ioctl(KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        self.ioctl(KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        fpu = kvm_fpu()
        self.ioctl(KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: kvm_fpu) -> None:
        self.ioctl(KVM_SET_FPU, fpu)

    def set_msrs(self, pairs: list[tuple[int, int]]) -> None:
        done = self.ioctl(KVM_SET_MSRS, make_msrs(pairs))
        if done != len(pairs):
            bad = pairs[done]
            raise KvmIoctlError(
                errno.EINVAL, f"KVM_SET_MSRS on {self.what}: MSR 0x{bad[0]:x} rejected"
            )

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = make_msrs([(i, 0) for i in indices])
        done = self.ioctl(KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def set_cpuid2(self, entries: list[kvm_cpuid_entry2]) -> None:
        buf = make_cpuid2(len(entries))
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        self.ioctl(KVM_SET_CPUID2, buf)

    def get_lapic(self) -> kvm_lapic_state:
        state = kvm_lapic_state()
        self.ioctl(KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: kvm_lapic_state) -> None:
        self.ioctl(KVM_SET_LAPIC, state)

    def get_xcrs(self) -> dict[int, int]:
        buf = kvm_xcrs()
        self.ioctl(KVM_GET_XCRS, buf)
        return {buf.xcrs[i].xcr: buf.xcrs[i].value for i in range(buf.nr_xcrs)}

    def set_xcrs(self, values: dict[int, int]) -> None:
        buf = kvm_xcrs(nr_xcrs=len(values))
        for i, (xcr, value) in enumerate(sorted(values.items())):
            buf.xcrs[i].xcr = xcr
            buf.xcrs[i].value = value
        self.ioctl(KVM_SET_XCRS, buf)

    def get_mp_state(self) -> int:
        state = kvm_mp_state()
        self.ioctl(KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, value: int) -> None:
        self.ioctl(KVM_SET_MP_STATE, kvm_mp_state(mp_state=value))

    def pre_fault_memory(self, gpa: int, size: int) -> None:
        """Map ``gpa..gpa+size`` in KVM's stage-2 (NPT/EPT) tables now, not on first touch.

        The ioctl maps part of the range per call and updates the struct to the rest
        (EINTR/EAGAIN: call again)."""
        req = kvm_pre_fault_memory(gpa=gpa, size=size)
        while req.size:
            try:
                self.ioctl(KVM_PRE_FAULT_MEMORY, req)
            except KvmIoctlError as err:
                if err.errno not in (errno.EINTR, errno.EAGAIN):
                    raise

    def stats_fd(self) -> int:
        """A new read-only fd of this vCPU's binary stats (readable from any thread)."""
        return self.ioctl(KVM_GET_STATS_FD)


def exit_reason_name(reason: int) -> str:
    return EXIT_REASON_NAMES.get(reason, f"exit_{reason}")
