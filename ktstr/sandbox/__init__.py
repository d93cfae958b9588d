"""The sandbox: an emulated KVM host (QEMU TCG, AMD SVM) for machines without usable KVM.

`run_in_sandbox(argv)` runs a command inside it; `dispatch(mode, argv)` does so
only when `--sandbox auto|always|never` says so; `detect_kvm()` tells whether
the local /dev/kvm can boot Linux guests at all.
"""

from __future__ import annotations

from ktstr.sandbox.detect import KvmStatus, detect_kvm, in_sandbox
from ktstr.sandbox.dispatch import MODES, dispatch, self_argv
from ktstr.sandbox.run import SandboxTimeout, run_in_sandbox

__all__ = ["MODES", "KvmStatus", "SandboxTimeout", "detect_kvm", "dispatch", "in_sandbox",
           "run_in_sandbox", "self_argv"]
