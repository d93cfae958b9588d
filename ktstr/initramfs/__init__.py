"""Initramfs archives, in three jobs: the cpio newc codec (``cpio``), the guest Python
runtime packer (``runtime``) and the cached base archive (``cache``); ``busybox`` makes
the small Python-free boot archives. The names callers use are re-exported here.
"""

from __future__ import annotations

from ktstr.initramfs.busybox import (
    BUSYBOX_INIT_PREAMBLE,
    busybox_archive,
    default_busybox,
    write_busybox_initramfs,
)
from ktstr.initramfs.cache import BaseArchive, build_base, build_suffix
from ktstr.initramfs.cpio import (
    COMPRESSIONS,
    TRAILER,
    Archive,
    CpioEntry,
    compress,
    decode_newc,
    encode_newc,
    write_archive,
)
from ktstr.initramfs.runtime import (
    DEFAULT_COMPRESSION,
    GUEST_MODULE,
    BaseSpec,
    add_host_path,
    find_modules,
    pyc_bytes,
    search_path,
)

__all__ = [
    "BUSYBOX_INIT_PREAMBLE",
    "COMPRESSIONS",
    "DEFAULT_COMPRESSION",
    "GUEST_MODULE",
    "TRAILER",
    "Archive",
    "BaseArchive",
    "BaseSpec",
    "CpioEntry",
    "add_host_path",
    "build_base",
    "build_suffix",
    "busybox_archive",
    "compress",
    "decode_newc",
    "default_busybox",
    "encode_newc",
    "find_modules",
    "pyc_bytes",
    "search_path",
    "write_archive",
    "write_busybox_initramfs",
]
