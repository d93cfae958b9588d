"""Guest side of disks: find each configured virtio disk and mount it. Standard library only.

The host lists the disks to mount as mount specs (`ktstr.disks.config.mount_specs`:
device, mountpoint, fstype, options). The device name is what the disk gets
when virtio devices probe in declaration order; every ktstr disk also
reports the serial `ktstr-disk<index>` (VIRTIO_BLK_T_GET_ID, visible in
/sys/block/vdX/serial), so the real device is confirmed by serial and a
different probe order cannot mount the wrong disk.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ktstr.wire.disks import disk_index, disk_serial

MS_RDONLY = 1
DEVICE_WAIT_S = 10.0

_libc = ctypes.CDLL(None, use_errno=True)


def serials(sys_block: Path = Path("/sys/block")) -> dict[str, str]:
    """{serial: block device name} for every virtio disk that reports one."""
    out: dict[str, str] = {}
    for entry in sorted(sys_block.glob("vd*")):
        try:
            serial = (entry / "serial").read_text().strip("\0\n ")
        except OSError:
            continue
        if serial:
            out[serial] = entry.name
    return out


def resolve_device(
    device: str,
    timeout: float = DEVICE_WAIT_S,
    sys_block: Path = Path("/sys/block"),
    dev: Path = Path("/dev"),
) -> str:
    """The /dev path of the disk the host means by `device`, waiting for it to appear."""
    want = disk_serial(disk_index(device))
    deadline = time.monotonic() + timeout
    while True:
        found = serials(sys_block).get(want)
        if found is not None and (dev / found).exists():
            return str(dev / found)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    # A kernel without the serial attribute: trust the probe order.
    if os.path.exists(device) and not any(sys_block.glob("vd*/serial")):
        return device
    present = ", ".join(f"{name} ({s})" for s, name in sorted(serials(sys_block).items()))
    raise OSError(f"disk {device} (serial {want}) did not appear; present: {present or 'none'}")


def _field(spec: Mapping[str, Any] | Any, name: str) -> Any:
    return spec[name] if isinstance(spec, Mapping) else getattr(spec, name)


def mount_one(device: str, mountpoint: str, fstype: str, options: str = "") -> None:
    opts = [o for o in options.split(",") if o]
    flags = MS_RDONLY if "ro" in opts else 0
    data = ",".join(o for o in opts if o not in ("ro", "rw"))
    os.makedirs(mountpoint, exist_ok=True)
    rc = _libc.mount(
        device.encode(),
        mountpoint.encode(),
        fstype.encode(),
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {device} ({fstype}) on {mountpoint}: {os.strerror(err)}")


def mount_disks(specs: Iterable[Mapping[str, Any] | Any]) -> dict[str, Path]:
    """Mount every spec (dicts or MountSpec objects); return {spec device: mount point}.

    Raises OSError naming the disk when a device never appears or a mount fails.
    """
    mounted: dict[str, Path] = {}
    for spec in specs:
        device = _field(spec, "device")
        mountpoint = _field(spec, "mountpoint")
        real = resolve_device(device)
        mount_one(real, mountpoint, _field(spec, "fstype"), _field(spec, "options") or "")
        mounted[device] = Path(mountpoint)
    return mounted
