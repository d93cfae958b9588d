"""The KVM ABI layouts in ktstr.vmm.kvm match <linux/kvm.h> (x86_64)."""

from __future__ import annotations

import ctypes

import pytest

from ktstr.vmm import kvm


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (kvm.kvm_regs, 144),
        (kvm.kvm_segment, 24),
        (kvm.kvm_dtable, 16),
        (kvm.kvm_sregs, 312),
        (kvm.kvm_fpu, 416),
        (kvm.kvm_msr_entry, 16),
        (kvm.kvm_msrs, 8),
        (kvm.kvm_cpuid_entry2, 40),
        (kvm.kvm_cpuid2, 8),
        (kvm.kvm_userspace_memory_region, 32),
        (kvm.kvm_pit_config, 64),
        (kvm.kvm_irq_level, 8),
        (kvm.kvm_irqfd, 32),
        (kvm.kvm_ioeventfd, 64),
        (kvm.kvm_lapic_state, 1024),
        (kvm.kvm_mp_state, 4),
    ],
)
def test_struct_sizes(struct: type, size: int) -> None:
    assert ctypes.sizeof(struct) == size


def test_kvm_run_offsets() -> None:
    run = kvm.kvm_run
    assert run.request_interrupt_window.offset == 0
    assert run.immediate_exit.offset == 1
    assert run.exit_reason.offset == 8
    assert run.cr8.offset == 16
    assert run.apic_base.offset == 24
    assert run.u.offset == 32
    assert ctypes.sizeof(kvm._exit_union) == 256
    assert run.kvm_valid_regs.offset == 288


def test_exit_union_members() -> None:
    io = kvm._exit_io
    assert (io.direction.offset, io.size.offset, io.port.offset) == (0, 1, 2)
    assert (io.count.offset, io.data_offset.offset) == (4, 8)
    mmio = kvm._exit_mmio
    assert (mmio.phys_addr.offset, mmio.data.offset, mmio.len.offset) == (0, 8, 16)
    assert mmio.is_write.offset == 20
    assert kvm._exit_fail_entry.cpu.offset == 8
    assert kvm._exit_internal.data.offset == 8
    assert kvm._exit_system_event.data.offset == 8


def test_sregs_field_offsets() -> None:
    s = kvm.kvm_sregs
    assert s.tr.offset == 6 * 24
    assert s.gdt.offset == 8 * 24
    assert s.cr0.offset == 224
    assert s.efer.offset == 224 + 5 * 8
    assert s.interrupt_bitmap.offset == 280


@pytest.mark.parametrize(
    ("request_number", "value"),
    [
        # Values as the C preprocessor computes them from <linux/kvm.h>.
        (kvm.KVM_GET_API_VERSION, 0xAE00),
        (kvm.KVM_CREATE_VM, 0xAE01),
        (kvm.KVM_RUN, 0xAE80),
        (kvm.KVM_GET_SUPPORTED_CPUID, 0xC008AE05),
        (kvm.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),
        (kvm.KVM_GET_REGS, 0x8090AE81),
        (kvm.KVM_SET_SREGS, 0x4138AE84),
        (kvm.KVM_SET_CPUID2, 0x4008AE90),
        (kvm.KVM_CREATE_PIT2, 0x4040AE77),
        (kvm.KVM_IRQ_LINE, 0x4008AE61),
        (kvm.KVM_IRQFD, 0x4020AE76),
        (kvm.KVM_SET_LAPIC, 0x4400AE8F),
        (kvm.KVM_SET_FPU, 0x41A0AE8D),
        (kvm.KVM_SET_MSRS, 0x4008AE89),
        (kvm.KVM_SET_IDENTITY_MAP_ADDR, 0x4008AE48),
    ],
)
def test_request_numbers(request_number: int, value: int) -> None:
    assert request_number == value


def test_variable_length_builders() -> None:
    cpuid = kvm.make_cpuid2(3)
    assert cpuid.nent == 3
    assert ctypes.sizeof(cpuid) == 8 + 3 * 40
    msrs = kvm.make_msrs([(0x10, 5), (0x2FF, 0x806)])
    assert msrs.nmsrs == 2
    assert (msrs.entries[1].index, msrs.entries[1].data) == (0x2FF, 0x806)
    assert ctypes.sizeof(msrs) == 8 + 2 * 16


def test_request_names_cover_the_wrappers() -> None:
    assert kvm.REQUEST_NAMES[kvm.KVM_RUN] == "KVM_RUN"
    assert kvm.exit_reason_name(kvm.KVM_EXIT_IO) == "io"
    assert kvm.exit_reason_name(999) == "exit_999"
