"""Fixtures shared by more than one suite."""

from __future__ import annotations

import pytest
from wheelbuild import BuiltWheel, build_wheel


@pytest.fixture(scope="session")
def ktstr_wheel(tmp_path_factory: pytest.TempPathFactory) -> BuiltWheel:
    """ktstr's wheel, built once per session from a copy of the checkout."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))
