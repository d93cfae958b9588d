"""Busybox boot archives: static busybox, a shell /init and a few host binaries, no Python.

For one-shot guests (the ``ktstr boot`` report, the template-build mkfs, benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ktstr import elf, tools
from ktstr.errors import KtstrError
from ktstr.initramfs.cpio import Archive, write_archive
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
    """A minimal boot archive: busybox at /bin/busybox, ``init`` as /init, the host
    ``binaries`` with their shared-library closure at their host paths (busybox's too,
    which a static busybox does not have), /proc /sys /dev /tmp and /dev/console."""
    if not busybox.is_file():
        raise KtstrError(f"{busybox} not found: {tools.install_hint('busybox')}")
    names = [str(b) for b in binaries]
    archive = Archive()
    archive.add_host_file("bin/busybox", busybox, 0o755)
    closure = elf.library_closure([busybox, *names])
    if closure.missing:
        raise KtstrError(f"{', '.join([str(busybox), *names])}: shared libraries not found: "
                         f"{sorted(closure.missing)}")
    for name in (*names, *closure.files):
        add_host_path(archive, name)
    archive.add_file("init", init.encode(), 0o755)
    for d in ("proc", "sys", "dev", "tmp"):
        archive.add_dir(d)
    archive.add_chardev("dev/console", 5, 1)
    return archive


def write_busybox_initramfs(path: Path, init: str, binaries: Iterable[Path | str] = (),
                            busybox: Path | None = None, *, why: str | None = None) -> Path:
    """Write :func:`busybox_archive` to ``path``: the host's busybox unless one is given
    (a KtstrError naming the package, and ``why``, when there is none)."""
    if busybox is None:
        busybox = Path(tools.require("busybox", why=why))
    return write_archive(path, busybox_archive(busybox, init, binaries))


def default_busybox() -> Path | None:
    """The host's busybox, or None: the one lookup (PATH, then the sbin directories)."""
    found = tools.which("busybox")
    return Path(found) if found else None
