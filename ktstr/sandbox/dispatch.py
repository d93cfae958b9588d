"""`--sandbox auto|always|never` for commands that need a usable KVM."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ktstr.errors import KtstrError
from ktstr.sandbox.detect import detect_kvm, in_sandbox
from ktstr.sandbox.run import run_in_sandbox

MODES = ("auto", "always", "never")


def self_argv(args: Sequence[str] | None = None) -> list[str]:
    """The command line that re-runs this `ktstr` invocation (inside the sandbox)."""
    return [sys.executable, "-m", "ktstr", *(sys.argv[1:] if args is None else args)]


def dispatch(mode: str, argv: Sequence[str]) -> int | None:
    """Run `argv` in the sandbox when `mode` asks for it; None means: run natively.

    auto: only where /dev/kvm is unusable (one-line notice on stderr); always:
    every time; never: not at all. Inside the sandbox it is always None, so
    nothing recurses.
    """
    if mode not in MODES:
        raise KtstrError(f"--sandbox {mode!r} is not one of {', '.join(MODES)}")
    if mode == "never" or in_sandbox():
        return None
    if mode == "auto":
        status = detect_kvm()
        if status.usable:
            return None
        print(f"ktstr: KVM unusable here ({status.reason}); running in the sandbox "
              f"(QEMU TCG with nested KVM)", file=sys.stderr)
    return run_in_sandbox(argv)
