"""A declared disk as a VM device: the virtio-blk device behind its own virtio-mmio slot.

The bridge from a test's :class:`~ktstr.disks.config.DiskConfig` to the VMM's device,
so the VMM never needs to know about disk declarations.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ktstr.disks.config import DiskConfig
from ktstr.vmm.devices.virtio.blk import VirtioBlk
from ktstr.vmm.devices.virtio.mmio import VirtioMmioTransport
from ktstr.wire.disks import disk_serial

if TYPE_CHECKING:
    from ktstr.vmm.bus import AttachContext


class VirtioBlkDisk:
    """A VmDevice: one virtio-blk disk at its own virtio-mmio slot (guest /dev/vdX)."""

    def __init__(self, path: Path, config: DiskConfig, index: int = 0) -> None:
        self.path = Path(path)
        self.config = config
        self.index = index
        self.blk = VirtioBlk(
            self.path,
            read_only=config.read_only,
            serial=disk_serial(index),
            throttle=config.throttle,
        )
        self.transport: VirtioMmioTransport | None = None

    def attach(self, ctx: AttachContext) -> None:
        slot = ctx.alloc_virtio_mmio_slot()
        self.transport = VirtioMmioTransport(self.blk, ctx.memory, slot.irq)
        ctx.add_mmio(slot.base, slot.size, self.transport)

    def close(self) -> None:
        self.blk.close()
