"""Disks end to end: template-build VM, FICLONE clones, read-only and throttled disks.

Ports ktstr 0.5.2's disk_template_e2e scenarios (btrfs visible at /mnt/disk0;
a fresh, writable clone) and adds read-only and throttle checks. Needs a usable
KVM (natively, or inside the sandbox: ``ktstr sandbox run -- python -m pytest
tests/vm/test_disk_template_e2e.py``), a reflink-capable disk cache
(``$KTSTR_DISK_CACHE_DIR``; the sandbox provides one), mkfs.btrfs on the host, and
a kernel with VIRTIO_BLK + BTRFS: the run's kernel (``--ktstr-kernel``; fixtures in
conftest.py).

Only the standard library and pytest are imported at module level: this module
is imported again in the guest to find the scenario functions.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

# Nothing here depends on the session's scheduler: a matrix runs it once, with eevdf.
pytestmark = [pytest.mark.vm, pytest.mark.pins_scheduler("eevdf")]
THIS = Path(__file__).resolve()
MODULE = "test_disk_template_e2e"
BTRFS_SUPER_MAGIC = 0x9123683E  # linux/magic.h; pinned here, not imported from the host code
SENTINEL = b"DISK_TEMPLATE_E2E_SENTINEL"
THROTTLE_IOPS = 50
"""Well under what a nested guest issues unthrottled (~120 O_DIRECT IOPS in the sandbox)."""


# --- scenario functions (run in the guest) --------------------------------------------------


def _statfs_type(path: str) -> int:
    buf = ctypes.create_string_buffer(256)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(path.encode(), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs({path}) failed: {os.strerror(err)}; the auto-mount of the "
                      "btrfs disk must succeed before the scenario runs")
    return int.from_bytes(buf.raw[:8], "little", signed=True)


def scenario_btrfs_filesystem_visible(ctx: Any) -> dict[str, Any]:
    f_type = _statfs_type("/mnt/disk0")
    if f_type != BTRFS_SUPER_MAGIC:
        raise AssertionError(
            f"/mnt/disk0 has statfs.f_type=0x{f_type:x}, expected BTRFS_SUPER_MAGIC="
            f"0x{BTRFS_SUPER_MAGIC:x}: the template lifecycle did not put btrfs on /dev/vda"
        )
    return {"f_type": f_type, "disks": {k: str(v) for k, v in ctx.disks.items()}}


def scenario_ficlone_clone_writable_and_fresh(ctx: Any) -> dict[str, Any]:
    mount = Path("/mnt/disk0")
    if not mount.is_dir():
        raise AssertionError("/mnt/disk0 is not a directory: auto-mount of the clone failed")
    before = sorted(os.listdir(mount))
    name = f"sentinel-{os.getpid()}"
    if name in before:
        raise AssertionError(f"/mnt/disk0/{name} exists before this scenario wrote it: the clone "
                             f"is not fresh; entries: {before}")
    path = mount / name
    path.write_bytes(SENTINEL)
    os.sync()
    body = path.read_bytes()
    if body != SENTINEL:
        raise AssertionError(f"{path} readback mismatch: got {body!r}")
    return {"before": before, "after": sorted(os.listdir(mount)), "sentinel": name,
            "readback": body.decode()}


def scenario_read_only(ctx: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"disks": {k: str(v) for k, v in ctx.disks.items()}}
    try:
        Path("/mnt/ro/new-file").write_bytes(b"x")
        out["fs_write"] = "succeeded"
    except OSError as err:
        out["fs_write"] = errno.errorcode.get(err.errno or 0, str(err.errno))
    # The raw disk, below any filesystem: open for writing, write a block, flush.
    raw = _device_with_serial("ktstr-disk1")
    try:
        fd = os.open(raw, os.O_WRONLY)
        try:
            os.write(fd, b"\xaa" * 4096)
            os.fsync(fd)
            out["raw_write"] = "succeeded"
        finally:
            os.close(fd)
    except OSError as err:
        out["raw_write"] = errno.errorcode.get(err.errno or 0, str(err.errno))
    out["ro_sysfs"] = Path(f"/sys/block/{os.path.basename(raw)}/ro").read_text().strip()
    return out


def _device_with_serial(serial: str) -> str:
    for entry in sorted(Path("/sys/block").glob("vd*")):
        if (entry / "serial").read_text().strip("\0\n ") == serial:
            return f"/dev/{entry.name}"
    raise AssertionError(f"no virtio disk with serial {serial}")


def scenario_throttled_iops(ctx: Any) -> dict[str, Any]:
    """O_DIRECT 4 KiB reads: drain the burst, then measure the sustained rate.

    The bucket starts full (``burst`` tokens) and refills at ``rate``; it is empty
    once the ops done catch up with ``burst + rate * elapsed``. A fixed warm-up
    does not do that on a slow guest (one barely faster than the rate carries
    tokens into the measurement), so drain until caught up, bounded.
    """
    dev = _device_with_serial("ktstr-disk0")
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    blocks = os.lseek(fd, 0, os.SEEK_END) // 4096
    rate, burst = ctx.args["rate"], ctx.args["burst"]
    n = 0

    def one() -> None:
        nonlocal n
        os.preadv(fd, [buf], (n * 7919 % blocks) * 4096)
        n += 1

    start = time.monotonic()
    warm = 0
    while time.monotonic() - start < ctx.args["max_warmup_s"]:
        if warm + 2 >= burst + rate * (time.monotonic() - start):
            break
        one()
        warm += 1
    warm_s = time.monotonic() - start
    drained = warm + 2 >= burst + rate * warm_s
    start = time.monotonic()
    ops = 0
    while time.monotonic() - start < ctx.args["measure_s"]:
        one()
        ops += 1
    elapsed = time.monotonic() - start
    os.close(fd)
    return {"warmup_ops": warm, "warmup_s": warm_s, "drained": drained, "ops": ops,
            "elapsed": elapsed, "iops": ops / elapsed}


# --- host side ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cold_cache() -> Any:
    """A template cache of our own inside the reflink-capable disk cache: starts cold."""
    from ktstr.disks import template as dt

    base = dt.verify_cache_dir_supports_reflink()
    path = base / f"e2e-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _btrfs() -> Any:
    from ktstr.disks import DiskConfig, Filesystem

    return DiskConfig(capacity_mb=256, filesystem=Filesystem.BTRFS)


def _run(guest: Any, scenario: str, prepared: Any, **kw: Any) -> Any:
    from ktstr.wire.request import MountSpec

    run = guest(scenario=f"{MODULE}:{scenario}", test_file=THIS,
                    devices=prepared.devices, mounts=[MountSpec(**m) for m in prepared.mounts],
                    memory_mb=1024, timeout=kw.pop("timeout", 120), **kw)
    assert run.ok, run.summary()
    return run


@pytest.mark.smoke
def test_disk_template_e2e_btrfs_template_build(ktstr_kernel: Any, guest: Any,
                                                cold_cache: Path) -> None:
    """Cold cache: one template-build VM runs mkfs.btrfs; the test VM sees btrfs at /mnt/disk0."""
    from ktstr.disks import clones
    from ktstr.disks import template as dt

    kernel = ktstr_kernel.bzimage
    assert dt.cached_template(_btrfs(), cold_cache) is None
    builds = dt.stats.builds
    start = time.monotonic()
    with clones.per_test_disks(_btrfs(), kernel=kernel, cache_dir=cold_cache) as prepared:
        prepare_s = time.monotonic() - start
        assert dt.stats.builds == builds + 1
        run = _run(guest, "scenario_btrfs_filesystem_visible", prepared)
    assert run.result["f_type"] == BTRFS_SUPER_MAGIC
    assert run.result["disks"] == {"/dev/vda": "/mnt/disk0"}
    assert dt.cached_template(_btrfs(), cold_cache) is not None
    print(f"\ncold cache: template build {dt.stats.build_s[-1]:.2f} s, "
          f"disks ready after {prepare_s:.2f} s")


@pytest.mark.smoke
def test_disk_template_e2e_ficlone_clone_isolated(ktstr_kernel: Any, guest: Any,
                                                  cold_cache: Path) -> None:
    """Warm cache: no template VM; the clone is fresh, writable and reads back intact."""
    from ktstr.disks import clones
    from ktstr.disks import template as dt

    kernel = ktstr_kernel.bzimage
    dt.ensure_template(_btrfs(), kernel=kernel, cache_dir=cold_cache)  # warm (built above)
    builds, hits = dt.stats.builds, dt.stats.hits
    start = time.monotonic()
    with clones.per_test_disks(_btrfs(), kernel=kernel, cache_dir=cold_cache) as prepared:
        prepare_s = time.monotonic() - start
        assert dt.stats.builds == builds and dt.stats.hits == hits + 1  # no template VM
        run = _run(guest, "scenario_ficlone_clone_writable_and_fresh", prepared)
        clone = prepared.paths[0]
        assert clone.is_file()
    template = dt.cached_template(_btrfs(), cold_cache)
    assert template is not None
    assert run.result["sentinel"] not in run.result["before"]
    assert run.result["sentinel"] in run.result["after"]
    assert run.result["readback"] == SENTINEL.decode()
    assert not clone.exists()  # the per-test clone is deleted after the test
    # The guest's write went to the clone only: the template still has no sentinel.
    with open(template, "rb") as f:
        assert SENTINEL not in f.read()
    print(f"\nwarm cache: disks ready after {prepare_s * 1000:.1f} ms")


def test_read_only_disk_rejects_writes(ktstr_kernel: Any, guest: Any, cold_cache: Path) -> None:
    from ktstr.disks import DiskConfig, Filesystem, clones

    kernel = ktstr_kernel.bzimage
    disks = [
        DiskConfig(capacity_mb=256, filesystem=Filesystem.BTRFS, read_only=True, name="ro"),
        DiskConfig(capacity_mb=16, read_only=True),
    ]
    with clones.per_test_disks(disks, kernel=kernel, cache_dir=cold_cache) as prepared:
        before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in prepared.paths]
        run = _run(guest, "scenario_read_only", prepared)
        after = [hashlib.sha256(p.read_bytes()).hexdigest() for p in prepared.paths]
    assert run.result["disks"] == {"/dev/vda": "/mnt/ro"}
    assert run.result["fs_write"] == "EROFS"
    assert run.result["raw_write"] in ("EROFS", "EIO", "EACCES", "EPERM")
    assert run.result["ro_sysfs"] == "1"
    assert after == before


def test_throttled_disk_holds_its_iops(guest: Any) -> None:
    from ktstr.disks import DiskConfig, DiskThrottle, clones

    disk = DiskConfig(capacity_mb=64, throttle=DiskThrottle(iops=THROTTLE_IOPS))
    with clones.per_test_disks(disk) as prepared:
        run = _run(guest, "scenario_throttled_iops", prepared,
                   args={"rate": THROTTLE_IOPS, "burst": THROTTLE_IOPS, "max_warmup_s": 10.0,
                         "measure_s": 4.0})
    r = run.result
    iops = r["iops"]
    print(f"\nthrottled at {THROTTLE_IOPS} IOPS: measured {iops:.1f} IOPS "
          f"({r['ops']} ops in {r['elapsed']:.2f} s, warm-up {r['warmup_ops']} ops "
          f"in {r['warmup_s']:.2f} s)")
    # The premise: the guest outpaces the throttle, so the burst drains and the
    # device, not the guest, sets the rate measured next.
    assert r["drained"], (f"the guest did not drain the burst within 10 s: it issued "
                          f"{r['warmup_ops'] / r['warmup_s']:.0f} IOPS against a "
                          f"{THROTTLE_IOPS} IOPS throttle")
    assert r["warmup_ops"] >= THROTTLE_IOPS  # the burst was there and got used
    assert abs(iops - THROTTLE_IOPS) <= 0.1 * THROTTLE_IOPS
