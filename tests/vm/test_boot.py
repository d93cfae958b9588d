"""Boot the test kernel through the in-tree VMM and check the topology the guest sees.

Needs a usable KVM (natively, or run inside the sandbox: ``ktstr sandbox run --
python -m pytest -m vm tests/vm``). The kernel comes from ``$KTSTR_TEST_KERNEL``
(a bzImage path or catalog id), else ``--ktstr-kernel``/``$KTSTR_KERNEL``, else the
catalog's default test kernel.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

from ktstr.boot import (
    COM2_PROBE,
    INIT_MARKER,
    build_initramfs,
    parse_report,
    topology_expected,
    topology_seen,
)
from ktstr.hostfault import run_vm
from ktstr.topology import Topology

# Nothing here depends on the session's scheduler: a matrix runs it once, with eevdf.
pytestmark = [pytest.mark.vm, pytest.mark.pins_scheduler("eevdf")]

BOOT_COMPLAINTS = re.compile(
    r"WARNING:|BUG:|Oops|ACPI Error|Clockevents: could not|lapic is not functional|"
    r"XSAVE consistency|i8042: Can't|TSC.*unstable"
)
"""Console lines a clean boot of the test kernel on this VMM must not print."""


def _kvm_usable() -> tuple[bool, str]:
    from ktstr.sandbox.detect import detect_kvm

    status = detect_kvm()
    return status.usable, status.reason


def _tsc_deadline_available() -> bool:
    from ktstr.vmm import kvm

    k = kvm.Kvm()
    try:
        return bool(k.check_extension(kvm.KVM_CAP_TSC_DEADLINE_TIMER))
    finally:
        k.close()


@pytest.fixture(scope="module")
def kernel(request: pytest.FixtureRequest) -> Path:
    usable, why = _kvm_usable()
    if not usable:
        pytest.skip(f"KVM unusable here ({why}); run inside the sandbox")
    spec = (
        os.environ.get("KTSTR_TEST_KERNEL")
        or request.config.getoption("ktstr_kernel", default=None)
        or os.environ.get("KTSTR_KERNEL", "")
    )
    if spec and Path(spec).is_file():
        return Path(spec)
    from ktstr.kernel import resolve_kernel

    return Path(resolve_kernel(spec or "6.12").bzimage)


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("init") / "init.cpio")


# 2n2l2c2t: nodes, LLCs and SMT in 8 vCPUs; 1n2l3c1t: 3 cores per LLC, no power of two
# (gaps in the APIC IDs). Boots of 9 and more vCPUs (1n3l3c1t, 2n4l2c2t) triple-fault now
# and then inside the sandbox under QEMU microvm just as under ktstr, and take the sandbox
# itself down (its kernel stops answering, or QEMU exits: twice in a row on 1n3l3c1t in one
# main job): they are measured by benchmarks/boot_stress.py --vmm both, not gated here.
@pytest.mark.parametrize("label", ["1n1l2c1t", "2n2l2c2t", "1n2l3c1t"])
def test_guest_sees_the_declared_topology(kernel: Path, initramfs: Path, label: str) -> None:
    from ktstr.vmm.vm import Vm

    topology = Topology.parse(label)
    result, lost = run_vm(lambda: Vm(kernel, initramfs, topology, memory_mb=1024,
                                     timeout=120).run())
    for fault in lost:
        warnings.warn(f"rerun after a fault of the emulated host: {fault.line()}", stacklevel=1)
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
    # Timers: the TSC-deadline LAPIC timer and kvmclock, so nothing is calibrated.
    want_event = "lapic-deadline" if _tsc_deadline_available() else "lapic"
    assert report["clockevent"] == want_event, result.console_tail
    assert report["clocksource"] == "kvm-clock"
    # The UART IRQ path (interrupt-driven tty write on COM2, IRQ 3).
    assert COM2_PROBE.encode() in result.channel2, result.channel2
    complaints = [line for line in result.console.splitlines() if BOOT_COMPLAINTS.search(line)]
    assert complaints == [], "\n".join(complaints)
    # Exits: none to the i8042 (not probed) and far fewer than one per console byte pair
    # would need if the console polled LSR per byte.
    assert not any(site.endswith(" 0x64") or site.endswith(" 0x60") for site in result.exit_sites)
    assert sum(result.total_exits.values()) < 3 * len(result.console) + 500
