"""The one cpu-list parser and writer (``ktstr.cpulist``), used by host and guest alike."""

from __future__ import annotations

import pytest

from ktstr.cpulist import format_cpu_list, parse_cpu_list
from ktstr.errors import KtstrError


def test_cpu_list_round_trip() -> None:
    assert parse_cpu_list("0-3,8, 10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpu_list([11, 10, 8, 3, 2, 1, 0]) == "0-3,8,10-11"
    assert format_cpu_list([]) == ""
    with pytest.raises(KtstrError, match="cpu list"):
        parse_cpu_list("3-1")


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", [0]), ("0-3", [0, 1, 2, 3]), ("0-1,4,6-7", [0, 1, 4, 6, 7]), ("", [])],
)
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


def test_sysfs_lists_parse_with_their_newline() -> None:
    assert parse_cpu_list("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    assert parse_cpu_list("0-3\n") == [0, 1, 2, 3]


@pytest.mark.parametrize("text", ["3-1", "a", "1-", "0-3,x", "-2"])
def test_a_malformed_list_is_an_error_not_a_shorter_list(text: str) -> None:
    """Guest-reported lists (``ktstr boot``) used to lose a reversed range silently."""
    with pytest.raises(KtstrError, match="cpu list"):
        parse_cpu_list(text)
