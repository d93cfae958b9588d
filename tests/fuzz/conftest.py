"""Fuzzing with hypothesis: one bounded, reproducible profile for every test in tests/fuzz.

The ``ktstr-fuzz`` profile runs :data:`FUZZ_EXAMPLES` examples per test (200, or
``KTSTR_FUZZ_EXAMPLES``), derandomized so a failure in CI reproduces anywhere, with
no deadline (a busy 2-core machine is not a bug) and no example database. It is
applied at collection to every hypothesis test under this directory that has no
``@settings`` of its own; loading it globally would change hypothesis tests in
other directories of the same session (settings bind when a test is decorated).
A test that needs its own settings can start from the profile:
``@settings(settings.get_profile(FUZZ_PROFILE), max_examples=...)``.

:func:`bounded_memory` asserts how much host memory one example may allocate.
"""

from __future__ import annotations

import contextlib
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, is_hypothesis_test, settings
from hypothesis.errors import InvalidArgument

FUZZ_PROFILE = "ktstr-fuzz"
FUZZ_EXAMPLES = int(os.environ.get("KTSTR_FUZZ_EXAMPLES", "200"))
HERE = Path(__file__).parent

settings.register_profile(
    FUZZ_PROFILE,
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    profile = settings.get_profile(FUZZ_PROFILE)
    for item in items:
        test = getattr(item, "obj", None)
        if HERE not in Path(item.path).parents or not is_hypothesis_test(test):
            continue
        with contextlib.suppress(InvalidArgument):  # it has settings of its own
            profile(test)


@contextlib.contextmanager
def _bounded(limit: int) -> Iterator[None]:
    """The body's peak traced allocation stays under ``limit`` bytes."""
    tracemalloc.start()
    try:
        yield
        _kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"one example allocated {peak} bytes at its peak (bound {limit})"


@pytest.fixture(scope="session")
def bounded_memory() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """``with bounded_memory(1 << 20): ...`` fails the example past 1 MiB of host memory.

    Session-scoped, so hypothesis tests may use it (nothing in it carries over)."""
    return _bounded
