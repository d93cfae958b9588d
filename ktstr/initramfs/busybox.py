"""Busybox boot archives: static busybox, a shell /init and a few host binaries, no Python.

For one-shot guests (the ``ktstr boot`` report, the template-build mkfs, benchmarks).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from ktstr import elf, tools
from ktstr.errors import KtstrError
from ktstr.initramfs.cpio import Archive
from ktstr.initramfs.runtime import add_host_path

BUSYBOX_INIT_PREAMBLE = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
"""
"""The first lines of a :func:`busybox_archive` /init: applets on PATH, /dev /proc /sys."""


def busybox_archive(busybox: Path, init: str, binaries: Iterable[Path | str] = ()) -> Archive:
    """A minimal boot archive: static busybox at /bin/busybox, ``init`` as /init, the host
    ``binaries`` with their shared-library closure at their host paths, /proc /sys /dev /tmp
    and /dev/console. For one-shot guests (reports, mkfs, benchmarks) that need no Python."""
    if not busybox.is_file():
        raise KtstrError(f"{busybox} not found: {tools.install_hint('busybox')}")
    names = [str(b) for b in binaries]
    archive = Archive()
    archive.add_host_file("bin/busybox", busybox, 0o755)
    if names:
        closure = elf.library_closure(names)
        if closure.missing:
            raise KtstrError(f"{', '.join(names)}: shared libraries not found: "
                             f"{sorted(closure.missing)}")
        for name in (*names, *closure.files):
            add_host_path(archive, name)
    archive.add_file("init", init.encode(), 0o755)
    for d in ("proc", "sys", "dev", "tmp"):
        archive.add_dir(d)
    archive.add_chardev("dev/console", 5, 1)
    return archive


def default_busybox() -> Path | None:
    found = shutil.which("busybox")
    return Path(found) if found else None
