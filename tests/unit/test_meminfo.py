"""The one /proc/meminfo reader: every sizing decision starts from the same MemTotal."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.gauntlet import HostCapacity
from ktstr.meminfo import host_memory_mb, meminfo_mb

SAMPLE = "MemTotal:       24576000 kB\nMemFree:  1000 kB\nMemAvailable:   20480000 kB\n"


def test_fields_in_mb(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(SAMPLE)
    assert meminfo_mb("MemTotal", path) == 24000
    assert meminfo_mb("MemAvailable", path) == 20000
    assert meminfo_mb("MemFre", path) is None  # a prefix is not the field
    assert host_memory_mb(path) == 24000


def test_unreadable_meminfo_is_an_error_not_a_guess(tmp_path: Path) -> None:
    with pytest.raises(KtstrError, match="MemTotal"):
        host_memory_mb(tmp_path / "missing")
    (tmp_path / "garbled").write_text("MemTotal: lots\n")
    assert meminfo_mb("MemTotal", tmp_path / "garbled") is None


def test_every_sizing_caller_sees_the_same_total() -> None:
    from ktstr.sandbox import run as sandbox_run
    from ktstr.sessions import vm as sessions_vm

    total = host_memory_mb()
    assert total > 0
    assert HostCapacity.detect().memory_mb == total
    assert sandbox_run.host_memory_mb is host_memory_mb
    assert sessions_vm.host_memory_mb is host_memory_mb
