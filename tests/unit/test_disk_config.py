"""DiskConfig / DiskThrottle validation: every bad declaration is one clear KtstrError."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktstr.disks.config import (
    DiskConfig,
    DiskThrottle,
    Filesystem,
    mount_specs,
    validate_disks,
)
from ktstr.errors import KtstrError
from ktstr.wire.disks import device_name, disk_serial


def test_defaults_match_reference() -> None:
    d = DiskConfig()
    assert (d.capacity_mb, d.filesystem, d.read_only, d.name, d.no_auto_mount) == (
        256,
        Filesystem.RAW,
        False,
        None,
        False,
    )
    assert d.throttle == DiskThrottle()
    assert not d.throttle.active
    assert validate_disks(d) == [d]
    assert validate_disks(None) == []


@pytest.mark.parametrize(
    ("throttle", "message"),
    [
        (DiskThrottle(iops=100, iops_burst_capacity=50), "iops_burst_capacity=50 is smaller"),
        (DiskThrottle(bytes_per_sec=1 << 20, bytes_burst_capacity=1000), "smaller than"),
        (DiskThrottle(iops_burst_capacity=10), "set without iops"),
        (DiskThrottle(iops=0, iops_burst_capacity=10), "set without iops"),
        (DiskThrottle(bytes_burst_capacity=10), "set without bytes_per_sec"),
        (DiskThrottle(iops=-1), "non-negative integer"),
        (DiskThrottle(iops=1.5), "non-negative integer"),  # type: ignore[arg-type]
        (DiskThrottle(bytes_per_sec=True), "non-negative integer"),  # type: ignore[arg-type]
    ],
)
def test_bad_throttles(throttle: DiskThrottle, message: str) -> None:
    with pytest.raises(KtstrError, match=message) as exc:
        DiskConfig(throttle=throttle).validate()
    assert "\n" not in str(exc.value)


def test_throttle_effective_values() -> None:
    assert DiskThrottle(iops=0).effective_iops is None  # 0 clears the limit
    assert not DiskThrottle(iops=0, bytes_per_sec=0).active
    assert DiskThrottle(iops=100).effective_iops == (100, 100)  # burst defaults to 1 s
    t = DiskThrottle(iops=100, iops_burst_capacity=250, bytes_per_sec=4096)
    t.validate()
    assert t.effective_iops == (100, 250)
    assert t.effective_bytes == (4096, 4096)
    DiskThrottle(iops=100, iops_burst_capacity=100).validate()  # burst == rate is fine


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (DiskConfig(capacity_mb=0), "positive integer"),
        (DiskConfig(capacity_mb=-5), "positive integer"),
        (DiskConfig(capacity_mb=1.5), "positive integer"),  # type: ignore[arg-type]
        (DiskConfig(capacity_mb=256 << 20), "exceeds"),
        (DiskConfig(capacity_mb=64, filesystem=Filesystem.BTRFS), "too small for btrfs"),
        (DiskConfig(filesystem="btrfs"), "not a Filesystem"),  # type: ignore[arg-type]
        (DiskConfig(name="a/b"), "not a valid mount directory name"),
        (DiskConfig(name=".."), "not a valid"),
        (DiskConfig(name=""), "not a valid"),
        (DiskConfig(name="-x"), "not a valid"),
        (DiskConfig(name="x" * 65), "not a valid"),
        (DiskConfig(name="a b"), "not a valid"),
        (DiskConfig(throttle=None), "not a DiskThrottle"),  # type: ignore[arg-type]
    ],
)
def test_bad_configs(config: DiskConfig, message: str) -> None:
    with pytest.raises(KtstrError, match=message) as exc:
        validate_disks([config])
    assert "\n" not in str(exc.value)


def test_minimum_btrfs_is_accepted() -> None:
    DiskConfig(capacity_mb=110, filesystem=Filesystem.BTRFS).validate()
    DiskConfig(capacity_mb=1).validate()


def test_unique_names() -> None:
    with pytest.raises(KtstrError, match="both mount as /mnt/data"):
        validate_disks([DiskConfig(name="data"), DiskConfig(name="data")])
    # An explicit name may not collide with another disk's default label either.
    with pytest.raises(KtstrError, match="/mnt/disk1"):
        validate_disks([DiskConfig(name="disk1"), DiskConfig()])
    assert len(validate_disks([DiskConfig(), DiskConfig(), DiskConfig(name="x")])) == 3


def test_not_a_diskconfig() -> None:
    with pytest.raises(KtstrError, match="is not a DiskConfig"):
        validate_disks([DiskConfig(), "disk"])  # type: ignore[list-item]
    with pytest.raises(KtstrError, match="at most 16"):
        validate_disks([DiskConfig()] * 17)


def test_device_names() -> None:
    assert [device_name(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]


def test_mount_specs() -> None:
    disks = [
        DiskConfig(filesystem=Filesystem.BTRFS),
        DiskConfig(name="scratch", filesystem=Filesystem.EXT4, read_only=True),
        DiskConfig(filesystem=Filesystem.BTRFS, no_auto_mount=True),
        DiskConfig(),  # RAW: nothing to mount
    ]
    assert mount_specs(validate_disks(disks)) == [
        {"device": "/dev/vda", "mountpoint": "/mnt/disk0", "fstype": "btrfs", "options": ""},
        {"device": "/dev/vdb", "mountpoint": "/mnt/scratch", "fstype": "ext4", "options": "ro"},
    ]
    assert len({disk_serial(i) for i in range(16)}) == 16
    assert all(len(disk_serial(i)) <= 20 for i in range(16))


def test_guest_device_index_inverts_device_name() -> None:
    from ktstr.wire.disks import disk_index

    for i in range(0, 800, 7):
        assert disk_index(f"/dev/{device_name(i)}") == i
    with pytest.raises(ValueError):
        disk_index("/dev/sda")


def test_guest_resolves_device_by_serial(tmp_path: Path) -> None:
    """Disks probed out of order: the spec's /dev/vda is found where its serial is."""
    from ktstr.guest.disks import resolve_device, serials

    sys_block, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    for name, serial in (("vda", disk_serial(1)), ("vdb", disk_serial(0))):
        (sys_block / name).mkdir(parents=True)
        (sys_block / name / "serial").write_text(serial)
        (dev / name).touch()
    assert serials(sys_block) == {disk_serial(1): "vda", disk_serial(0): "vdb"}
    assert resolve_device("/dev/vda", 1.0, sys_block, dev) == str(dev / "vdb")
    assert resolve_device("/dev/vdb", 1.0, sys_block, dev) == str(dev / "vda")
    with pytest.raises(OSError, match="did not appear"):
        resolve_device("/dev/vdc", 0.05, sys_block, dev)
