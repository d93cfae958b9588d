"""Token buckets for disk throttling: requests are delayed, never failed.

A bucket may go into debt: a request larger than what is available (even
larger than the whole bucket) is admitted at once and the debt is paid off
by the delay it gets and by the delays of the requests behind it. That keeps
the long-run rate exact and never starves a large request. No single wait is
longer than MAX_THROTTLE_WAIT, and close() ends any wait at once, so a guest
asking for a huge transfer cannot pin the device's worker for minutes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ktstr.errors import KtstrError

Clock = Callable[[], float]

MAX_THROTTLE_WAIT = 1.0
"""Seconds one request waits at most; the rest of its debt paces the requests behind it."""


@dataclass(frozen=True)
class DiskThrottle:
    """Token-bucket limits enforced by the virtio-blk device.

    A rate of None or 0 means unthrottled. A burst capacity is the bucket
    size; it defaults to one second of the rate and may not be smaller.
    Exhausted tokens delay requests, they never fail them.
    """

    iops: int | None = None
    bytes_per_sec: int | None = None
    iops_burst_capacity: int | None = None
    bytes_burst_capacity: int | None = None

    def validate(self, where: str = "disk") -> None:
        for rate_name, burst_name in (
            ("iops", "iops_burst_capacity"),
            ("bytes_per_sec", "bytes_burst_capacity"),
        ):
            rate = getattr(self, rate_name)
            burst = getattr(self, burst_name)
            for name, value in ((rate_name, rate), (burst_name, burst)):
                if value is not None and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 0
                ):
                    raise KtstrError(
                        f"{where}: throttle {name}={value!r} must be a non-negative integer or None"
                    )
            if not rate:
                if burst:
                    raise KtstrError(
                        f"{where}: throttle {burst_name}={burst} is set without {rate_name}; "
                        f"set {rate_name} too, or drop the burst"
                    )
                continue
            if burst is not None and burst != 0 and burst < rate:
                raise KtstrError(
                    f"{where}: throttle {burst_name}={burst} is smaller than {rate_name}={rate}; "
                    "the bucket must hold at least one second of tokens"
                )

    @property
    def effective_iops(self) -> tuple[int, int] | None:
        """(rate, burst) for the IOPS bucket, or None when unthrottled."""
        return _effective(self.iops, self.iops_burst_capacity)

    @property
    def effective_bytes(self) -> tuple[int, int] | None:
        """(rate, burst) for the bandwidth bucket, or None when unthrottled."""
        return _effective(self.bytes_per_sec, self.bytes_burst_capacity)

    @property
    def active(self) -> bool:
        return self.effective_iops is not None or self.effective_bytes is not None


def _effective(rate: int | None, burst: int | None) -> tuple[int, int] | None:
    if not rate:
        return None
    return rate, (burst or rate)


class TokenBucket:
    """`rate` tokens per second, at most `capacity` stored; starts full."""

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or capacity < rate:
            raise ValueError(f"bad bucket: rate={rate} capacity={capacity}")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._clock = clock
        self._tokens = float(capacity)
        self._last = clock()

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._refill(self._clock())
        return self._tokens

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)

    def reserve(self, amount: float) -> float:
        """Take `amount` tokens; return how many seconds the caller must wait first."""
        self._refill(self._clock())
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Throttle:
    """The buckets of one disk: IOPS and bytes/s, either optional. Thread-safe.

    Waits sleep on an event that close() sets; `sleep` replaces that for a test clock
    (and is then not interruptible).
    """

    def __init__(
        self,
        config: DiskThrottle,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        iops = config.effective_iops
        bw = config.effective_bytes
        self.iops = TokenBucket(iops[0], iops[1], clock) if iops else None
        self.bytes = TokenBucket(bw[0], bw[1], clock) if bw else None
        self._closed = threading.Event()
        self._sleep = sleep if sleep is not None else self._closed.wait
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.iops is not None or self.bytes is not None

    def reserve(self, nbytes: int) -> float:
        """Charge one operation of `nbytes`; return the delay its buckets ask for (uncapped)."""
        with self._lock:
            delay = 0.0
            if self.iops is not None:
                delay = max(delay, self.iops.reserve(1))
            if self.bytes is not None and nbytes:
                delay = max(delay, self.bytes.reserve(nbytes))
            return delay

    def pause(self, delay: float) -> float:
        """Sleep out a delay from reserve(), at most MAX_THROTTLE_WAIT; return the time given.

        Returns 0 without sleeping once closed; close() also cuts a running pause short.
        """
        delay = min(delay, MAX_THROTTLE_WAIT)
        if delay <= 0 or self._closed.is_set():
            return 0.0
        self._sleep(delay)
        return delay

    def wait(self, nbytes: int) -> float:
        """Charge and sleep out the (capped) delay; return the time given."""
        return self.pause(self.reserve(nbytes))

    def close(self) -> None:
        """Wake every waiter now and make later waits return at once (device shutdown)."""
        self._closed.set()
