"""Is this KVM fast enough to boot Linux? Measure a tiny guest's instruction rate.

A hardware KVM runs a ``dec ecx; jnz`` loop at thousands of M instructions/s;
a KVM that emulates ordinary guests instruction by instruction (``kvm_pvm``)
manages a few. The loop runs in real mode, so no page tables or GDT are needed.

A client of the VMM (one :class:`~ktstr.vmm.machine.Machine`, one vCPU) beside it, not
in it: :mod:`ktstr.sandbox.detect` loads it without importing the VMM itself.
"""

from __future__ import annotations

from ktstr.vmm import kvm
from ktstr.vmm.machine import Machine

LOAD_ADDR = 0x1000
LOOP_START = 0xFFFF_FFFF
# 16-bit code: mov ecx, 0xffffffff; 1: dec ecx; jnz 1b; hlt
LOOP_CODE = bytes.fromhex("66B9FFFFFFFF664975FCF4")
INSTRUCTIONS_PER_ITERATION = 2


def measure_guest_mips(seconds: float = 0.2) -> float:
    """Million guest instructions per second the loop reached in ``seconds``."""
    with Machine([(0, 0x10000)], irqchip=False) as machine:
        assert machine.memory is not None
        machine.memory.write(LOAD_ADDR, LOOP_CODE)
        vcpu = machine.add_vcpu(0)
        sregs = vcpu.fd.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        vcpu.fd.set_sregs(sregs)
        regs = kvm.kvm_regs()
        regs.rip = LOAD_ADDR
        regs.rflags = 2
        vcpu.fd.set_regs(regs)
        outcome = machine.run(seconds)
        if outcome.error:
            raise RuntimeError(f"throughput probe failed: {outcome.error}")
        ecx = vcpu.fd.get_regs().rcx & 0xFFFF_FFFF
    iterations = LOOP_START - ecx if ecx else LOOP_START
    return iterations * INSTRUCTIONS_PER_ITERATION / max(outcome.duration_s, 1e-6) / 1e6
