"""The vCPU state the Linux 64-bit boot protocol expects, set through KVM on the boot vCPU.

Long mode at the kernel's 64-bit entry (segments, paging and registers from
:mod:`ktstr.vmm.x86.regs`), the MSRs firmware would leave, and the LAPIC LVTs
as firmware programs them.
"""

from __future__ import annotations

import ctypes

from ktstr.vmm import kvm
from ktstr.vmm.x86 import regs as x86regs

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


def set_lapic_lvts(fd: kvm.VcpuFd) -> None:
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


def set_boot_state(fd: kvm.VcpuFd) -> None:
    """Long mode at the kernel's 64-bit entry, per the Linux boot protocol."""
    lm = x86regs.long_mode_state()
    br = x86regs.boot_regs()
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
