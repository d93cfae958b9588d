"""Token-bucket math with a controlled clock (no sleeping), plus one real-time check."""

from __future__ import annotations

import threading
import time

import pytest

from ktstr.vmm.throttle import MAX_THROTTLE_WAIT, DiskThrottle, Throttle, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_bucket_starts_full_then_paces() -> None:
    clock = Clock()
    b = TokenBucket(rate=100, capacity=100, clock=clock)
    assert [b.reserve(1) for _ in range(100)] == [0.0] * 100
    # The 101st waits one token's time, the 102nd two.
    assert b.reserve(1) == pytest.approx(0.01)
    assert b.reserve(1) == pytest.approx(0.02)


def test_bucket_refills_but_caps_at_capacity() -> None:
    clock = Clock()
    b = TokenBucket(rate=10, capacity=20, clock=clock)
    b.reserve(20)
    clock.now += 0.5
    assert b.tokens == pytest.approx(5)
    clock.now += 100
    assert b.tokens == pytest.approx(20)


def test_request_larger_than_bucket_goes_into_debt() -> None:
    clock = Clock()
    b = TokenBucket(rate=1000, capacity=1000, clock=clock)
    assert b.reserve(5000) == pytest.approx(4.0)  # admitted; pays 4 s of debt
    assert b.tokens == pytest.approx(-4000)
    assert b.reserve(1000) == pytest.approx(5.0)  # queued behind the debt


def test_clock_going_backwards_does_not_mint_tokens() -> None:
    clock = Clock()
    b = TokenBucket(rate=10, capacity=10, clock=clock)
    b.reserve(10)
    clock.now -= 50
    assert b.tokens == pytest.approx(0)


def test_bad_bucket() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, capacity=10)
    with pytest.raises(ValueError):
        TokenBucket(rate=10, capacity=5)


def test_long_run_rate_is_exact() -> None:
    """Serving back-to-back requests, the achieved IOPS converges on the limit."""
    clock = Clock()
    t = Throttle(DiskThrottle(iops=100), clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(1100):
        t.wait(4096)
    # 100 from the initial burst, then exactly 100/s.
    assert clock.now - start == pytest.approx(10.0)


def test_both_buckets_take_the_larger_delay() -> None:
    clock = Clock()
    t = Throttle(DiskThrottle(iops=1000, bytes_per_sec=1 << 20), clock=clock, sleep=clock.sleep)
    assert t.reserve(1 << 20) == 0.0  # burst covers one MiB and one op
    # Bandwidth is the binding limit for big requests...
    assert t.reserve(1 << 19) == pytest.approx(0.5)
    # ...and IOPS is irrelevant while bandwidth debt dominates.
    assert t.reserve(0) == pytest.approx(0.0)


def test_burst_capacity_allows_larger_burst() -> None:
    clock = Clock()
    t = Throttle(DiskThrottle(iops=10, iops_burst_capacity=50), clock=clock, sleep=clock.sleep)
    delays = [t.reserve(0) for _ in range(51)]
    assert delays[:50] == [0.0] * 50
    assert delays[50] == pytest.approx(0.1)


def test_unthrottled() -> None:
    t = Throttle(DiskThrottle(iops=0, bytes_per_sec=None))
    assert not t.active
    assert t.wait(1 << 30) == 0.0


def test_real_time_rate() -> None:
    """With the real clock and sleep: 40 ops after draining the burst, at 200 IOPS, take ~0.2 s."""
    t = Throttle(DiskThrottle(iops=200, iops_burst_capacity=200))
    for _ in range(200):
        t.wait(0)
    start = time.monotonic()
    for _ in range(40):
        t.wait(0)
    elapsed = time.monotonic() - start
    assert 0.18 <= elapsed <= 0.4


def test_one_wait_is_capped_and_the_debt_is_kept() -> None:
    """A 100x-the-rate request sleeps the cap, not 99 s; its debt paces what follows."""
    clock = Clock()
    t = Throttle(DiskThrottle(bytes_per_sec=1000), clock=clock, sleep=clock.sleep)
    assert t.wait(100_000) == MAX_THROTTLE_WAIT
    assert clock.slept == [MAX_THROTTLE_WAIT]
    assert t.bytes is not None and t.bytes.tokens == pytest.approx(1000 - 100_000 + 1000)
    assert t.wait(1) == MAX_THROTTLE_WAIT  # still 97 s of debt ahead of it
    clock.now += 200
    assert t.wait(1) == 0.0  # paid off


def test_close_wakes_a_waiter_at_once() -> None:
    t = Throttle(DiskThrottle(iops=1))
    t.wait(0)  # the burst's one token; the next op waits a whole second
    waiter = threading.Thread(target=t.wait, args=(0,))
    waiter.start()
    time.sleep(0.05)
    start = time.monotonic()
    t.close()
    waiter.join(2)
    assert not waiter.is_alive()
    assert time.monotonic() - start < 0.3
    start = time.monotonic()
    t.wait(0)  # and a closed throttle no longer sleeps at all
    assert time.monotonic() - start < 0.1
