"""The external programs ktstr runs on the host, and the Debian package of each.

One registry for every program the host side invokes: directly (argv lists,
``which`` look-ups), through the kernel's and sched_ext's Makefiles (which run
compilers, linkers, lexers, compressors by name), or by packing it into a guest
(busybox, mkfs). ``ktstr/sessions/debian-packages.txt`` must install each of
them: ``tests/unit/test_tools.py`` checks the code against this registry and
the registry against dpkg, and ``ktstr doctor`` reports what is missing here.

Standard library only: the nox sessions import it in nox's own Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ktstr.errors import KtstrError

SBIN_DIRS = ("/usr/sbin", "/sbin")
"""Searched after PATH: a user's PATH often lacks them, yet their programs (mkfs)
run fine by full path for what ktstr does with them."""


@dataclass(frozen=True)
class Tool:
    name: str
    package: str | None
    """The Debian package that installs ``name``; None for a program ktstr uses only
    when it is already there (never a requirement of the host)."""
    purpose: str

    @property
    def install(self) -> str:
        return f"apt-get install {self.package}" if self.package else "not installed by ktstr"


def _tools(*rows: tuple[str, str | None, str]) -> dict[str, Tool]:
    return {name: Tool(name, package, purpose) for name, package, purpose in rows}


# The LLVM tools are those tools/scripts/Makefile.include picks for LLVM=-19
# (ktstr.kernel.schedulers passes LLVM=<clang suffix>).
TOOLS: dict[str, Tool] = _tools(
    # kernel sources and `make` in a kernel tree
    ("tar", "tar", "unpacks kernel source tarballs"),
    ("xz", "xz-utils", "tar runs it to unpack linux-source-*.tar.xz"),
    ("git", "git", "reads kernel trees that are git checkouts; finds the checkout the "
                   "sandbox shares"),
    ("make", "make", "runs the kernel and sched_ext builds"),
    ("gcc", "gcc", "the kernel's compiler and host-program compiler"),
    ("as", "binutils", "assembles kernel sources (called by gcc)"),
    ("ld", "binutils", "links the kernel"),
    ("objcopy", "binutils", "builds the bzImage; strips debug info from initramfs ELF files"),
    ("flex", "flex", "kconfig and dtc lexers in the kernel build"),
    ("bison", "bison", "kconfig parser in the kernel build"),
    ("bc", "bc", "kernel/time constants in the kernel build"),
    ("awk", "mawk", "kernel build scripts (x86 instruction tables, ...)"),
    ("pahole", "pahole", "generates the kernel's BTF (CONFIG_DEBUG_INFO_BTF)"),
    ("gzip", "gzip", "compresses the in-kernel config (CONFIG_IKCONFIG)"),
    ("lz4", "lz4", "compresses the kernel (CONFIG_KERNEL_LZ4) and lz4 initramfs archives"),
    # sched_ext example schedulers: make -C tools/sched_ext CC=clang-19 LLVM=-19
    ("clang-19", "clang-19", "compiles the sched_ext schedulers and their BPF programs"),
    ("ld.lld-19", "lld-19", "links libbpf and bpftool in the sched_ext build (LD for LLVM=-19)"),
    ("llvm-ar-19", "llvm-19", "archives libbpf in the sched_ext build (AR for LLVM=-19)"),
    ("llvm-strip-19", "llvm-19", "strips bpftool's BPF skeletons in the sched_ext build"),
    ("diff", "diffutils", "compares the linked BPF objects in the sched_ext build"),
    # initramfs and guests
    ("zstd", "zstd", "zstd initramfs compression"),
    ("busybox", "busybox-static", "packed into guests: `ktstr shell`, the disk-template "
                                  "VM, the sandbox's init"),
    # scenario payloads (ktstr.scenario.payload), packed into guests
    ("hackbench", "rt-tests", "the HACKBENCH payload: message passing between process groups"),
    ("cyclictest", "rt-tests", "the CYCLICTEST payload: timer wake-up latency"),
    ("stress-ng", "stress-ng", "the STRESS_NG_CPU payload: CPU stressor throughput"),
    # disks
    ("mkfs.btrfs", "btrfs-progs", "formats btrfs disk templates and the sandbox's disk cache"),
    ("mkfs.ext4", "e2fsprogs", "formats ext4 disk templates"),
    ("losetup", "mount", "attaches the loop-mounted btrfs scratch image"),
    ("mount", "mount", "mounts the btrfs scratch image"),
    ("umount", "mount", "unmounts the btrfs scratch image"),
    # the sandbox (emulated KVM host)
    ("qemu-system-x86_64", "qemu-system-x86", "runs the sandbox where KVM cannot boot Linux"),
    ("setpriv", "util-linux", "drops to the caller's uid/gid inside the sandbox"),
    ("pyenv", None, "resolves a pyenv shim to its program for the sandbox, when PATH has "
                    "pyenv shims"),
    # host packages
    ("dpkg-query", "dpkg", "checks which Debian packages are installed"),
    ("apt-get", "apt", "installs missing Debian packages"),
    # unit tests
    ("iasl", "acpica-tools", "unit tests disassemble the ACPI tables"),
    ("cpio", "cpio", "unit tests read back the initramfs archives"),
    ("pgrep", "procps", "unit tests look for processes a killed build left behind"),
)


def tool(name: str) -> Tool:
    """The registry entry; KeyError for a program the registry does not know."""
    return TOOLS[name]


def search_path(path: str | None = None) -> str:
    """PATH, then /usr/sbin and /sbin."""
    base = os.environ.get("PATH", os.defpath) if path is None else path
    return os.pathsep.join([base, *SBIN_DIRS])


def which(name: str, path: str | None = None) -> str | None:
    """Where the registered program ``name`` is, or None. ``path`` replaces the search path."""
    tool(name)
    return shutil.which(name, path=search_path() if path is None else path)


def install_hint(name: str) -> str:
    """``apt-get install PKG`` for the registered program ``name``."""
    return tool(name).install


def missing_message(name: str, why: str | None = None) -> str:
    entry = tool(name)
    return f"{name} not found ({why or entry.purpose}): {entry.install}"


def require(name: str, *, why: str | None = None, path: str | None = None) -> str:
    """The path of the registered program ``name``, or KtstrError naming its package."""
    found = which(name, path)
    if found is None:
        raise KtstrError(missing_message(name, why))
    return found


def required() -> list[Tool]:
    """Tools the host must have: every entry with a Debian package."""
    return [t for t in TOOLS.values() if t.package is not None]


# --- the host's Debian packages ----------------------------------------------------------

PACKAGE_LIST = Path(__file__).parent / "sessions" / "debian-packages.txt"
"""The Debian packages a host needs (the nox sessions and CI install them)."""


def required_packages() -> list[str]:
    lines = PACKAGE_LIST.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def missing_packages(packages: list[str]) -> list[str]:
    """Packages dpkg does not report as installed."""
    if not which("dpkg-query"):
        return []
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]
