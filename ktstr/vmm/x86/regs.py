"""Long-mode entry state for the 64-bit boot: GDT, segments, identity paging, registers.

The Linux 64-bit boot protocol wants: paging on with an identity map covering
the kernel and boot data, a GDT with flat ``__BOOT_CS`` (selector 0x10) and
``__BOOT_DS`` (0x18), CS/DS/ES/SS loaded from them, RSI -> boot_params, interrupts
off. The segment registers KVM takes (``kvm_segment``) are derived from the same
GDT descriptors the guest sees, so the cached and in-memory state agree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ktstr.errors import KtstrError
from ktstr.vmm import layout


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a segment descriptor. ``flags`` is the 16-bit access/flags word as in
    the descriptor (bits 0-7 access byte, 12-15 AVL/L/DB/G), ``limit`` the raw 20 bits."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
    )


GDT_NULL = 0
GDT_CODE64 = gdt_entry(0xA09B, 0, 0xFFFFF)
"""Present, DPL 0, code exec/read accessed, L=1, G=1."""
GDT_DATA = gdt_entry(0xC093, 0, 0xFFFFF)
"""Present, DPL 0, data read/write accessed, D/B=1, G=1."""
GDT_TSS = gdt_entry(0x808B, 0, 0xFFFFF)
"""Busy 64-bit TSS: only TR's cached state uses it (VM entry requires a usable TR)."""

GDT: tuple[int, ...] = (GDT_NULL, GDT_NULL, GDT_CODE64, GDT_DATA, GDT_TSS)
"""Index 2/3 give the selectors the boot protocol names: __BOOT_CS 0x10, __BOOT_DS 0x18."""
CODE_SELECTOR = 2 * 8
DATA_SELECTOR = 3 * 8
TSS_SELECTOR = 4 * 8


def gdt_bytes() -> bytes:
    """The GDT as written to ``layout.GDT_ADDR``."""
    data = struct.pack(f"<{len(GDT)}Q", *GDT)
    assert len(data) <= layout.GDT_MAX_SIZE
    return data


