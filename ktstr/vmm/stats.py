"""KVM's binary statistics of a vCPU, read from another thread without stopping it.

``KVM_GET_STATS_FD`` (Linux 5.14+) gives a file: a header, descriptors (name,
type, offset) and the counters themselves, which KVM updates in place. Reading
it needs no vCPU mutex, so a watchdog can see whether a vCPU is still taking
interrupts or exits while its thread sits inside ``KVM_RUN`` — the one state in
which the vCPU ioctls (registers, MP state) cannot answer.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ktstr.vmm import kvm

PROGRESS_COUNTERS = ("io_exits", "mmio_exits", "hypercalls", "irq_injections", "halt_wakeup",
                     "nmi_injections")
"""Counters that move while a guest CPU does anything observable: a port or MMIO access,
a hypercall, an interrupt delivered, a wake-up from HLT. Plain ``exits`` is not among them:
host interrupts exit a vCPU that is spinning with interrupts off, so it keeps counting in a
guest that is stuck for good."""

STATE_COUNTERS = ("exits", "blocking", "guest_mode", "halt_exits", "irq_window_exits",
                  "insn_emulation", "insn_emulation_fail", "pf_taken", "signal_exits")
"""Extra counters worth printing when a vCPU looks stuck."""


@dataclass(frozen=True)
class StatDesc:
    name: str
    kind: int
    """``KVM_STATS_TYPE_*``: cumulative, instant, peak, histogram..."""
    offset: int
    """Byte offset of the first value from the data section."""
    size: int
    """Number of u64 values."""


def parse_descriptors(header: bytes, descs: bytes) -> tuple[int, dict[str, StatDesc]]:
    """The data offset and the descriptors by name, from a stats fd's header and table.

    Pure: ``header`` is the ``kvm_stats_header`` bytes, ``descs`` the descriptor table
    (``num_desc`` entries of ``sizeof(kvm_stats_desc) + name_size`` bytes).
    """
    hdr = kvm.kvm_stats_header.from_buffer_copy(header[: ctypes.sizeof(kvm.kvm_stats_header)])
    step = ctypes.sizeof(kvm.kvm_stats_desc) + hdr.name_size
    if hdr.name_size > 4096 or len(descs) < step * hdr.num_desc:
        raise ValueError(f"stats descriptor table too short or odd: {hdr.num_desc} x {step}")
    out: dict[str, StatDesc] = {}
    fixed = ctypes.sizeof(kvm.kvm_stats_desc)
    for i in range(hdr.num_desc):
        raw = descs[i * step : (i + 1) * step]
        d = kvm.kvm_stats_desc.from_buffer_copy(raw[:fixed])
        name = raw[fixed:].split(b"\0", 1)[0].decode("ascii", "replace")
        out[name] = StatDesc(name, d.flags & kvm.KVM_STATS_TYPE_MASK, d.offset, d.size)
    return hdr.data_offset, out


class VcpuStats:
    """One vCPU's stats fd; :meth:`read` returns current values of chosen counters."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        hsize = ctypes.sizeof(kvm.kvm_stats_header)
        header = os.pread(fd, hsize, 0)
        hdr = kvm.kvm_stats_header.from_buffer_copy(header)
        step = ctypes.sizeof(kvm.kvm_stats_desc) + hdr.name_size
        descs = os.pread(fd, step * hdr.num_desc, hdr.desc_offset)
        self.data_offset, self.descs = parse_descriptors(header, descs)
        self._data_len = max((d.offset + 8 * d.size for d in self.descs.values()), default=0)

    @classmethod
    def open(cls, vcpu: kvm.VcpuFd) -> VcpuStats | None:
        """Stats for ``vcpu``, or None where this KVM has no binary stats."""
        try:
            fd = vcpu.stats_fd()
        except OSError:
            return None
        try:
            return cls(fd)
        except (OSError, ValueError):
            os.close(fd)
            return None

    def read(self, names: Iterable[str]) -> dict[str, int]:
        """Current first value of each named counter this KVM has (others are left out)."""
        data = os.pread(self.fd, self._data_len, self.data_offset)
        out: dict[str, int] = {}
        for name in names:
            d = self.descs.get(name)
            if d is not None and d.offset + 8 <= len(data):
                out[name] = struct.unpack_from("<Q", data, d.offset)[0]
        return out

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
