"""Time `ensure_kernel`: the first call (cold build, or warm if cached) and a warm hit.

    python benchmarks/kernel_cache.py [ID] [--flavour test|sandbox] [--repeat N]

A warm hit re-verifies the entry's checksums (bzImage, .config, System.map,
schedulers: full sha256; vmlinux: size, mtime and edge hash) and must stay
well under a second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr.kernel import DEFAULT_KERNEL, ensure_kernel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("id", nargs="?", default=DEFAULT_KERNEL)
    parser.add_argument("--flavour", default="test")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    start = time.monotonic()
    entry = ensure_kernel(args.id, flavour=args.flavour)
    first = time.monotonic() - start
    warm = []
    for _ in range(args.repeat):
        start = time.monotonic()
        again = ensure_kernel(args.id, flavour=args.flavour)
        warm.append(time.monotonic() - start)
        assert again.key == entry.key
    print(f"kernel {entry.id} {entry.flavour} {entry.version} ({entry.key})")
    print(f"first ensure_kernel: {first:.3f} s")
    print(f"warm hit: median {statistics.median(warm) * 1000:.1f} ms, "
          f"max {max(warm) * 1000:.1f} ms over {len(warm)} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
