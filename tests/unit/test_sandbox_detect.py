"""KVM usability verdicts, from real files and devices."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ktstr.sandbox.detect import KVM_DEVICE, MIN_GUEST_MIPS, PVM_MODULE, detect_kvm, in_sandbox


def test_missing_device(tmp_path: Path) -> None:
    status = detect_kvm(device=tmp_path / "kvm")
    assert not status.usable
    assert "does not exist" in status.reason


def test_not_a_kvm_device(tmp_path: Path) -> None:
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    status = detect_kvm(device=fake)
    assert not status.usable
    assert "KVM_GET_API_VERSION" in status.reason


def test_unwritable_device(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can open any file read-write")
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    fake.chmod(0o400)
    status = detect_kvm(device=fake)
    assert not status.usable and "not writable" in status.reason


@pytest.mark.skipif(not os.access(KVM_DEVICE, os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_real_device_verdict_matches_pvm_module(tmp_path: Path) -> None:
    status = detect_kvm(probe=False)
    if PVM_MODULE.exists():
        assert not status.usable and status.paravirtual and "kvm_pvm" in status.reason
    else:
        assert status.usable
    # The same device with the module marker pointed elsewhere passes the static checks.
    status = detect_kvm(probe=False, pvm_module=tmp_path / "absent")
    assert status.usable and "usable" in status.reason


def test_in_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTSTR_IN_SANDBOX", "1")
    assert in_sandbox()
    monkeypatch.delenv("KTSTR_IN_SANDBOX")
    assert not in_sandbox()


@pytest.mark.kvm
@pytest.mark.skipif(not os.access(KVM_DEVICE, os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_throughput_probe_decides_when_the_module_check_passes(tmp_path: Path) -> None:
    status = detect_kvm(pvm_module=tmp_path / "absent")
    assert status.mips is not None and status.mips > 0
    assert status.usable == (status.mips >= MIN_GUEST_MIPS)
    assert ("too slow" in status.reason) != status.usable
