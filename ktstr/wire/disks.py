"""How the host names a test's disks and how the guest recognises them (both sides use these).

Disk *i* is ``/dev/vd<a+i>`` when virtio devices probe in declaration order, and its
virtio-blk device reports the serial ``ktstr-disk<i>`` (VIRTIO_BLK_T_GET_ID), so the
guest confirms each device by serial whatever the probe order was.
"""

from __future__ import annotations

import os


def device_name(index: int) -> str:
    """The guest block device name for the index'th virtio disk: vda, vdb, ..., vdz, vdaa."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


def disk_index(device: str) -> int:
    """/dev/vda -> 0, /dev/vdz -> 25, /dev/vdaa -> 26 (the inverse of device_name)."""
    name = os.path.basename(device)
    if not name.startswith("vd") or len(name) < 3 or not name[2:].isalpha():
        raise ValueError(f"{device} is not a virtio disk name")
    n = 0
    for ch in name[2:]:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def disk_serial(index: int) -> str:
    """The VIRTIO_BLK_T_GET_ID serial (<= 20 bytes): how the guest matches a device to a spec.

    Keyed by index, not name, so it is unique and short whatever the names are.
    """
    return f"ktstr-disk{index}"
