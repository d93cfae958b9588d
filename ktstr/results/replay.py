"""``ktstr replay RUN [TEST...]``: run a results directory's failed tests again.

Each test is rerun as its sidecar recorded it: the same kernel (found by its cache key;
rebuilt from its catalog id when the entry is gone, with a warning if the key then
differs), scheduler and flag profile, under pytest, locally or in the sandbox where KVM
is unusable. A test file that changed since the run is named with a warning; a test
that no longer exists is a one-line error. The exit code is pytest's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ktstr.errors import KtstrError
from ktstr.results.sidecar import Record, file_digest, load_run, resolve_run


@dataclass(frozen=True)
class ReplayTest:
    nodeid: str
    kernel: str
    """``--ktstr-kernel``: the cached bzImage of the recorded key, else the catalog id."""
    scheduler: str
    """``--ktstr-scheduler`` NAME@PROFILE."""
    warnings: tuple[str, ...] = ()


def _kernel(record: Record) -> tuple[str, list[str]]:
    from ktstr.kernel.cache import kernels_dir, load_entry
    from ktstr.paths import cache_root

    kernel = record.get("kernel") or {}
    key, kid = kernel.get("key"), kernel.get("id")
    warnings: list[str] = []
    if isinstance(key, str):
        try:
            entry = load_entry(kernels_dir(cache_root()) / key)
        except (KtstrError, OSError):
            entry = None
        if entry is not None:
            return str(entry.bzimage), warnings
        warnings.append(f"kernel {key} is no longer cached: rebuilt from {kid!r}, whose key "
                        "may differ (the catalog or fragments changed)")
    if isinstance(kid, str):
        return kid, warnings
    spec = kernel.get("spec") or kernel.get("bzimage")
    if not isinstance(spec, str):
        raise KtstrError(f"{record.get('test')}: the sidecar names no kernel")
    return spec, warnings


def plan_replay(records: Sequence[Record], names: Sequence[str], root: Path) -> list[ReplayTest]:
    """The tests to rerun: ``names`` (node ids or their function names), else every
    failed one."""
    chosen: list[Record] = []
    if names:
        for name in names:
            found = [r for r in records if r.get("test") == name
                     or str(r.get("test", "")).rsplit("::", 1)[-1].split("[")[0] == name]
            if not found:
                known = ", ".join(sorted({str(r.get("test")) for r in records})[:5])
                raise KtstrError(f"no test {name!r} in this run (it has: {known}, ...)")
            chosen.extend(found)
    else:
        chosen = [r for r in records if r.get("verdict") not in ("pass", "skip")]
    out = []
    for r in chosen:
        nodeid = str(r.get("test"))
        path = root / nodeid.split("::", 1)[0]
        if not path.is_file():
            raise KtstrError(f"{nodeid}: its test file {path} no longer exists")
        warnings = []
        recorded = (r.get("test_file") or {}).get("sha256")
        if recorded and file_digest(path) != recorded:
            warnings.append(f"{path} changed since the run: the test code is not what ran")
        kernel, more = _kernel(r)
        sched = r.get("scheduler") or {}
        profile = sched.get("profile") or "default"
        out.append(ReplayTest(nodeid, kernel, f"{sched.get('name', 'eevdf')}@{profile}",
                              tuple(warnings + more)))
    return out


def pytest_argv(tests: Sequence[ReplayTest], trace: bool) -> list[list[str]]:
    """One pytest command per (kernel, scheduler) group of ``tests``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for t in tests:
        groups.setdefault((t.kernel, t.scheduler), []).append(t.nodeid)
    return [[sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra",
             "--ktstr-kernel", kernel, "--ktstr-scheduler", sched,
             *(["--ktstr-trace"] if trace else []), *dict.fromkeys(ids)]
            for (kernel, sched), ids in groups.items()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="rerun the failed tests of a results directory",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("run", help="results directory, run id, latest or previous")
    p.add_argument("tests", nargs="*", metavar="TEST",
                   help="node ids or test function names (default: every failed test)")
    p.add_argument("--trace", action="store_true", help="trace the reruns (--ktstr-trace)")
    p.add_argument("--root", type=Path, default=Path.cwd(),
                   help="the checkout the test paths are relative to (default: .)")
    p.add_argument("--sandbox", default="auto", choices=("auto", "always", "never"),
                   help="run inside the emulated KVM host where KVM is unusable (auto)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    run_dir = resolve_run(args.run)
    records = load_run(run_dir)
    if not records:
        raise KtstrError(f"{run_dir}: not a results directory (no sidecars)")
    tests = plan_replay(records, args.tests, args.root.resolve())
    if not tests:
        print(f"{run_dir.name}: no failed tests to replay")
        return 0
    for t in tests:
        for warning in t.warnings:
            print(f"ktstr: warning: {warning}", file=sys.stderr)
    code = 0
    for argv in pytest_argv(tests, args.trace):
        print("ktstr replay: " + " ".join(argv[1:]), flush=True)
        if args.dry_run:
            continue
        from ktstr.sandbox.dispatch import dispatch

        rc = dispatch(args.sandbox, argv)
        if rc is None:
            rc = subprocess.run(argv, cwd=args.root, check=False).returncode
        code = code or rc
    return code
