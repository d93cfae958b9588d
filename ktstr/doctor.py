"""`ktstr doctor`: can this host build kernels and boot test VMs? One line per problem.

Fast (no build, no VM boot beyond the KVM throughput probe's tiny guest), so
every session can run it first. The tool and package checks use the standard
library only: the nox sessions call them in nox's own Python, which has no
ktstr dependencies; the other checks import what they need when they run.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ktstr import tools
from ktstr.errors import KtstrError
from ktstr.meminfo import meminfo_mb
from ktstr.paths import cache_root

GB = 1 << 30
SOURCE_TREE_GB = 1.7
"""An unpacked linux-source-6.12 tree (measured)."""
BUILD_TREE_GB = 1.5
"""One kernel build tree (objects, vmlinux with debug info)."""
MIN_FREE_GB = SOURCE_TREE_GB + 2 * BUILD_TREE_GB
"""A cold run: one source tree, the test kernel's and the sandbox kernel's build trees."""
WARN_FREE_GB = 10.0
"""Room for a second kernel id, results and disk templates besides."""


class Level(enum.Enum):
    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"


@dataclass(frozen=True)
class Finding:
    level: Level
    topic: str
    message: str
    """What was found and, for a problem, what to do."""
    tool: str | None = None
    package: str | None = None

    def line(self) -> str:
        if self.level is Level.PROBLEM:
            return f"{self.topic}: {self.message}"
        return f"{self.level.value}: {self.topic}: {self.message}"

    def to_json(self) -> dict[str, str | None]:
        return {"level": self.level.value, "topic": self.topic, "message": self.message,
                "tool": self.tool, "package": self.package}


def problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level is Level.PROBLEM]


# --- standard library only (the sessions run these in nox's Python) ---------------------------


def check_tools() -> list[Finding]:
    """Every program of the registry that the host must have is found."""
    needed = tools.required()
    missing = [t for t in needed if tools.which(t.name) is None]
    found = [Finding(Level.PROBLEM, "missing", f"{t.name} (install: {t.install}); {t.purpose}",
                     tool=t.name, package=t.package) for t in missing]
    if not missing:
        found.append(Finding(Level.OK, "tools", f"all {len(needed)} programs ktstr runs are "
                                                "installed (ktstr/tools.py)"))
    return found


def check_packages() -> list[Finding]:
    from ktstr.tools import PACKAGE_LIST, missing_packages, required_packages

    if tools.which("dpkg-query") is None:
        return []  # check_tools names dpkg-query; without it there is no package database
    missing = missing_packages(required_packages())
    if missing:
        names = " ".join(missing)
        return [Finding(Level.PROBLEM, "packages",
                        f"not installed: {names} (install: apt-get install {names})")]
    return [Finding(Level.OK, "packages", f"every package of {PACKAGE_LIST.name} is installed")]


# --- the rest -----------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_cache() -> list[Finding]:
    root = cache_root()
    fix = "set KTSTR_CACHE_DIR to a writable directory"
    if root.exists():
        if not root.is_dir():
            return [Finding(Level.PROBLEM, "cache", f"{root} is not a directory; {fix}")]
        try:
            fd, probe = tempfile.mkstemp(prefix=".doctor-", dir=root)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            return [Finding(Level.PROBLEM, "cache", f"{root} is not writable ({err.strerror}); "
                                                    f"{fix}")]
        return [Finding(Level.OK, "cache", f"{root} is writable")]
    parent = _existing_ancestor(root)
    read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    if read_only or not os.access(parent, os.W_OK | os.X_OK):
        return [Finding(Level.PROBLEM, "cache", f"{root} cannot be created: {parent} is not "
                                                f"writable; {fix}")]
    return [Finding(Level.OK, "cache", f"{root} will be created (in writable {parent})")]


def check_disk() -> list[Finding]:
    where = _existing_ancestor(cache_root())
    free_gb = shutil.disk_usage(where).free / GB
    need = (f"a cold run needs ~{MIN_FREE_GB:.1f} GB (kernel source {SOURCE_TREE_GB} GB + "
            f"test and sandbox kernel build trees, ~{BUILD_TREE_GB} GB each)")
    if free_gb < MIN_FREE_GB:
        return [Finding(Level.PROBLEM, "disk", f"{free_gb:.1f} GB free at {where}; {need}: "
                                               "free space or set KTSTR_CACHE_DIR elsewhere")]
    if free_gb < WARN_FREE_GB:
        return [Finding(Level.WARNING, "disk", f"{free_gb:.1f} GB free at {where}; {need}, and "
                                               f"{WARN_FREE_GB:.0f} GB leaves room for more "
                                               "kernels")]
    return [Finding(Level.OK, "disk", f"{free_gb:.0f} GB free at {where}")]


def check_kvm() -> tuple[list[Finding], bool]:
    """Findings, and whether VMs will run inside the sandbox."""
    from ktstr.sandbox.detect import detect_kvm, in_sandbox
    from ktstr.sandbox.qemu import QEMU_BINARY

    status = detect_kvm(probe=True)
    if status.usable:
        return [Finding(Level.OK, "kvm", status.reason)], False
    if in_sandbox():
        return [Finding(Level.PROBLEM, "kvm", f"inside the sandbox, and its KVM is not usable: "
                                              f"{status.reason}")], False
    qemu = tools.which(QEMU_BINARY)
    if qemu is None:
        return [Finding(Level.PROBLEM, "kvm",
                        f"not usable natively ({status.reason}), and the sandbox needs QEMU "
                        f"(install: {tools.install_hint(QEMU_BINARY)})",
                        tool=QEMU_BINARY, package=tools.tool(QEMU_BINARY).package)], True
    return [Finding(Level.OK, "kvm", f"not usable natively ({status.reason}); VMs run in the "
                                     f"sandbox ({qemu})")], True


def check_memory(sandbox: bool) -> list[Finding]:
    from ktstr.sandbox.run import MAX_DEFAULT_MEMORY_MB, MEMORY_ENV, default_memory_mb
    from ktstr.testing.run import DEFAULT_MEMORY_MB

    available = meminfo_mb("MemAvailable")
    if available is None:
        return [Finding(Level.WARNING, "memory", "cannot read MemAvailable from /proc/meminfo")]
    if sandbox:
        try:
            need = default_memory_mb()
        except KtstrError as err:
            return [Finding(Level.PROBLEM, "memory", str(err))]
        what = (f"the sandbox wants {need} MB (min({MAX_DEFAULT_MEMORY_MB}, half the RAM), "
                f"or ${MEMORY_ENV})")
        fix = f"free memory or set {MEMORY_ENV} lower"
    else:
        need, what = DEFAULT_MEMORY_MB, f"a test VM wants {DEFAULT_MEMORY_MB} MB by default"
        fix = "free memory"
    if available < need:
        return [Finding(Level.PROBLEM, "memory", f"{available} MB available; {what}: {fix}")]
    return [Finding(Level.OK, "memory", f"{available} MB available; {what}")]


def check_reflink() -> list[Finding]:
    """An explicit disk cache must clone (FICLONE): the per-test disks are reflink copies."""
    from ktstr.disks.template import (
        DISK_CACHE_ENV,
        fs_type,
        verify_cache_dir_supports_reflink,
    )

    value = os.environ.get(DISK_CACHE_ENV)
    if not value:
        return []
    try:
        directory = verify_cache_dir_supports_reflink(Path(value).expanduser())
    except KtstrError as err:
        return [Finding(Level.PROBLEM, "reflink", str(err))]
    return [Finding(Level.OK, "reflink", f"${DISK_CACHE_ENV} {directory} ({fs_type(directory)}) "
                                         "can reflink")]


def run_checks() -> list[Finding]:
    kvm, sandbox = check_kvm()
    steps: list[Callable[[], list[Finding]]] = [
        check_tools, check_packages, check_cache, check_disk,
        lambda: check_memory(sandbox), check_reflink,
    ]
    findings = list(kvm)
    for step in steps:
        findings += step()
    return findings


def _cmd(args: argparse.Namespace) -> int:
    findings = run_checks()
    bad = problems(findings)
    if args.json:
        print(json.dumps({"ok": not bad, "findings": [f.to_json() for f in findings]}, indent=1))
    else:
        for finding in findings:
            print(finding.line())
        print(f"doctor: {len(bad)} problem(s)" if bad else "ok: this host is ready")
    return 1 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this host: KVM or sandbox, tools, cache, disk, memory",
                       description="Check what ktstr needs on this host and print one line per "
                                   "problem with what to do. Exit 1 when there is a problem.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd)
