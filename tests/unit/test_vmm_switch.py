"""The GIL switch interval is short while any VM of the process runs, and restored after."""

from __future__ import annotations

import sys

from ktstr.vmm.vm import SWITCH_INTERVAL_S, gil_switch_interval


def test_the_interval_is_short_while_any_run_lasts_and_restored_after_the_last() -> None:
    before = sys.getswitchinterval()
    assert before > SWITCH_INTERVAL_S
    with gil_switch_interval(SWITCH_INTERVAL_S):
        assert sys.getswitchinterval() == SWITCH_INTERVAL_S
        with gil_switch_interval(SWITCH_INTERVAL_S):  # a second VM in another thread
            pass
        assert sys.getswitchinterval() == SWITCH_INTERVAL_S  # the first still runs
    assert sys.getswitchinterval() == before


def test_a_longer_interval_than_the_process_has_is_not_taken() -> None:
    before = sys.getswitchinterval()
    with gil_switch_interval(before * 10):
        assert sys.getswitchinterval() == before
    assert sys.getswitchinterval() == before
