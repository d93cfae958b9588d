"""Per-test disks: a FICLONE clone of the template (or a sparse RAW file) per disk, as devices.

Everything a test's disks need for one run is made by :func:`per_test_disks` and
removed when it exits; the templates they are cloned from are
:mod:`ktstr.disks.template`'s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ktstr import reap
from ktstr.disks.config import DiskConfig, Filesystem, mount_specs, validate_disks
from ktstr.disks.device import VirtioBlkDisk
from ktstr.disks.template import (
    DISK_CACHE_ENV,
    TemplateBuilder,
    disk_cache_dir,
    ensure_template,
    ficlone,
)
from ktstr.errors import KtstrError
from ktstr.vmm.bus import VmDevice


def clone_to_per_test(template: Path, dest: Path) -> Path:
    """A FICLONE reflink copy of `template` at `dest` (same filesystem)."""
    try:
        ficlone(template, dest)
    except OSError as err:
        raise KtstrError(
            f"cannot reflink {template} to {dest}: {err.strerror}; both must be on one btrfs/xfs "
            f"filesystem ({DISK_CACHE_ENV})"
        ) from None
    return dest


def create_raw(dest: Path, capacity_bytes: int) -> Path:
    """A RAW disk: a sparse file of the declared size."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, capacity_bytes)
    finally:
        os.close(fd)
    return dest


@dataclass
class PreparedDisks:
    """Backing files and devices for one test's disks; see `per_test_disks`."""

    configs: list[DiskConfig]
    paths: list[Path]
    devices: list[VmDevice]  # VirtioBlkDisk

    @property
    def mounts(self) -> list[dict[str, str]]:
        """Mount specs for the guest init (`ktstr.guest.disks.mount_disks`)."""
        return mount_specs(self.configs)


@contextlib.contextmanager
def per_test_disks(
    disks: DiskConfig | Sequence[DiskConfig] | None,
    *,
    kernel: Path | None = None,
    cache_dir: Path | None = None,
    builder: TemplateBuilder | None = None,
) -> Iterator[PreparedDisks]:
    """Validate, ensure templates, clone (or create RAW files), yield the devices; delete after.

    Pass `prepared.devices` to `Vm(devices=...)` and `prepared.mounts` to the
    guest. Clones live in `<disk cache>/clones` (a reflink needs the same
    filesystem); RAW files in a temporary directory. Both are named after
    this process, so what a killed test leaves is removed by the next one.
    """
    configs = validate_disks(disks)
    paths: list[Path] = []
    devices: list[VirtioBlkDisk] = []
    raw_dir: Path | None = None
    try:
        templates = {
            i: ensure_template(c, kernel=kernel, cache_dir=cache_dir, builder=builder)
            for i, c in enumerate(configs)
            if c.filesystem is not Filesystem.RAW
        }
        clone_dir = (cache_dir or disk_cache_dir()) / "clones"
        if templates:
            clone_dir.mkdir(parents=True, exist_ok=True)
            reap.reap_stale(clone_dir)
        for i, config in enumerate(configs):
            if i in templates:
                dest = clone_dir / reap.owned_name("clone", f"-{i}.img")
                paths.append(clone_to_per_test(templates[i], dest))
            else:
                if raw_dir is None:
                    raw_dir = reap.mkdtemp("disks")
                paths.append(create_raw(raw_dir / f"disk{i}.img", config.capacity_bytes))
            devices.append(VirtioBlkDisk(paths[-1], config, i))
        yield PreparedDisks(configs, list(paths), list(devices))
    finally:
        for dev in devices:
            dev.close()
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if raw_dir is not None:
            shutil.rmtree(raw_dir, ignore_errors=True)
