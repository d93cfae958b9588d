"""Is the KVM on this machine usable for booting Linux guests?

Checked fresh on every call (nothing is cached): a module can be loaded, a
permission changed or the machine rebooted between two runs. The checks go
from cheap to expensive and stop at the first failure:

1. `/dev/kvm` exists and opens read-write;
2. `KVM_GET_API_VERSION` answers 12 (the stable API);
3. the paravirtual `kvm_pvm` module is not the provider (it emulates ordinary
   guests instruction by instruction, ~2 M instructions/s);
4. a short throughput probe (`ktstr.probe.measure_guest_mips`), when that
   module is available, runs faster than ``MIN_GUEST_MIPS``.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ioctl_opt

KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")
KVM_API_VERSION = 12
KVMIO = 0xAE
KVM_GET_API_VERSION = ioctl_opt.IO(KVMIO, 0x00)

# Hardware KVM runs a tight guest loop at thousands of M instructions/s;
# emulating KVMs manage a few. Anything under this cannot boot a kernel in time.
MIN_GUEST_MIPS = 100.0


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str          # one line: why it is (not) usable
    paravirtual: bool = False
    mips: float | None = None  # probe result, when measured

    def __str__(self) -> str:
        return self.reason


def _open_error(err: OSError) -> str:
    if err.errno == errno.ENOENT:
        return f"{KVM_DEVICE} does not exist (no KVM in this kernel, or not loaded)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return (f"{KVM_DEVICE} is not writable by this user "
                f"(add the user to the 'kvm' group)")
    return f"{KVM_DEVICE} cannot be opened: {os.strerror(err.errno or 0)}"


def _load_probe() -> Callable[[], float] | None:
    try:
        from ktstr import probe
    except ImportError:
        return None
    fn = getattr(probe, "measure_guest_mips", None)
    return fn if callable(fn) else None


def detect_kvm(*, probe: bool = True,
               device: Path = KVM_DEVICE, pvm_module: Path = PVM_MODULE) -> KvmStatus:
    """Decide whether /dev/kvm can run a Linux guest at a useful speed."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return KvmStatus(False, _open_error(err))
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as err:
            return KvmStatus(False, f"{device} rejects KVM_GET_API_VERSION: "
                                    f"{os.strerror(err.errno or 0)}")
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return KvmStatus(False, f"{device} speaks KVM API version {version}, "
                                f"not {KVM_API_VERSION}")
    if pvm_module.exists():
        return KvmStatus(False, f"{device} is the paravirtual KVM (kvm_pvm): it emulates "
                                f"ordinary guests at a few M instructions/s", paravirtual=True)
    if probe:
        measure = _load_probe()
        if measure is not None:
            try:
                mips = float(measure())
            except TypeError:  # a probe with another signature: not this module's call
                mips = None
            except Exception as err:  # the probe failing is itself the verdict
                return KvmStatus(False, f"{device} failed the throughput probe: {err}")
            if mips is None:
                return KvmStatus(True, f"{device} is usable (API {version}; "
                                       f"throughput probe not callable)")
            if mips < MIN_GUEST_MIPS:
                return KvmStatus(False, f"{device} runs guests at {mips:.0f} M instructions/s "
                                        f"(needs >= {MIN_GUEST_MIPS:.0f}): emulated, too slow",
                                 mips=mips)
            return KvmStatus(True, f"{device} is usable ({mips:.0f} M guest instructions/s)",
                             mips=mips)
    return KvmStatus(True, f"{device} is usable (API {version}; throughput not measured)")


RESUME_ENV = "KTSTR_RESUME"
"""Set by ``ktstr sandbox run`` when it runs a command again after losing the sandbox: VM
tests that already passed under this run id (a passing sidecar) are not run again, so one
lost sandbox costs the tests it lost, not the whole session."""


def in_sandbox() -> bool:
    """True inside the sandbox VM, where nothing should start another one."""
    return os.environ.get("KTSTR_IN_SANDBOX") == "1"
