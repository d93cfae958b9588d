"""`ktstr shell`: a busybox shell in a fresh test VM.

With ``--exec CMD`` the command runs under ``sh -c`` in the guest; its stdout
and stderr come back over the result channel and are printed here, and the
command's exit status becomes ours. Without ``--exec`` and with a terminal
on stdin, the shell is interactive on the serial console.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import threading
from pathlib import Path
from typing import Any

from ktstr.cliargs import add_vm_arguments, console_stream, start_vm_command
from ktstr.errors import KtstrError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shell",
        help="run a shell command (or an interactive shell) in a test VM",
        description="Boot KERNEL with the ktstr guest runtime and run CMD with busybox sh; "
        "prints its output and exits with its status.",
    )
    add_vm_arguments(p)
    p.add_argument("--timeout", type=float, default=None,
                   help="hard timeout in seconds (default 120 with --exec, 3600 interactive)")
    p.add_argument("--exec", dest="command", default=None, help="command for sh -c")
    p.add_argument("--binary", action="append", default=[], type=Path,
                   help="also pack this host binary (and its libraries); repeatable")
    p.set_defaults(func=_cmd_shell)


def _check_shell_args(args: argparse.Namespace) -> None:
    if args.command is None and not sys.stdin.isatty():
        raise KtstrError("ktstr shell: give --exec CMD, or run it from a terminal for an "
                         "interactive shell")
    for b in args.binary:
        if not b.is_file():
            raise KtstrError(f"--binary {b}: no such file")


def _to_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _cmd_shell(args: argparse.Namespace) -> int:
    start = start_vm_command(args, _check_shell_args)
    if isinstance(start, int):
        return start
    kernel, topology = start.kernel, start.topology
    interactive = args.command is None

    from ktstr.runner import GuestRequest, run_guest

    timeout = args.timeout or (3600.0 if interactive else 120.0)
    # Interactive: the guest's console is the terminal; else --console goes to stderr.
    stream = _to_stdout if interactive else console_stream(args.console)

    hook = _interactive_hook if interactive else None
    run = run_guest(GuestRequest(
        kernel, shell=args.command, interactive=interactive, topology=topology,
        memory_mb=args.memory_mb, timeout=timeout, binaries=args.binary,
        on_console=stream, quiet=True, vm_hook=hook))
    if run.shell is not None:
        sys.stdout.write(run.shell.get("stdout", ""))
        sys.stdout.flush()
        sys.stderr.write(run.shell.get("stderr", ""))
        sys.stderr.flush()
    if run.failure is not None:
        print(f"ktstr shell: {run.summary()}", file=sys.stderr)
        return 1 if run.exit_code in (None, 0) else int(run.exit_code)
    if run.exit_code is None:
        print("ktstr shell: the guest did not report an exit status", file=sys.stderr)
        return 1
    return int(run.exit_code)


def _interactive_hook(vm: Any) -> None:
    """Forward the terminal to the guest's COM1 while the VM runs (raw mode)."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def pump() -> None:
        tty.setraw(fd)
        try:
            while True:
                com1 = getattr(vm, "com1", None)
                machine = getattr(vm, "machine", None)
                ready, _, _ = select.select([fd], [], [], 0.2)
                if machine is not None and getattr(machine, "_closed", False):
                    break
                if ready and com1 is not None:
                    data = os.read(fd, 1024)
                    if not data:
                        break
                    com1.queue_input(data.replace(b"\x7f", b"\x08"))
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    threading.Thread(target=pump, name="ktstr-shell-stdin", daemon=True).start()
