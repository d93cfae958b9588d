"""The sandbox's QEMU command line and kernel command line (pure builders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.sandbox.qemu import (
    ROOT_TAG,
    STDERR_PORT,
    STDOUT_PORT,
    Machine,
    Share,
    find_qemu,
    kernel_cmdline,
    qemu_command,
)

ROOT = Share(ROOT_TAG, Path("/"), "/", readonly=True, cache="loose")


def machine(**kw: object) -> Machine:
    base: dict[str, object] = dict(
        kernel=Path("/k/bzImage"), cmdline="console=ttyS0", memory_mb=4096, cpus=3,
        shares=[ROOT, Share("kt0", Path("/work/co"), "/work/co")],
        console_log=Path("/run/x/console.log"),
        stdout_path="/proc/self/fd/7", stderr_path="/proc/self/fd/8",
        disk=Path("/cache/disk.img"), qemu="/usr/bin/qemu-system-x86_64")
    base.update(kw)
    return Machine(**base)  # type: ignore[arg-type]


def option_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_machine_basics() -> None:
    argv = qemu_command(machine())
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert option_values(argv, "-machine")[0].startswith("microvm,")
    assert option_values(argv, "-accel") == ["tcg,thread=multi"]
    assert option_values(argv, "-cpu") == ["max"]
    assert option_values(argv, "-smp") == ["3"]
    assert option_values(argv, "-m") == ["4096"]
    assert option_values(argv, "-kernel") == ["/k/bzImage"]
    assert option_values(argv, "-append") == ["console=ttyS0"]
    for flag in ("-nodefaults", "-no-reboot", "-no-user-config"):
        assert flag in argv
    # Nothing PCI: the sandbox kernel only has virtio-mmio.
    devices = option_values(argv, "-device")
    assert devices and all("-pci" not in d for d in devices)


def test_shares_become_9p_devices_in_order() -> None:
    argv = qemu_command(machine())
    fsdevs = option_values(argv, "-fsdev")
    assert fsdevs[0] == "local,id=fs0,path=/,security_model=none,multidevs=remap,readonly=on"
    assert fsdevs[1] == "local,id=fs1,path=/work/co,security_model=none,multidevs=remap"
    nine_p = [d for d in option_values(argv, "-device") if d.startswith("virtio-9p-device")]
    assert nine_p == ["virtio-9p-device,fsdev=fs0,mount_tag=ktroot",
                      "virtio-9p-device,fsdev=fs1,mount_tag=kt0"]


def test_commas_in_paths_are_escaped() -> None:
    argv = qemu_command(machine(shares=[ROOT, Share("kt0", Path("/a,b"), "/a,b")],
                                disk=Path("/c,d/img")))
    assert "path=/a,,b," in option_values(argv, "-fsdev")[1]
    assert option_values(argv, "-drive")[0].startswith("file=/c,,d/img,")


def test_disk_and_ports() -> None:
    argv = qemu_command(machine())
    assert option_values(argv, "-drive") == [
        "file=/cache/disk.img,if=none,id=disk0,format=raw,discard=unmap"]
    devices = option_values(argv, "-device")
    assert "virtio-blk-device,drive=disk0" in devices
    assert f"virtserialport,chardev=out,name={STDOUT_PORT},nr=1" in devices
    assert f"virtserialport,chardev=err,name={STDERR_PORT},nr=2" in devices
    chardevs = option_values(argv, "-chardev")
    assert "file,id=out,path=/proc/self/fd/7" in chardevs
    assert "file,id=err,path=/proc/self/fd/8" in chardevs
    assert "file,id=con,path=/run/x/console.log" in chardevs
    assert option_values(argv, "-serial") == ["chardev:con"]


def test_no_disk() -> None:
    argv = qemu_command(machine(disk=None))
    assert "-drive" not in argv
    assert not any(d.startswith("virtio-blk") for d in option_values(argv, "-device"))


@pytest.mark.parametrize(("kw", "words"), [
    ({"cpus": 0}, "CPU"),
    ({"memory_mb": 100}, "too small"),
    ({"shares": [ROOT, Share(ROOT_TAG, Path("/x"), "/x")]}, "duplicate"),
])
def test_invalid_machines(kw: dict[str, object], words: str) -> None:
    with pytest.raises(KtstrError, match=words):
        qemu_command(machine(**kw))


def test_kernel_cmdline() -> None:
    line = kernel_cmdline(ROOT, "/tmp/r/share/init", tsc_khz=2596000)
    words = line.split()
    assert "root=ktroot" in words
    assert "rootfstype=9p" in words
    assert "ro" in words
    assert "init=/tmp/r/share/init" in words
    assert "panic=-1" in words
    assert "tsc_early_khz=2596000" in words and "tsc=reliable" in words
    # Quiet keeps warnings and worse: an oops's registers and call trace (level 4) too.
    assert "loglevel=5" in words and "quiet" not in words
    rootflags = next(w for w in words if w.startswith("rootflags="))
    assert "trans=virtio" in rootflags and "cache=loose" in rootflags


def test_kernel_cmdline_verbose_and_no_tsc() -> None:
    words = kernel_cmdline(ROOT, "/i", quiet=False).split()
    assert "loglevel=7" in words
    assert not any(w.startswith("tsc_early_khz") for w in words)


def test_kernel_cmdline_rejects_whitespace_in_init() -> None:
    with pytest.raises(KtstrError, match="whitespace"):
        kernel_cmdline(ROOT, "/tmp/with space/init")


def test_share_mount_options() -> None:
    assert Share("t", Path("/x"), "/x").mount_options().endswith("cache=mmap")
    assert ROOT.mount_options().endswith("cache=loose,ro")


def test_find_qemu_missing_names_the_package() -> None:
    with pytest.raises(KtstrError, match="apt-get install qemu-system-x86"):
        find_qemu("qemu-system-does-not-exist")
