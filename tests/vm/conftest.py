"""VM tests: every test here boots a kernel (through the ktstr pytest plugin).

Run them with `nox -s vm_tests` (which picks the kernel and scheduler and uses
the sandbox when this machine's KVM cannot boot Linux), or inside the sandbox:
`python -m ktstr sandbox run -- python -m pytest tests/vm --ktstr-scheduler scx_simple`.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.path).replace("\\", "/"):
            item.add_marker("vm")
