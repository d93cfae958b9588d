"""benchmarks/ratio.py: a ratio of two arms with how well the runs resolve it."""

from __future__ import annotations

import random

from benchmarks.ratio import mean_ratio


def test_a_real_difference_is_resolved_and_noise_is_not() -> None:
    rng = random.Random(7)
    off = [rng.gauss(1000, 30) for _ in range(8)]
    slow = [rng.gauss(800, 30) for _ in range(8)]
    same = [rng.gauss(1000, 30) for _ in range(8)]
    drop = mean_ratio(slow, off)
    assert drop["high"] is not None and drop["high"] < 0.9 and (drop["p"] or 1) < 0.01
    noise = mean_ratio(same, off)
    assert noise["low"] is not None and noise["high"] is not None
    assert noise["low"] < 1.0 < noise["high"] and (noise["p"] or 0) > 0.05


def test_too_few_runs_give_the_ratio_without_an_interval() -> None:
    assert mean_ratio([90.0], [100.0]) == {"ratio": 0.9, "low": None, "high": None, "p": None}
    assert mean_ratio([], [100.0])["ratio"] is None
    assert mean_ratio([1.0, 2.0], [0.0, 0.0])["ratio"] is None
