"""Negative tests: a misbehaving scheduler must fail the run, and the harness must say why.

``scx_qmap``'s fault knobs: ``-t N`` stalls every N'th user thread, so the
kernel's sched_ext watchdog ejects the scheduler ("runnable task stall");
``-e N`` calls ``scx_bpf_error()`` after N enqueues. Both pin scx_qmap, so
kernels without sched_ext skip them.
"""

from __future__ import annotations

import pytest

from ktstr.scenario import CgroupDef
from ktstr.scheduler import BUILTIN
from ktstr.testing import execute_defs, ktstr_test

QMAP_STALL = BUILTIN["scx_qmap"].with_args("-t", "5", name="scx_qmap_stall")
QMAP_ERROR = BUILTIN["scx_qmap"].with_args("-e", "200", name="scx_qmap_error")


@pytest.mark.smoke
@ktstr_test(topology="1n1l2c1t", scheduler=QMAP_STALL, duration=6.0, watchdog_timeout=2.0,
            expect_err=r"runnable task stall: \S+ failed to run for", gauntlet=False)
def test_qmap_stall_is_ejected(ctx):
    """Stalled threads: the watchdog ejects the scheduler within its timeout.

    The kernel names the stalled task ("T[pid] failed to run for N s"); its other
    stall exit, "watchdog failed to check in", means the watchdog itself did not
    run and is not what -t provokes.
    """
    return execute_defs(ctx, [CgroupDef("victims", workers=6)])


@ktstr_test(topology="1n1l2c1t", scheduler=QMAP_ERROR, duration=3.0,
            expect_err=r"scx_bpf_error: test triggering error", gauntlet=False)
def test_qmap_error_is_reported(ctx):
    """scx_bpf_error() after 200 enqueues: the kernel disables the scheduler with
    reason scx_bpf_error and scx_qmap's message (not a generic runtime error)."""
    return execute_defs(ctx, [CgroupDef("load", workers=4)])
