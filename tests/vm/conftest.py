"""VM tests: every test here boots a kernel (through the ktstr pytest plugin).

Run them with `nox -s vm_tests` (which picks the kernel and scheduler and uses
the sandbox when this machine's KVM cannot boot Linux), or inside the sandbox:
`python -m ktstr sandbox run -- python -m pytest tests/vm --ktstr-scheduler scx_simple`.

Kernel and schedulers come from the plugin, for ``@ktstr_test`` functions and
fixture-based tests alike: ``--ktstr-kernel`` / ``KTSTR_KERNEL`` (default: the
catalog's default kernel), binaries found by ``ktstr.scheduler.discover``
(``$KTSTR_SCHEDULER_DIR``, the kernel entry's schedulers, PATH). Where VMs cannot
boot, a test that needs one fails with the plugin's hint (deselect them with
``-m "not vm"``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ktstr.errors import KtstrError
from ktstr.testing.plugin import KtstrTestFailure, session_state


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.path).replace("\\", "/"):
            item.add_marker("vm")


@pytest.fixture(scope="session")
def ktstr_kernel(pytestconfig: pytest.Config) -> Any:
    """The kernel under test, resolved once by the plugin (``ResolvedKernel``: bzimage, entry)."""
    try:
        return session_state(pytestconfig).vm_kernel()
    except (KtstrTestFailure, KtstrError) as err:
        message = str(err)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def scheduler_binary(ktstr_kernel: Any) -> Callable[[str], Path]:
    """``scheduler_binary("scx_qmap")``: the host binary, as ``@ktstr_test`` runs would find it.

    Skips (like the plugin) when the kernel has no sched_ext; fails when the binary
    is missing.
    """
    from ktstr.scheduler import discover

    def find(name: str) -> Path:
        entry = ktstr_kernel.entry
        if entry is not None and not entry.sched_ext:
            pytest.skip(f"{name} is a sched_ext scheduler; kernel {entry.id} "
                        f"({entry.version}) has no sched_ext")
        try:
            return discover(name, entry)
        except KtstrError as err:
            message = str(err)
        pytest.fail(message, pytrace=False)

    return find


@pytest.fixture(scope="session")
def guest(ktstr_kernel: Any, pytestconfig: pytest.Config) -> Callable[..., Any]:
    """``ktstr.runner.run_guest`` of a ``GuestRequest(**fields)`` for the kernel under test
    and the session's shared base initramfs (every VM test module and the kernel's
    schedulers, packed once)."""
    from ktstr.runner import GuestRequest, run_guest

    state = session_state(pytestconfig)
    bound = functools.partial(GuestRequest, ktstr_kernel.bzimage, test_files=state.test_files,
                              binaries=state.base_binaries())
    return lambda **fields: run_guest(bound(**fields))
