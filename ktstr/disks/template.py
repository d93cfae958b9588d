"""Disk templates: formatted images built once in a VM, cached, and FICLONE'd per test.

The per-test clones are :mod:`ktstr.disks.clones`; the reflink helpers they need
(`ficlone`, `verify_cache_dir_supports_reflink`, the cache directory) live here.

A template is keyed by (filesystem, capacity, mkfs version). On a miss a
one-shot VM runs the host's own mkfs on its /dev/vda (so the image is made by
the guest kernel's block layer, exactly as a test will see it), and the
result is installed atomically: built under a temporary name in the cache
directory, fsynced, renamed. A per-key flock makes concurrent builders of one
key build once; a killed build leaves only a temporary file that the next
builder removes, never a cache entry. Each test then gets a reflink clone,
which costs the same for 256 MiB as for 4 GiB, so the cache directory must be
on a filesystem that can reflink (btrfs, xfs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ioctl_opt import IOW

from ktstr import initramfs, reap, tools
from ktstr.disks.config import DiskConfig, Filesystem
from ktstr.errors import KtstrError
from ktstr.paths import cache_root
from ktstr.wire import ports

log = logging.getLogger(__name__)

FICLONE = IOW(0x94, 9, ctypes.c_int)
DISK_CACHE_ENV = "KTSTR_DISK_CACHE_DIR"
FORMAT_VERSION = 1
"""Bump when the way templates are built changes (invalidates every key)."""

BTRFS_SUPER_MAGIC = 0x9123683E
XFS_SUPER_MAGIC = 0x58465342
EXT4_SUPER_MAGIC = 0xEF53
TMPFS_MAGIC = 0x01021994
_FS_NAMES = {
    BTRFS_SUPER_MAGIC: "btrfs",
    XFS_SUPER_MAGIC: "xfs",
    EXT4_SUPER_MAGIC: "ext4",
    TMPFS_MAGIC: "tmpfs",
    0x6969: "nfs",
    0x01021997: "9p",
    0x794C7630: "overlayfs",
}
_MKFS_ARGS = {Filesystem.BTRFS: ["-f", "-q"], Filesystem.EXT4: ["-F", "-q"]}
MKFS_MARKER = "KTSTR-MKFS-RC="
TEMPLATE_VM_TIMEOUT_S = 120.0
TEMPLATE_VM_MEMORY_MB = 256


def disk_cache_dir() -> Path:
    """`$KTSTR_DISK_CACHE_DIR`, else `cache_root()/disks`."""
    explicit = os.environ.get(DISK_CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return cache_root() / "disks"


# --- reflink ------------------------------------------------------------------------------


def ficlone(src: Path, dest: Path) -> None:
    """Make `dest` (created, must not exist) a reflink copy of `src`. Raises OSError."""
    with open(src, "rb") as s:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.ioctl(fd, FICLONE, s.fileno())
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(dest)
            raise
        os.close(fd)


def fs_type(path: Path) -> str:
    """The filesystem `path` lives on, by statfs magic ("0x..." if unknown)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type comes first
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return "unknown"
    magic = int.from_bytes(buf.raw[:8], "little") & 0xFFFFFFFF
    return _FS_NAMES.get(magic, f"0x{magic:x}")


_verified: set[Path] = set()


def verify_cache_dir_supports_reflink(directory: Path | None = None) -> Path:
    """Refuse a disk cache directory that cannot FICLONE, before any VM boots."""
    directory = (directory or disk_cache_dir()).resolve()
    if directory in _verified:
        return directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KtstrError(
            f"cannot create the disk cache {directory}: {err.strerror}; set {DISK_CACHE_ENV} "
            "(or KTSTR_CACHE_DIR) to a writable directory on btrfs or xfs"
        ) from None
    reap.reap_stale(directory)  # probes (and anything else owned) of killed runs
    src = directory / reap.owned_name("probe", hidden=True)
    dest = src.with_name(src.name + ".clone")
    try:
        src.write_bytes(b"ktstr reflink probe\n" * 205)
        ficlone(src, dest)
        if dest.read_bytes() != src.read_bytes():
            raise OSError(errno.EIO, "clone content differs")
    except OSError as err:
        fs = fs_type(directory)
        raise KtstrError(
            f"disk cache {directory} is on {fs}, which cannot reflink (FICLONE: "
            f"{err.strerror}); set {DISK_CACHE_ENV} or KTSTR_CACHE_DIR to a directory on btrfs "
            "or xfs with reflink, e.g. a loop-mounted btrfs image: truncate -s 16G disks.img && "
            "mkfs.btrfs disks.img && mount -o loop disks.img /mnt/ktstr-disks"
        ) from None
    finally:
        for p in (src, dest):
            with contextlib.suppress(OSError):
                p.unlink()
    _verified.add(directory)
    return directory


# --- mkfs ---------------------------------------------------------------------------------


