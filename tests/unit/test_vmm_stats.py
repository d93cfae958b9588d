"""KVM binary stats: descriptor parsing (pure) and a real vCPU's stats fd."""

from __future__ import annotations

import ctypes
import os

import pytest

from ktstr.vmm import kvm
from ktstr.vmm.stats import PROGRESS_COUNTERS, VcpuStats, parse_descriptors

NAME_SIZE = 48


def _table(entries: list[tuple[str, int, int, int]]) -> tuple[bytes, bytes]:
    hdr = kvm.kvm_stats_header(flags=0, name_size=NAME_SIZE, num_desc=len(entries),
                               id_offset=24, desc_offset=24 + NAME_SIZE, data_offset=4096)
    descs = b""
    for name, kind, offset, size in entries:
        d = kvm.kvm_stats_desc(flags=kind, exponent=0, size=size, offset=offset, bucket_size=0)
        descs += bytes(d) + name.encode().ljust(NAME_SIZE, b"\0")
    return bytes(hdr), descs


def test_struct_sizes_match_the_uapi() -> None:
    assert ctypes.sizeof(kvm.kvm_stats_header) == 24
    assert ctypes.sizeof(kvm.kvm_stats_desc) == 16


def test_parse_descriptors_names_offsets_kinds() -> None:
    header, descs = _table([("exits", 0, 0, 1), ("blocking", 1, 8, 1), ("hist", 3, 16, 32)])
    data_offset, table = parse_descriptors(header, descs)
    assert data_offset == 4096
    assert table["exits"].offset == 0 and table["exits"].kind == kvm.KVM_STATS_TYPE_CUMULATIVE
    assert table["blocking"].kind == kvm.KVM_STATS_TYPE_INSTANT
    assert table["hist"].size == 32


def test_parse_descriptors_rejects_a_short_table() -> None:
    header, descs = _table([("exits", 0, 0, 1), ("blocking", 1, 8, 1)])
    with pytest.raises(ValueError):
        parse_descriptors(header, descs[:-1])


@pytest.mark.skipif(not os.path.exists(kvm.KVM_DEV), reason="no /dev/kvm on this host")
def test_a_real_vcpu_has_the_progress_counters() -> None:
    k = kvm.Kvm()
    try:
        if not k.check_extension(kvm.KVM_CAP_BINARY_STATS_FD):
            pytest.skip("this KVM has no binary stats")
        vm = k.create_vm()
        vcpu = vm.create_vcpu(0)
        stats = VcpuStats.open(vcpu)
        assert stats is not None
        values = stats.read(PROGRESS_COUNTERS)
        assert set(values) == set(PROGRESS_COUNTERS)
        assert values["irq_injections"] == 0  # never ran
        stats.close()
        vcpu.close()
        vm.close()
    finally:
        k.close()
