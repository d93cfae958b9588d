"""The cached base archive: the packed runtime, rebuilt only when a file it packs changed.

The base is ``cache_root()/initramfs/base-<key>.cpio[.gz|.lz4|.zst]`` plus a manifest of
(path, size, mtime) of every packed file; each run adds a tiny uncompressed suffix
(:func:`build_suffix`) placed before it.

Compression (``benchmarks/initramfs.py``, base of 923 files, 30.0 MB raw, this
2-core EPYC host, median of 5):

=========  =======  ==========  ==============
format     size MB  compress s  decompress ms
=========  =======  ==========  ==============
none        29.95     0.00          0
gzip -1     11.70     0.54        159
lz4 -l -1   14.98     0.16         27
zstd -3     10.38     0.21         40
=========  =======  ==========  ==============

The kernel must unpack the cpio either way; decompression is pure extra boot
time, while copying 30 MB into guest RAM costs a few ms. Booted for real (6.12
test kernel, nested KVM in the sandbox, `sh -c true`, two rounds), guest uptime
when init ran was none 10.2/-, lz4 17.8/9.7, zstd 15.0/15.6, gzip 14.4/11.2 s:
the emulated host's noise exceeds any difference between formats. ``none`` is
the default (no decompression work anywhere); the cache holds the bigger file,
which is cheap. The cached lookup (stat of every packed file) takes ~2 ms
natively, ~1 s under the sandbox's emulation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktstr import elf
from ktstr.errors import KtstrError
from ktstr.initramfs import cpio, runtime
from ktstr.initramfs.cpio import COMPRESSIONS, Archive, atomic_write, compress
from ktstr.initramfs.runtime import BaseSpec, pack_runtime, search_path
from ktstr.paths import cache_root

FORMAT_VERSION = 1


@dataclass(frozen=True)
class BaseArchive:
    path: Path
    key: str
    size: int
    """Bytes on disk (compressed)."""
    cached: bool
    seconds: float
    files: int
    python: str
    """Guest path of the interpreter."""
    sys_path: tuple[str, ...]


def _stat_sig(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, -1, -1]
    return [path, st.st_size, st.st_mtime_ns]


_PACKER_FILES = (cpio.__file__, runtime.__file__, __file__, elf.__file__)
"""The packer's own code: a change to how archives are built invalidates them."""


def _cache_key(spec: BaseSpec, python: str) -> str:
    """Names what is asked for; whether the packed files changed is the manifest's job."""
    roots = [python, *(str(p) for p in spec.test_files), *(str(p) for p in spec.binaries)]
    if spec.busybox:
        roots.append(str(spec.busybox))
    blob = json.dumps({
        "v": FORMAT_VERSION,
        "roots": [os.path.abspath(r) for r in roots],
        "search": search_path(spec),
        "packer": [_stat_sig(str(Path(f).resolve())) for f in _PACKER_FILES],
        "modules": spec.modules,
        "compression": spec.compression,
        "strip": spec.strip,
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def cache_dir() -> Path:
    return cache_root() / "initramfs"


def build_base(spec: BaseSpec, directory: Path | None = None) -> BaseArchive:
    """The base archive for ``spec``: from the cache when nothing it packs has changed."""
    start = time.monotonic()
    if spec.compression not in COMPRESSIONS:
        raise KtstrError(f"initramfs: unknown compression {spec.compression!r}; use one of "
                         f"{', '.join(COMPRESSIONS)}")
    for p in (*spec.test_files, *spec.binaries):
        if not Path(p).is_file():
            raise KtstrError(f"initramfs: {p} does not exist; check the path")
    python = os.path.realpath(sys.executable)
    key = _cache_key(spec, python)
    directory = directory or cache_dir()
    ext = {"none": "", "gzip": ".gz", "lz4": ".lz4", "zstd": ".zst"}[spec.compression]
    archive_path = directory / f"base-{key}.cpio{ext}"
    manifest_path = directory / f"base-{key}.json"
    manifest = _load_manifest(manifest_path)
    if manifest is not None and archive_path.is_file() and all(
        _stat_sig(dep[0]) == dep for dep in manifest["deps"]
    ):
        return BaseArchive(archive_path, key, archive_path.stat().st_size, True,
                           time.monotonic() - start, manifest["files"], manifest["python"],
                           tuple(manifest["sys_path"]))
    archive, deps, guest_path = pack_runtime(spec, python)
    blob = compress(archive.encode(), spec.compression)
    atomic_write(archive_path, blob)
    atomic_write(manifest_path, json.dumps({
        "deps": [_stat_sig(d) for d in sorted(deps)], "files": len(archive),
        "python": python, "sys_path": guest_path,
    }).encode())
    return BaseArchive(archive_path, key, len(blob), False, time.monotonic() - start,
                       len(archive), python, tuple(guest_path))


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "deps" in data else None


def build_suffix(files: dict[str, bytes], compression: str = "none",
                 first_ino: int = 1 << 24) -> bytes:
    """The small per-run archive, placed *before* the base in the initrd.

    Uncompressed by default. It must not follow an lz4 base: the kernel's lz4
    reader (legacy frames carry no end marker) consumes whatever follows.
    """
    archive = Archive()
    for name, data in files.items():
        archive.add_file(name, data, 0o644)
    return compress(archive.encode(first_ino), compression)
