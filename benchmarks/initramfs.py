"""Initramfs compression: build cost on the host, size, and decompression cost.

The guest kernel unpacks the base archive on every boot, so what matters is
decompression speed plus the bytes the VMM copies into guest RAM; compression
cost is paid once per cache miss. Decompression is timed with the host tools
(the kernel's decompressors are the same algorithms). With ``--kernel`` each
variant is also booted (``ktstr shell --exec true`` equivalent) to measure the
whole boot, which needs a usable KVM.

    python benchmarks/initramfs.py [--kernel BZIMAGE] [--runs 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktstr import initramfs

DECOMPRESS = {
    "lz4": ["lz4", "-dc"],
    "zstd": ["zstd", "-dc"],
}


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        spec = initramfs.BaseSpec(busybox=initramfs.default_busybox(), compression="none")
        t = time.perf_counter()
        base = initramfs.build_base(spec, Path(tmp))
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        again = initramfs.build_base(spec, Path(tmp))
        cached_ms = (time.perf_counter() - t) * 1000
        assert again.cached
        raw = base.path.read_bytes()
        rows = []
        for kind in initramfs.COMPRESSIONS:
            if kind in DECOMPRESS and shutil.which(DECOMPRESS[kind][0]) is None:
                continue
            t = time.perf_counter()
            blob = initramfs.compress(raw, kind)
            comp_s = time.perf_counter() - t
            if kind == "none":
                dec_s = 0.0
            elif kind == "gzip":
                dec_s = timed(lambda b=blob: gzip.decompress(b), args.runs)
            else:
                packed = Path(tmp) / f"base.{kind}"
                packed.write_bytes(blob)
                cmd = [*DECOMPRESS[kind], str(packed)]
                dec_s = timed(lambda c=cmd: subprocess.run(c, check=True,
                                                           stdout=subprocess.DEVNULL), args.runs)
            row = {"compression": kind, "size_mb": round(len(blob) / 1e6, 2),
                   "compress_s": round(comp_s, 3), "decompress_ms": round(dec_s * 1000, 1)}
            if args.kernel:
                row["boot_to_shell_s"] = round(boot(args.kernel, kind, args.runs), 3)
            rows.append(row)
    print(json.dumps({"base_files": base.files, "base_build_s": round(build_s, 2),
                      "cached_lookup_ms": round(cached_ms, 1), "variants": rows}, indent=1))
    return 0


def boot(kernel: Path, compression: str, runs: int) -> float:
    from ktstr.runner import GuestRequest, run_guest

    times = []
    for _ in range(runs):
        run = run_guest(GuestRequest(kernel, shell="true", compression=compression, timeout=120))
        if not run.ok:
            raise SystemExit(f"boot with {compression} failed: {run.summary()}")
        times.append(run.timings.get("end", float("nan")))
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
