"""FICLONE clone of a disk template vs a full copy, for 256 MiB, 1 GiB and 4 GiB templates.

Creates a loop-mounted btrfs under a temporary directory (needs root), builds
each template with the host's mkfs.btrfs plus some random data (so a copy has
real bytes to move), then times `clone_to_per_test` (FICLONE) against a plain
read/write copy, which is what a cache without reflink would have to do.
The loop device is always unmounted and detached.

    python benchmarks/clone.py [--sizes 256,1024,4096] [--fill-mb 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.disks import template as dt


def plain_copy(src: Path, dest: Path, chunk: int = 8 << 20) -> None:
    """A byte-for-byte copy that never reflinks (what a cache without reflink would do)."""
    with open(src, "rb") as s, open(dest, "wb") as d:
        while data := s.read(chunk):
            d.write(data)
        d.flush()
        os.fsync(d.fileno())


def make_template(path: Path, size_mb: int, fill_mb: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.btrfs", "-f", "-q", str(path)], check=True, capture_output=True)
    # Real data at the end, so the template is not almost all holes.
    with open(path, "r+b") as f:
        f.seek((size_mb - fill_mb) << 20)
        for _ in range(fill_mb):
            f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())


def timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024,4096", help="template sizes in MiB")
    parser.add_argument("--fill-mb", type=int, default=64, help="MiB of random data per template")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if os.geteuid() != 0:
        print("clone.py needs root (losetup, mount)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="ktstr-clone-bench-") as tmp:
        image_gb = max(8, (sum(sizes) * 2 + args.fill_mb * len(sizes)) // 1024 + 2)
        with dt.loop_btrfs(Path(tmp), f"{image_gb}G") as mnt:
            for size in sizes:
                template = mnt / f"template-{size}.img"
                make_template(template, size, min(args.fill_mb, size // 2))
                clones, copies = [], []
                for i in range(args.repeat):
                    dest = mnt / f"clone-{size}-{i}.img"
                    clones.append(timed(clones.clone_to_per_test, template, dest))
                    dest.unlink()
                    copy = mnt / f"copy-{size}-{i}.img"
                    copies.append(timed(plain_copy, template, copy))
                    copy.unlink()
                rows.append(
                    {
                        "size_mb": size,
                        "clone_ms_median": round(statistics.median(clones) * 1000, 3),
                        "clone_ms_max": round(max(clones) * 1000, 3),
                        "copy_ms_median": round(statistics.median(copies) * 1000, 1),
                    }
                )
                template.unlink()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'size':>8} {'FICLONE median':>15} {'FICLONE max':>12} {'full copy':>12}")
        for r in rows:
            print(
                f"{r['size_mb']:>6}Mi {r['clone_ms_median']:>12.3f} ms {r['clone_ms_max']:>9.3f} ms"
                f" {r['copy_ms_median']:>9.1f} ms"
            )
    # The point of templates: clone cost must not scale with capacity.
    first, last = rows[0]["clone_ms_median"], rows[-1]["clone_ms_median"]
    ratio = last / first if first else float("inf")
    scale = sizes[-1] / sizes[0]
    print(
        f"clone time ratio {sizes[-1]}MiB/{sizes[0]}MiB = {ratio:.2f} (capacity ratio {scale:.0f})"
    )
    return 0 if ratio < scale / 4 else 1


if __name__ == "__main__":
    sys.exit(main())
