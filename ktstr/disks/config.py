"""What a test declares about its disks: size, filesystem, throttle, access mode.

The throttle type is the virtio-blk device's own (:class:`ktstr.vmm.throttle.DiskThrottle`),
re-exported here with the rest of the declaration.

Everything here is validated before any VM starts (`DiskConfig.validate`,
`validate_disks`) so a bad declaration is one clear KtstrError, not a guest
that fails to mount. The guest side imports nothing from here (it gets plain
mount specs, see `mount_specs`), so this module may stay host-only.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ktstr.errors import KtstrError
from ktstr.vmm.throttle import DiskThrottle
from ktstr.wire.disks import device_name

MIB = 1 << 20
# mkfs.btrfs refuses devices below 109 MiB (114294784 bytes in btrfs-progs 6.x).
BTRFS_MIN_MB = 110
EXT4_MIN_MB = 2
# An upper bound that catches unit mistakes (GB typed as MB) yet allows big scratch disks.
MAX_CAPACITY_MB = 1 << 20  # 1 TiB
MAX_DISKS = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class Filesystem(enum.Enum):
    """What the guest finds on the disk: nothing (RAW) or a freshly made filesystem."""

    RAW = "raw"
    BTRFS = "btrfs"
    EXT4 = "ext4"

    @property
    def mkfs(self) -> str | None:
        """The mkfs program that builds this filesystem's template, None for RAW."""
        return None if self is Filesystem.RAW else f"mkfs.{self.value}"


@dataclass(frozen=True)
class DiskConfig:
    """One virtio-blk disk of a test.

    The guest sees disks in declaration order as /dev/vda, /dev/vdb, ...;
    each is mounted at /mnt/<name> (or /mnt/disk<index> when unnamed) unless
    `no_auto_mount` is set or it is RAW.
    """

    capacity_mb: int = 256
    filesystem: Filesystem = Filesystem.RAW
    throttle: DiskThrottle = field(default_factory=DiskThrottle)
    read_only: bool = False
    name: str | None = None
    no_auto_mount: bool = False

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_mb * MIB

    def label(self, index: int) -> str:
        """The name the guest mounts it under: `name`, else `disk<index>`."""
        return self.name if self.name is not None else f"disk{index}"

    def mount_point(self, index: int) -> str | None:
        if self.no_auto_mount or self.filesystem is Filesystem.RAW:
            return None
        return f"/mnt/{self.label(index)}"

    def validate(self, index: int = 0) -> None:
        where = f"disk {self.name!r}" if self.name is not None else f"disk {index}"
        if not isinstance(self.filesystem, Filesystem):
            raise KtstrError(
                f"{where}: filesystem={self.filesystem!r} is not a Filesystem; use one of "
                + ", ".join(f"Filesystem.{f.name}" for f in Filesystem)
            )
        cap = self.capacity_mb
        if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
            raise KtstrError(f"{where}: capacity_mb={cap!r} must be a positive integer (MiB)")
        if cap > MAX_CAPACITY_MB:
            raise KtstrError(
                f"{where}: capacity_mb={cap} exceeds the {MAX_CAPACITY_MB} MiB limit; "
                "capacity is in MiB, not bytes or KiB"
            )
        minimum = {Filesystem.BTRFS: BTRFS_MIN_MB, Filesystem.EXT4: EXT4_MIN_MB}.get(
            self.filesystem, 1
        )
        if cap < minimum:
            raise KtstrError(
                f"{where}: capacity_mb={cap} is too small for {self.filesystem.value}; "
                f"use at least {minimum}"
            )
        if self.name is not None and (
            not isinstance(self.name, str)
            or not _NAME_RE.match(self.name)
            or self.name in (".", "..")
        ):
            raise KtstrError(
                f"{where}: name={self.name!r} is not a valid mount directory name; use 1-64 of "
                "letters, digits, '_', '-', '.' (not starting with '.' or '-')"
            )
        if not isinstance(self.throttle, DiskThrottle):
            raise KtstrError(f"{where}: throttle={self.throttle!r} is not a DiskThrottle")
        self.throttle.validate(where)


def normalize_disks(disk: DiskConfig | Sequence[DiskConfig] | None) -> list[DiskConfig]:
    """Accept what `@ktstr_test(disk=...)` takes: one config, a list, or None."""
    if disk is None:
        return []
    if isinstance(disk, DiskConfig):
        return [disk]
    disks = list(disk)
    for i, d in enumerate(disks):
        if not isinstance(d, DiskConfig):
            raise KtstrError(f"disk {i}: {d!r} is not a DiskConfig")
    return disks


def validate_disks(disk: DiskConfig | Sequence[DiskConfig] | None) -> list[DiskConfig]:
    """Validate every disk and the set as a whole; return them as a list."""
    disks = normalize_disks(disk)
    if len(disks) > MAX_DISKS:
        raise KtstrError(f"{len(disks)} disks declared; at most {MAX_DISKS} are supported")
    seen: dict[str, int] = {}
    for i, d in enumerate(disks):
        d.validate(i)
        label = d.label(i)
        if label in seen:
            raise KtstrError(
                f"disks {seen[label]} and {i} both mount as /mnt/{label}; give them distinct names"
            )
        seen[label] = i
    return disks


def mount_specs(disks: Sequence[DiskConfig]) -> list[dict[str, str]]:
    """What the guest init mounts, as `ktstr.wire.request.MountSpec` fields (JSON-ready).

    Only disks that auto-mount are listed. `device` is the name the disk gets
    when devices probe in order; the guest confirms it by serial
    (`ktstr.guest.disks.resolve_device`).
    """
    specs = []
    for i, d in enumerate(disks):
        mountpoint = d.mount_point(i)
        if mountpoint is None:
            continue
        specs.append(
            {
                "device": f"/dev/{device_name(i)}",
                "mountpoint": mountpoint,
                "fstype": d.filesystem.value,
                "options": "ro" if d.read_only else "",
            }
        )
    return specs