@dataclass(frozen=True)
class Segment:
    """The fields of ``struct kvm_segment`` (limit in bytes, flags as 0/1 ints)."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name of the long-mode bit
    g: int
    avl: int
    unusable: int = 0

    @classmethod
    def from_gdt(cls, entry: int, selector: int) -> Segment:
        """The hidden segment state a load of ``selector`` would produce."""
        g = (entry >> 55) & 1
        limit = ((entry >> 32) & 0xF0000) | (entry & 0xFFFF)
        if g:
            limit = (limit << 12) | 0xFFF
        return cls(
            base=((entry >> 32) & 0xFF000000) | ((entry >> 16) & 0xFFFFFF),
            limit=limit,
            selector=selector,
            type=(entry >> 40) & 0xF,
            present=(entry >> 47) & 1,
            dpl=(entry >> 45) & 3,
            db=(entry >> 54) & 1,
            s=(entry >> 44) & 1,
            l=(entry >> 53) & 1,
            g=g,
            avl=(entry >> 52) & 1,
        )

    @classmethod
    def code64(cls) -> Segment:
        return cls.from_gdt(GDT_CODE64, CODE_SELECTOR)

    @classmethod
    def data64(cls) -> Segment:
        return cls.from_gdt(GDT_DATA, DATA_SELECTOR)

    @classmethod
    def tss(cls) -> Segment:
        return cls.from_gdt(GDT_TSS, TSS_SELECTOR)

    @classmethod
    def unusable_ldt(cls) -> Segment:
        """LDTR: no LDT (type 2 = LDT, marked unusable)."""
        return cls(0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, unusable=1)


# --- paging ---------------------------------------------------------------------------------

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7
"""Page-size bit: a PD entry maps a 2 MiB page."""
LARGE_PAGE = 2 * layout.MiB
IDENTITY_MAP_GIB = 4
"""The boot map covers 0..4 GiB: kernel, boot data, initrd anywhere in low RAM."""


def identity_page_tables(base: int = layout.PAGE_TABLES_ADDR, gib: int = IDENTITY_MAP_GIB) -> bytes:
    """PML4, PDPT and ``gib`` page directories identity-mapping ``gib`` GiB with 2 MiB
    pages, laid out contiguously from ``base`` (page aligned). Write them at ``base``
    and load CR3 with ``base``."""
    if base % layout.PAGE_SIZE:
        raise KtstrError(f"page tables must be page aligned, got {base:#x}")
    if not 1 <= gib <= 512:
        raise KtstrError(f"identity map size must be 1..512 GiB, got {gib}")
    pages = 2 + gib
    if base + pages * layout.PAGE_SIZE > layout.PAGE_TABLES_END and base == layout.PAGE_TABLES_ADDR:
        raise KtstrError(f"{gib} GiB of page tables do not fit the layout's page-table area")
    pml4 = bytearray(layout.PAGE_SIZE)
    pdpt = bytearray(layout.PAGE_SIZE)
    pdpt_addr = base + layout.PAGE_SIZE
    struct.pack_into("<Q", pml4, 0, pdpt_addr | PTE_PRESENT | PTE_WRITE)
    pds = bytearray(gib * layout.PAGE_SIZE)
    for i in range(gib):
        pd_addr = base + (2 + i) * layout.PAGE_SIZE
        struct.pack_into("<Q", pdpt, i * 8, pd_addr | PTE_PRESENT | PTE_WRITE)
    for j in range(gib * 512):
        struct.pack_into("<Q", pds, j * 8, j * LARGE_PAGE | PTE_PRESENT | PTE_WRITE | PTE_PS)
    return bytes(pml4 + pdpt + pds)


# --- control registers and the entry state ----------------------------------------------

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

RFLAGS_RESERVED = 1 << 1
"""Bit 1 of RFLAGS always reads as 1; interrupts stay disabled (IF=0)."""


@dataclass(frozen=True)
class LongModeState:
    """What the runtime puts into ``kvm_sregs`` for the boot vCPU."""

    cr0: int = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    cr3: int = layout.PAGE_TABLES_ADDR
    cr4: int = CR4_PAE
    efer: int = EFER_LME | EFER_LMA
    gdt_base: int = layout.GDT_ADDR
    gdt_limit: int = len(GDT) * 8 - 1
    idt_base: int = layout.IDT_ADDR
    idt_limit: int = layout.IDT_SIZE - 1
    cs: Segment = field(default_factory=Segment.code64)
    ds: Segment = field(default_factory=Segment.data64)
    es: Segment = field(default_factory=Segment.data64)
    fs: Segment = field(default_factory=Segment.data64)
    gs: Segment = field(default_factory=Segment.data64)
    ss: Segment = field(default_factory=Segment.data64)
    tr: Segment = field(default_factory=Segment.tss)
    ldt: Segment = field(default_factory=Segment.unusable_ldt)


def long_mode_state(page_tables: int = layout.PAGE_TABLES_ADDR) -> LongModeState:
    return LongModeState(cr3=page_tables)


@dataclass(frozen=True)
class BootRegs:
    """What the runtime puts into ``kvm_regs`` for the boot vCPU (others are zero)."""

    rip: int
    rsi: int
    rsp: int
    rbp: int
    rflags: int = RFLAGS_RESERVED


def entry_point(load_addr: int = layout.KERNEL_LOAD_ADDR) -> int:
    """The 64-bit entry: ``startup_64`` sits 0x200 into the protected-mode payload."""
    return load_addr + layout.KERNEL_ENTRY_64_OFFSET


def boot_regs(entry: int | None = None, boot_params: int = layout.ZERO_PAGE_ADDR) -> BootRegs:
    """RIP at the 64-bit entry, RSI -> zero page, RSP/RBP at the boot stack, RFLAGS 2."""
    rip = entry_point() if entry is None else entry
    return BootRegs(rip=rip, rsi=boot_params, rsp=layout.BOOT_STACK_TOP, rbp=layout.BOOT_STACK_TOP)
