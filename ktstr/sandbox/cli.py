"""`ktstr sandbox run|status`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ktstr import tools
from ktstr.errors import KtstrError
from ktstr.runid import run_id
from ktstr.sandbox.detect import RESUME_ENV, detect_kvm, in_sandbox
from ktstr.sandbox.kernel import describe_kernel
from ktstr.sandbox.qemu import QEMU_BINARY
from ktstr.sandbox.run import SandboxCrashed, run_in_sandbox


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sandbox", help="run commands in an emulated KVM host (QEMU TCG)",
                       description="The sandbox: a QEMU TCG VM whose kernel has KVM built "
                                   "in, for machines whose /dev/kvm cannot boot Linux.")
    ssub = p.add_subparsers(dest="sandbox_command", metavar="ACTION")
    ssub.required = True

    run = ssub.add_parser("run", help="run CMD inside the sandbox; exit with its status",
                          usage="ktstr sandbox run [OPTIONS] -- CMD [ARGS...]")
    run.add_argument("--memory-mb", type=int, default=None,
                     help="sandbox RAM (default: min(8192, half the host's RAM); "
                          "env KTSTR_SANDBOX_MEMORY_MB)")
    run.add_argument("--cpus", type=int, default=None,
                     help="sandbox vCPUs (default: host CPUs; env KTSTR_SANDBOX_CPUS)")
    run.add_argument("--timeout", type=float, default=None,
                     help="stop the VM after this many seconds, exit 124 "
                          "(default: none; env KTSTR_SANDBOX_TIMEOUT)")
    run.add_argument("--kernel", type=Path, default=None,
                     help="sandbox-flavour bzImage (default: $KTSTR_SANDBOX_KERNEL or the cache)")
    run.add_argument("--retries", type=int, default=0,
                     help="run the command again, up to N times, when the sandbox VM itself "
                          "dies before it finishes (exit 125 otherwise); only for commands "
                          "that are safe to repeat, such as a test run")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")
    run.set_defaults(func=_cmd_run)

    status = ssub.add_parser("status", help="is KVM usable here, and is the sandbox ready?")
    status.set_defaults(func=_cmd_status)


def _cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise KtstrError("no command given; usage: ktstr sandbox run [OPTIONS] -- CMD [ARGS...]")
    for name in ("memory_mb", "cpus"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise KtstrError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.retries < 0:
        raise KtstrError(f"--retries must be >= 0, got {args.retries}")
    if args.retries:
        run_id()  # one run id for every attempt: a retry finds what the lost one passed
    for attempt in range(args.retries + 1):
        try:
            return run_in_sandbox(command, memory_mb=args.memory_mb, cpus=args.cpus,
                                  timeout=args.timeout, kernel=args.kernel)
        except SandboxCrashed as err:
            if attempt == args.retries:
                raise
            print(f"ktstr: {err}; running the command again "
                  f"({attempt + 1} of {args.retries} retries)", file=sys.stderr, flush=True)
            # VM test suites skip what already passed in this run (ktstr.testing.plugin).
            os.environ[RESUME_ENV] = "1"
    raise AssertionError("unreachable")


def _qemu_line() -> str:
    path = tools.which(QEMU_BINARY)
    if path is None:
        return f"QEMU: not installed ({tools.install_hint(QEMU_BINARY)})"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
        version = out.splitlines()[0] if out else "version unknown"
    except (OSError, subprocess.TimeoutExpired):
        version = "version unknown"
    return f"QEMU: {path} ({version})"


def _cmd_status(_args: argparse.Namespace) -> int:
    if in_sandbox():
        print("KVM: inside the sandbox (KTSTR_IN_SANDBOX=1); " + detect_kvm(probe=False).reason)
        print("sandbox: not used (already inside it)")
    else:
        kvm = detect_kvm()
        print(f"KVM: {'usable' if kvm.usable else 'unusable'}: {kvm.reason}")
        print("sandbox: not needed with --sandbox auto (KVM is usable)" if kvm.usable else
              "sandbox: will be used with --sandbox auto (KVM is unusable here)")
    print(f"sandbox kernel: {describe_kernel().source}")
    print(_qemu_line())
    return 0
