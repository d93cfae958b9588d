"""The outer VM's QEMU command line: pure functions from a description to argv.

The sandbox is a QEMU TCG machine whose CPU (`-cpu max`) emulates AMD SVM, so
its kernel (KVM_AMD built in) offers a real /dev/kvm. Boot time matters most:
`microvm` (no PCI, no legacy devices, tiny qboot firmware), `-nodefaults`,
direct `-kernel` boot, virtio-mmio devices only, and the host filesystem over
QEMU's built-in 9p server (no daemon to start).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ktstr import tools
from ktstr.errors import KtstrError

QEMU_BINARY = "qemu-system-x86_64"
ROOT_TAG = "ktroot"
STDOUT_PORT = "ktstr.stdout"
STDERR_PORT = "ktstr.stderr"
# The largest msize the Linux virtio 9p transport accepts: fewer, bigger messages.
MSIZE = 512000


@dataclass(frozen=True)
class Share:
    """A host directory exported over 9p and mounted at `guest_path` inside."""

    tag: str
    host_path: Path
    guest_path: str
    readonly: bool = False
    # Guest-side 9p cache mode: "loose" for the read-only root (fast imports),
    # "mmap" for writable shares (coherent, and shared writable mmap works).
    cache: str = "mmap"

    def mount_options(self) -> str:
        opts = f"trans=virtio,version=9p2000.L,msize={MSIZE},cache={self.cache}"
        return opts + (",ro" if self.readonly else "")


@dataclass(frozen=True)
class Machine:
    """Everything the outer VM's command line depends on."""

    kernel: Path
    cmdline: str
    memory_mb: int
    cpus: int
    shares: Sequence[Share]
    console_log: Path           # kernel console (ttyS0): diagnostics only
    stdout_path: str            # where the command's stdout port writes
    stderr_path: str
    disk: Path | None = None    # raw btrfs image for disk templates (/dev/vda)
    qemu: str = QEMU_BINARY
    extra_args: Sequence[str] = field(default_factory=tuple)
    reset_log: Path | None = None  # QEMU's own log of CPU resets (a triple fault says so)


def _esc(value: object) -> str:
    """QEMU option values escape commas by doubling them."""
    return str(value).replace(",", ",,")


def kernel_cmdline(root: Share, init: str, *, quiet: bool = True,
                   tsc_khz: int | None = None, hz: int | None = None,
                   extra: Sequence[str] = ()) -> str:
    """The outer kernel's command line: 9p root (read-only), our init, no reboot loops."""
    if any(c.isspace() for c in init):
        raise KtstrError(f"sandbox init path {init!r} contains whitespace; "
                         f"set TMPDIR to a path without spaces")
    parts = [
        "console=ttyS0",
        # Quiet: warnings and worse, so an oops's whole report (its registers and call
        # trace print at the default level, 4) reaches the log, not just the panic line.
        "loglevel=5" if quiet else "loglevel=7 printk.time=1",
        f"root={root.tag}", "rootfstype=9p", f"rootflags={root.mount_options()}", "ro",
        f"init={init}",
        # A guest that dies must end QEMU (with -no-reboot), never hang it.
        "panic=-1", "reboot=t",
        # Fewer boot-time costs under emulation.
        "mitigations=off", "nokaslr", "8250.nr_uarts=1", "no_timer_check",
        "random.trust_cpu=on",
        # microvm has no HPET/PM timer to calibrate the TSC against (see tsc.py).
        *([f"tsc_early_khz={tsc_khz}", "tsc=reliable"] if tsc_khz else []),
        # Secondary CPUs otherwise calibrate their delay loop, slowly and in vain.
        *([f"lpj={tsc_khz * 1000 // hz}"] if tsc_khz and hz else []),
        *extra,
    ]
    return " ".join(parts)


def qemu_command(m: Machine) -> list[str]:
    """argv for the outer VM. Device order fixes guest names: /dev/vda is `disk`."""
    if m.cpus < 1:
        raise KtstrError(f"sandbox needs at least 1 CPU, got {m.cpus}")
    if m.memory_mb < 512:
        raise KtstrError(f"sandbox memory {m.memory_mb} MB is too small; use >= 512 MB")
    tags = [s.tag for s in m.shares]
    if len(set(tags)) != len(tags):
        raise KtstrError(f"duplicate 9p share tags: {tags}")
    argv = [
        m.qemu,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel", "tcg,thread=multi",
        "-cpu", "max",
        "-smp", str(m.cpus),
        "-m", str(m.memory_mb),
        "-kernel", str(m.kernel),
        "-append", m.cmdline,
        "-chardev", f"file,id=con,path={_esc(m.console_log)}",
        "-serial", "chardev:con",
    ]
    for i, share in enumerate(m.shares):
        fs = f"local,id=fs{i},path={_esc(share.host_path)},security_model=none,multidevs=remap"
        if share.readonly:
            fs += ",readonly=on"
        argv += ["-fsdev", fs,
                 "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={_esc(share.tag)}"]
    if m.disk is not None:
        argv += ["-drive", f"file={_esc(m.disk)},if=none,id=disk0,format=raw,discard=unmap",
                 "-device", "virtio-blk-device,drive=disk0"]
    argv += [
        "-device", "virtio-serial-device,max_ports=3",
        "-chardev", f"file,id=out,path={_esc(m.stdout_path)}",
        "-device", f"virtserialport,chardev=out,name={STDOUT_PORT},nr=1",
        "-chardev", f"file,id=err,path={_esc(m.stderr_path)}",
        "-device", f"virtserialport,chardev=err,name={STDERR_PORT},nr=2",
    ]
    if m.reset_log is not None:
        argv += ["-d", "cpu_reset", "-D", str(m.reset_log)]
    argv += list(m.extra_args)
    return argv


def find_qemu(name: str = QEMU_BINARY) -> str:
    """The distribution's QEMU, or an error that says how to install it."""
    path = shutil.which(name)
    if path is None:
        raise KtstrError(f"{name} not found; the sandbox needs QEMU: "
                         f"{tools.install_hint(QEMU_BINARY)}")
    return path
