"""Long-mode entry state: GDT descriptors, KVM segments, identity page tables."""

from __future__ import annotations

import os
import struct

import pytest

from ktstr.vmm import layout
from ktstr.vmm.x86 import regs


def test_gdt_descriptors_match_the_well_known_encodings() -> None:
    assert regs.GDT_CODE64 == 0x00AF9B000000FFFF
    assert regs.GDT_DATA == 0x00CF93000000FFFF
    assert regs.GDT_TSS == 0x008F8B000000FFFF
    data = regs.gdt_bytes()
    assert len(data) == 8 * len(regs.GDT) <= layout.GDT_MAX_SIZE
    entries = struct.unpack(f"<{len(regs.GDT)}Q", data)
    assert entries[0] == 0
    # The boot protocol's selectors: __BOOT_CS 0x10, __BOOT_DS 0x18.
    assert entries[regs.CODE_SELECTOR // 8] == regs.GDT_CODE64
    assert entries[regs.DATA_SELECTOR // 8] == regs.GDT_DATA
    assert regs.CODE_SELECTOR == 0x10 and regs.DATA_SELECTOR == 0x18


def test_gdt_entry_roundtrip_with_base() -> None:
    entry = regs.gdt_entry(0x4093, 0x12345678, 0xABCDE)
    seg = regs.Segment.from_gdt(entry, 0x28)
    assert seg.base == 0x12345678
    assert seg.limit == 0xABCDE  # G=0: byte granular
    assert (seg.type, seg.s, seg.present, seg.db, seg.l, seg.g) == (3, 1, 1, 1, 0, 0)


def test_segments_derived_from_gdt() -> None:
    cs = regs.Segment.code64()
    assert (cs.selector, cs.type, cs.l, cs.db, cs.s, cs.present, cs.dpl, cs.g) == (
        0x10,
        11,
        1,
        0,
        1,
        1,
        0,
        1,
    )
    assert cs.limit == 0xFFFFFFFF and cs.base == 0
    ds = regs.Segment.data64()
    assert (ds.selector, ds.type, ds.l, ds.db, ds.s) == (0x18, 3, 0, 1, 1)
    tr = regs.Segment.tss()
    assert (tr.selector, tr.type, tr.s, tr.present) == (0x20, 11, 0, 1)
    assert regs.Segment.unusable_ldt().unusable == 1


def test_long_mode_state() -> None:
    state = regs.LongModeState()
    assert state.cr0 & (regs.CR0_PE | regs.CR0_PG) == regs.CR0_PE | regs.CR0_PG
    assert state.cr0 & 0x80000001 == 0x80000001
    assert state.cr4 & regs.CR4_PAE
    assert state.efer == 0x500
    assert state.cr3 == layout.PAGE_TABLES_ADDR
    assert state.gdt_base == layout.GDT_ADDR and state.gdt_limit == len(regs.gdt_bytes()) - 1
    assert state.idt_base == layout.IDT_ADDR and state.idt_limit == layout.IDT_SIZE - 1
    assert state.cs == regs.Segment.code64()
    assert all(seg == regs.Segment.data64() for seg in (state.ds, state.es, state.ss))


def test_boot_regs() -> None:
    r = regs.boot_regs(regs.entry_point(), layout.ZERO_PAGE_ADDR)
    assert r.rip == 0x100200
    assert r.rsi == 0x7000
    assert r.rflags == 2
    assert r.rsp == layout.BOOT_STACK_TOP
    assert regs.boot_regs().rip == 0x100200


def _walk(tables: bytes, base: int, vaddr: int) -> int:
    """Translate ``vaddr`` through tables that were written at ``base``."""

    def entry(table_addr: int, index: int) -> int:
        off = table_addr - base + index * 8
        assert 0 <= off < len(tables), f"table at {table_addr:#x} outside the blob"
        (value,) = struct.unpack_from("<Q", tables, off)
        assert value & regs.PTE_PRESENT, f"not present at {table_addr:#x}[{index}]"
        return int(value)

    pml4e = entry(base, (vaddr >> 39) & 0x1FF)
    pdpte = entry(pml4e & 0xFFFFFFFFF000, (vaddr >> 30) & 0x1FF)
    assert not pdpte & regs.PTE_PS
    pde = entry(pdpte & 0xFFFFFFFFF000, (vaddr >> 21) & 0x1FF)
    assert pde & regs.PTE_PS and pde & regs.PTE_WRITE
    return (pde & 0xFFFFFFE00000) | (vaddr & 0x1FFFFF)


def test_identity_page_tables_map_first_gib() -> None:
    base = layout.PAGE_TABLES_ADDR
    tables = regs.identity_page_tables(base)
    assert base + len(tables) <= layout.PAGE_TABLES_END
    for vaddr in range(0, 1 << 30, 2 * layout.MiB):
        assert _walk(tables, base, vaddr) == vaddr
        assert _walk(tables, base, vaddr + 0x1234) == vaddr + 0x1234
    # The default map also covers all of low RAM up to 4 GiB.
    top = (4 << 30) - 2 * layout.MiB
    assert _walk(tables, base, top) == top


def test_identity_page_tables_elsewhere_and_smaller() -> None:
    tables = regs.identity_page_tables(0x40000, gib=1)
    assert len(tables) == 3 * 0x1000
    assert _walk(tables, 0x40000, 0x3FE00000) == 0x3FE00000


# A 64-bit program at the kernel entry point: read a qword near the top of the first
# GiB through the identity map, report it and RSI on the exit-code port, halt.
#   mov rax, [0x3ffff000]; mov dx, EXIT_PORT; out dx, eax; mov eax, esi; out dx, eax;
#   mov eax, ss; out dx, eax; hlt
PROBE = 0xCAFEBABE
PROGRAM = (
    bytes.fromhex("488b042500f0ff3f")
    + b"\x66\xba"
    + layout.EXIT_PORT.to_bytes(2, "little")
    + bytes.fromhex("ef89f0ef8cd0eff4")
)


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_entry_state_runs_under_kvm() -> None:
    """The GDT, segments, page tables and registers really put a vCPU in long mode."""
    import ctypes

    from ktstr.vmm import kvm
    from ktstr.vmm.memory import GuestMemory
    from ktstr.vmm.x86.boot import set_boot_state

    dev = kvm.Kvm()
    vm = dev.create_vm()
    with dev, vm, GuestMemory([(0, 1 << 30)]) as mem:
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        mem.register(vm)
        mem.write(layout.GDT_ADDR, regs.gdt_bytes())
        mem.write(layout.PAGE_TABLES_ADDR, regs.identity_page_tables())
        mem.write(regs.entry_point(), PROGRAM)
        mem.write(0x3FFFF000, PROBE.to_bytes(8, "little"))
        vcpu = vm.create_vcpu(0)
        with vcpu:
            set_boot_state(vcpu)  # the boot vCPU's state, exactly as Vm sets it
            run_map = vcpu.map_run(dev.vcpu_mmap_size())
            seen: list[int] = []
            try:
                for _ in range(10):
                    vcpu.run()
                    run = kvm.kvm_run.from_buffer_copy(run_map[: ctypes.sizeof(kvm.kvm_run)])
                    if run.exit_reason == kvm.KVM_EXIT_HLT:
                        break
                    assert run.exit_reason == kvm.KVM_EXIT_IO, kvm.exit_reason_name(run.exit_reason)
                    io = run.u.io
                    assert (io.port, io.size, io.direction) == (layout.EXIT_PORT, 4, 1)
                    off = io.data_offset
                    seen.append(int.from_bytes(run_map[off : off + 4], "little"))
            finally:
                run_map.close()
    assert seen == [PROBE, layout.ZERO_PAGE_ADDR, regs.DATA_SELECTOR]