def locate_host_mkfs(fs: Filesystem, search: str | None = None) -> Path:
    """The host's mkfs for `fs` (it is packed into the template-build VM)."""
    if fs.mkfs is None:
        raise KtstrError("a RAW disk has no filesystem and needs no mkfs")
    return Path(tools.require(fs.mkfs, path=search, why=f"it formats {fs.value} disk templates"))


@functools.lru_cache(maxsize=8)
def mkfs_version(fs: Filesystem, mkfs: Path) -> str:
    """The version line of `mkfs` (part of the template key)."""
    argv = [str(mkfs), "--version"] if fs is Filesystem.BTRFS else [str(mkfs), "-V"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    text = (proc.stdout + proc.stderr).strip()
    if not text:
        raise KtstrError(f"`{' '.join(argv)}` printed no version; is {mkfs} a working mkfs?")
    return text.splitlines()[0].strip()


# --- the cache ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateKey:
    filesystem: Filesystem
    capacity_mb: int
    mkfs_version: str

    @property
    def name(self) -> str:
        tag = hashlib.sha256(f"{FORMAT_VERSION}\0{self.mkfs_version}".encode()).hexdigest()[:12]
        return f"{self.filesystem.value}-{self.capacity_mb}M-{tag}"


def sparse_sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of the file content, reading only its data extents (cheap for sparse images).

    Hashes (offset, bytes) of each non-zero, block-aligned block, so the sum does
    not depend on which ranges happen to be allocated.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        pos, last = 0, -block
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break  # only a hole remains
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            b = max(start // block * block, last + block)
            while b < end:
                f.seek(b)
                chunk = f.read(block)
                if chunk.count(0) != len(chunk):
                    h.update(b.to_bytes(8, "little") + chunk)
                last = b
                b += block
            pos = end
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_atomic(tmp_image: Path, dest: Path, meta: dict[str, object]) -> Path:
    """Install a finished image: fsync it, write its metadata, rename into place.

    `tmp_image` must be in `dest`'s directory. The image is renamed last, so an
    entry exists only once its metadata does; a crash before leaves temporaries.
    """
    if tmp_image.parent.resolve() != dest.parent.resolve():
        raise ValueError("store_atomic: temporary image must be in the destination directory")
    with open(tmp_image, "rb+") as f:
        os.fsync(f.fileno())
    meta = {**meta, "sha256": sparse_sha256(tmp_image), "size": tmp_image.stat().st_size}
    meta_tmp = dest.with_name(f".{dest.name}.json.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    with open(meta_tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(meta_tmp, _meta_path(dest))
    os.replace(tmp_image, dest)
    _fsync_dir(dest.parent)
    return dest


def _meta_path(image: Path) -> Path:
    return image.with_name(image.name + ".json")


def _entry_ok(image: Path) -> bool:
    """A cache entry counts if its image and metadata exist and the checksum matches."""
    try:
        meta = json.loads(_meta_path(image).read_text())
        return bool(
            image.is_file()
            and meta.get("size") == image.stat().st_size
            and meta.get("sha256") == sparse_sha256(image)
        )
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def key_lock(directory: Path, key: str) -> Iterator[None]:
    fd = os.open(directory / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_debris(directory: Path, key: str) -> None:
    """Temporaries of `key` left by killed builders (called with the key's lock held)."""
    for p in directory.glob(f".{key}.img.*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


TemplateBuilder = Callable[[Path, Filesystem, Path], None]
"""builder(image, filesystem, mkfs): format the sparse file `image` in place."""


@dataclass
class TemplateStats:
    """What ensure_template did (benchmarks and tests read this)."""

    hits: int = 0
    builds: int = 0
    build_s: list[float] = field(default_factory=list)


stats = TemplateStats()


def template_key(config: DiskConfig) -> TemplateKey:
    mkfs = locate_host_mkfs(config.filesystem)
    return TemplateKey(config.filesystem, config.capacity_mb, mkfs_version(config.filesystem, mkfs))


def template_path(config: DiskConfig, cache_dir: Path | None = None) -> Path:
    """Where the template for `config` is (or would be) cached."""
    return (cache_dir or disk_cache_dir()) / f"{template_key(config).name}.img"


def cached_template(config: DiskConfig, cache_dir: Path | None = None) -> Path | None:
    """The cached template for `config` if a valid one exists (no building, no locking)."""
    image = template_path(config, cache_dir)
    return image if _entry_ok(image) else None


def ensure_template(
    config: DiskConfig,
    *,
    kernel: Path | None = None,
    cache_dir: Path | None = None,
    builder: TemplateBuilder | None = None,
) -> Path:
    """The cached template image for `config`, building it (once) on a miss.

    The default builder boots `kernel` in a one-shot VM; `builder` replaces it
    (tests of the cache logic that do not boot VMs).
    """
    if config.filesystem is Filesystem.RAW:
        raise KtstrError("RAW disks have no template; they start as sparse files")
    directory = verify_cache_dir_supports_reflink(cache_dir)
    mkfs = locate_host_mkfs(config.filesystem)
    key = template_key(config)
    image = directory / f"{key.name}.img"
    if _entry_ok(image):
        stats.hits += 1
        return image
    if builder is None:
        if kernel is None:
            raise KtstrError(
                f"disk template {key.name} is not cached and no kernel was given to build it"
            )
        boot_kernel = kernel

        def builder(img: Path, fs: Filesystem, mk: Path) -> None:
            build_template_via_vm(img, fs, mk, boot_kernel)

    with key_lock(directory, key.name):
        if _entry_ok(image):  # another builder finished while we waited
            stats.hits += 1
            return image
        _remove_debris(directory, key.name)
        tmp = directory / f".{key.name}.img.{os.getpid()}.tmp"
        start = time.monotonic()
        try:
            with open(tmp, "wb") as f:
                f.truncate(config.capacity_bytes)
            builder(tmp, config.filesystem, mkfs)
            store_atomic(
                tmp,
                image,
                {
                    "filesystem": config.filesystem.value,
                    "capacity_mb": config.capacity_mb,
                    "mkfs": str(mkfs),
                    "mkfs_version": key.mkfs_version,
                    "format_version": FORMAT_VERSION,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        stats.builds += 1
        stats.build_s.append(time.monotonic() - start)
        log.info("built disk template %s in %.1f s", image, stats.build_s[-1])
        return image


# --- the template-build VM ------------------------------------------------------------------

_BUILD_INIT = initramfs.BUSYBOX_INIT_PREAMBLE + r"""i=0
while [ ! -b /dev/vda ] && [ $i -lt 1000 ]; do /bin/busybox usleep 10000; i=$((i+1)); done
%(mkfs)s %(args)s /dev/vda > /tmp/mkfs.log 2>&1
rc=$?
/bin/busybox sync
# /dev/kmsg reaches the console through printk even when the UART has no IRQ.
/bin/busybox sed 's/^/mkfs: /' /tmp/mkfs.log > /dev/kmsg
echo "%(marker)s$rc" > /dev/kmsg
printf "\\$(printf %%03o $rc)" | /bin/busybox dd of=/dev/port bs=1 seek=%(exit_port)d count=1 \
  2>/dev/null
/bin/busybox poweroff -f
"""


def build_initramfs(path: Path, fs: Filesystem, mkfs: Path, busybox: Path | None = None) -> Path:
    """busybox + the host mkfs and its shared libraries + an /init that formats /dev/vda."""
    init = _BUILD_INIT % {
        "mkfs": mkfs,
        "args": " ".join(_MKFS_ARGS[fs]),
        "marker": MKFS_MARKER,
        "exit_port": ports.EXIT_PORT,
    }
    return initramfs.write_busybox_initramfs(path, init, [mkfs], busybox,
                                             why="the template-build VM needs it")


def build_template_via_vm(image: Path, fs: Filesystem, mkfs: Path, kernel: Path) -> None:
    """Boot `kernel` with `image` as /dev/vda and run `mkfs` on it in the guest."""
    from ktstr.disks.device import VirtioBlkDisk
    from ktstr.topology import Topology
    from ktstr.vmm.vm import Vm

    with reap.temporary_directory("template") as tmp:
        initrd = build_initramfs(tmp / "initramfs.cpio", fs, mkfs)
        disk = VirtioBlkDisk(image, DiskConfig(capacity_mb=1))
        try:
            result = Vm(
                kernel,
                initrd,
                Topology.parse("1n1l1c1t"),
                memory_mb=TEMPLATE_VM_MEMORY_MB,
                devices=[disk],
                timeout=TEMPLATE_VM_TIMEOUT_S,
            ).run()
        finally:
            disk.close()
    # The guest's exit status is mkfs's; the console marker is for humans reading logs.
    if not result.ok:
        match = re.search(re.escape(MKFS_MARKER) + r"(\d+)", result.console)
        rc = match.group(1) if match else result.exit_code
        tail = result.console[-1500:].replace("\n", " | ")
        raise KtstrError(
            f"template-build VM for {image.name} failed ({result.reason or 'no result'}, "
            f"mkfs rc={rc}): {tail}"
        )


# --- a reflink-capable scratch directory -----------------------------------------------------


@contextlib.contextmanager
def loop_btrfs(base: Path, size: str = "1G") -> Iterator[Path]:
    """A fresh btrfs image under `base`, loop-mounted at `base/mnt` (root only).

    For tests and benchmarks that need FICLONE on a host whose disk cannot do
    it. Unmounted and detached whatever happens inside the block; if the
    process is killed outright, by the next `reap.reap_stale_loops` (the image
    is named after its owner), which runs here first.
    """
    reap.reap_stale_loops()
    image, mnt = base / reap.owned_name("loop", ".img"), base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(_parse_size(size))
    mkfs = locate_host_mkfs(Filesystem.BTRFS)
    subprocess.run([str(mkfs), "-q", str(image)], check=True, capture_output=True)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        with contextlib.suppress(OSError):
            image.unlink()


def _parse_size(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
