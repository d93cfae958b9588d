"""What every command that boots a VM shares: its options and the start of its body.

``ktstr boot``, ``ktstr shell`` and ``ktstr selftests`` take the same VM options and
begin the same way: check the topology and memory, resolve the kernel, then re-run
inside the sandbox where KVM cannot boot Linux. One definition each, here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ktstr.errors import KtstrError
from ktstr.topology import Topology


def add_vm_arguments(parser: argparse.ArgumentParser) -> None:
    """--kernel, --topology, --memory-mb, --console and --sandbox."""
    parser.add_argument("--kernel", required=True,
                        help="catalog id or path to a bzImage / build tree")
    parser.add_argument("--topology", default="1n1l2c1t",
                        help="label like 1n2l4c2t or a preset name")
    parser.add_argument("--memory-mb", type=int, default=2048, help="guest memory (default 2048)")
    parser.add_argument("--console", action="store_true", help="stream the guest console to stderr")
    parser.add_argument("--sandbox", default="auto", choices=("auto", "always", "never"),
                        help="run inside the emulated KVM host: where KVM is unusable (auto), "
                        "always, or never")


def _to_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def console_stream(enabled: bool) -> Callable[[bytes], None] | None:
    """The ``on_console`` callback of a VM command's ``--console``: guest bytes to stderr."""
    return _to_stderr if enabled else None


def vm_topology(args: argparse.Namespace) -> Topology:
    """``--topology`` parsed and ``--memory-mb`` checked against it (one clear error each)."""
    from ktstr.vmm import layout

    topology = Topology.parse(args.topology)
    minimum = layout.MIN_MEMORY_BYTES // layout.MiB
    if args.memory_mb < minimum:
        raise KtstrError(f"--memory-mb {args.memory_mb} is too small: use at least {minimum}")
    topology.node_memory_mb(args.memory_mb)
    return topology


def sandbox_exit_code(args: argparse.Namespace) -> int | None:
    """Per ``--sandbox``: this command re-run inside the sandbox (its exit code), or None to
    go on natively."""
    from ktstr.sandbox.dispatch import dispatch, self_argv

    return dispatch(args.sandbox, self_argv())


@dataclass(frozen=True)
class VmCommand:
    """What a VM command boots: the resolved bzImage on the checked topology."""

    kernel: Path
    topology: Topology


def start_vm_command(args: argparse.Namespace,
                     check: Callable[[argparse.Namespace], None] | None = None,
                     ) -> VmCommand | int:
    """The shared start of ``ktstr boot`` and ``ktstr shell``: topology and memory checks,
    the command's own ``check`` of its other options, kernel resolution (which may build
    it), then the sandbox. An int is the exit code of the command run in the sandbox."""
    topology = vm_topology(args)
    if check is not None:
        check(args)
    from ktstr.kernel import resolve_kernel

    kernel = resolve_kernel(args.kernel).bzimage
    code = sandbox_exit_code(args)
    if code is not None:
        return code
    return VmCommand(kernel, topology)
