"""`ktstr kernel build | list | clean`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ktstr.kernel.cache import KernelEntry


def register(sub: Any) -> None:
    kernel = sub.add_parser("kernel", help="build, list and clean cached test kernels")
    ksub = kernel.add_subparsers(dest="kernel_command", metavar="ACTION")
    ksub.required = True

    build = ksub.add_parser("build", help="build a kernel into the cache (or reuse it)")
    build.add_argument("id", nargs="?", default=None,
                       help="catalog id from kernels/versions.toml (default: the catalog default)")
    build.add_argument("--source", type=Path, metavar="PATH",
                       help="build a local kernel tree, git checkout or tarball instead")
    build.add_argument("--flavour", choices=("test", "sandbox"), default="test")
    build.add_argument("--defconfig", action="store_true",
                       help="start from defconfig instead of tinyconfig")
    build.add_argument("--no-schedulers", action="store_true",
                       help="skip the sched_ext example schedulers")
    build.set_defaults(func=cmd_build)

    scx = ksub.add_parser("schedulers", help="build the sched_ext example schedulers")
    scx.add_argument("id", nargs="?", default=None, help="catalog id (default: catalog default)")
    scx.add_argument("--source", type=Path, metavar="PATH", help="a local kernel tree instead")
    scx.add_argument("--flavour", choices=("test", "sandbox"), default="test")
    scx.set_defaults(func=cmd_schedulers)

    lst = ksub.add_parser("list", help="list cached kernels")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.set_defaults(func=cmd_list)

    cln = ksub.add_parser("clean", help="remove cached kernels and their build trees")
    cln.add_argument("--keep", type=int, default=0, metavar="N",
                     help="keep the N most recently built kernels")
    cln.set_defaults(func=cmd_clean)


def _sigterm(signum: int, frame: object) -> None:
    # Unwinds like Ctrl-C: builds stop their make and remove temporary files.
    raise KeyboardInterrupt


def cmd_build(args: argparse.Namespace) -> int:
    from ktstr.errors import KtstrError
    from ktstr.kernel import DEFAULT_KERNEL, ensure_kernel

    if args.id and args.source:
        raise KtstrError("give either a catalog id or --source PATH, not both")
    signal.signal(signal.SIGTERM, _sigterm)
    start = time.monotonic()
    entry = ensure_kernel(args.id or DEFAULT_KERNEL, flavour=args.flavour, source=args.source,
                          base="defconfig" if args.defconfig else "tinyconfig",
                          schedulers=not args.no_schedulers)
    took = time.monotonic() - start
    scheds = ", ".join(sorted(entry.schedulers)) or "none"
    print(f"{entry.id} {entry.flavour} {entry.version}: {entry.bzimage} "
          f"(sched_ext {'yes' if entry.sched_ext else 'no'}; schedulers: {scheds}; "
          f"{took:.2f} s)")
    return 0


def cmd_schedulers(args: argparse.Namespace) -> int:
    from ktstr.kernel import DEFAULT_KERNEL, ensure_kernel, ensure_schedulers

    signal.signal(signal.SIGTERM, _sigterm)
    entry = ensure_kernel(args.id or DEFAULT_KERNEL, flavour=args.flavour, source=args.source,
                          schedulers=False)
    for name, path in sorted(ensure_schedulers(entry).items()):
        print(f"{name} {path}")
    return 0


def entry_record(entry: KernelEntry) -> dict[str, object]:
    return {
        "id": entry.id, "flavour": entry.flavour, "version": entry.version, "key": entry.key,
        "path": str(entry.path), "bzimage": str(entry.bzimage), "vmlinux": str(entry.vmlinux),
        "config": str(entry.config), "sched_ext": entry.sched_ext,
        "features": entry.features,
        "schedulers": {name: str(path) for name, path in sorted(entry.schedulers.items())},
        "corrupt": None,
    }


def cmd_list(args: argparse.Namespace) -> int:
    from ktstr.kernel import scan_entries

    entries, bad = scan_entries()
    for entry in entries:
        if args.json:
            print(json.dumps(entry_record(entry), sort_keys=True))
        else:
            scx = "sched_ext" if entry.sched_ext else "no sched_ext"
            print(f"{entry.id:6} {entry.flavour:8} {entry.version:20} {scx:13} {entry.path}")
    for unusable in bad:  # listed, not hidden: `ktstr kernel clean` removes them
        if args.json:
            print(json.dumps({"key": unusable.path.name, "path": str(unusable.path),
                              "corrupt": unusable.reason}, sort_keys=True))
        else:
            print(f"corrupt {unusable.path}: {unusable.reason}")
    if not entries and not bad and not args.json:
        print("no cached kernels; build one with `ktstr kernel build`", file=sys.stderr)
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from ktstr.kernel import clean

    removed = clean(args.keep)
    for path in removed:
        print(f"removed {path}")
    return 0
