"""The sandbox's reflink-capable directory: a btrfs image attached as /dev/vda.

Disk templates are cloned with FICLONE, which the host's ext4 cannot do. The
image lives in the cache root so templates survive across sandbox runs; one
run at a time owns it (flock). A concurrent run gets a fresh temporary image
instead of waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ktstr import tools
from ktstr.errors import KtstrError

IMAGE_SIZE = 8 << 30   # sparse; only written blocks use host disk
PERSISTENT_NAME = "disk-cache.img"
LOCK_NAME = "disk-cache.lock"


@dataclass(frozen=True)
class DiskImage:
    path: Path
    persistent: bool


def make_btrfs_image(path: Path, size: int = IMAGE_SIZE) -> None:
    """Create a sparse file at `path` and format it as btrfs (host mkfs.btrfs)."""
    mkfs = tools.require("mkfs.btrfs", why="the sandbox's disk cache needs it")
    with open(path, "wb") as f:
        f.truncate(size)
    proc = subprocess.run([mkfs, "-q", "-f", "-L", "ktstr-cache", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KtstrError(f"mkfs.btrfs {path} failed: {proc.stderr.strip().splitlines()[-1:]}")


@contextlib.contextmanager
def disk_cache(cache_dir: Path, temp_dir: Path) -> Iterator[DiskImage]:
    """The persistent image under its lock, or a temporary one in `temp_dir`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tmp = temp_dir / "disk-cache.img"
            make_btrfs_image(tmp)
            yield DiskImage(tmp, persistent=False)
            return
        image = cache_dir / PERSISTENT_NAME
        if not image.exists():
            # Built aside and renamed: a crash never leaves a half-formatted image.
            partial = cache_dir / (PERSISTENT_NAME + ".partial")
            try:
                make_btrfs_image(partial)
                os.replace(partial, image)
            finally:
                partial.unlink(missing_ok=True)
        yield DiskImage(image, persistent=True)
    finally:
        os.close(lock_fd)
