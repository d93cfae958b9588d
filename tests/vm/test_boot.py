"""Boot the test kernel through the in-tree VMM and check the topology the guest sees.

Needs a usable KVM (natively, or run inside the sandbox: ``ktstr sandbox run --
python -m pytest -m vm tests/vm``). The kernel comes from ``$KTSTR_TEST_KERNEL``
(a bzImage path or catalog id), else the catalog's default test kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ktstr.topology import Topology
from ktstr.vmm.cli import (
    INIT_MARKER,
    build_initramfs,
    parse_report,
    topology_expected,
    topology_seen,
)

pytestmark = pytest.mark.vm


def _kvm_usable() -> tuple[bool, str]:
    from ktstr.sandbox.detect import detect_kvm

    status = detect_kvm()
    return status.usable, status.reason


@pytest.fixture(scope="module")
def kernel() -> Path:
    usable, why = _kvm_usable()
    if not usable:
        pytest.skip(f"KVM unusable here ({why}); run inside the sandbox")
    spec = os.environ.get("KTSTR_TEST_KERNEL", "")
    if spec and Path(spec).is_file():
        return Path(spec)
    from ktstr.kernel import resolve_kernel

    return Path(resolve_kernel(spec or "6.12").bzimage)


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("init") / "init.cpio")


@pytest.mark.parametrize("label", ["1n1l2c1t", "2n4l2c2t", "1n3l3c1t"])
def test_guest_sees_the_declared_topology(kernel: Path, initramfs: Path, label: str) -> None:
    from ktstr.vmm.vm import Vm

    topology = Topology.parse(label)
    result = Vm(kernel, initramfs, topology, memory_mb=1024, timeout=120).run()
    assert result.error is None, result.error + "\n" + result.console_tail
    assert result.reason == "poweroff", result.console_tail
    assert result.exit_code == 0
    assert not result.panicked and not result.timed_out
    assert result.boot_ms is not None and 0 < result.boot_ms < result.duration_s * 1000
    assert INIT_MARKER in result.console
    report = parse_report(result.console)
    assert report is not None, result.console_tail
    seen = topology_seen(report)
    want = topology_expected(topology)
    assert seen.cpus == topology.nr_cpus
    assert seen.siblings == want.siblings
    assert seen.llcs == want.llcs
    assert seen.nodes == want.nodes
    apics = sorted(int(c["apic"]) for c in report["cpus"] if c.get("apic"))
    assert apics == sorted(p.apic_id for p in topology.places)
