"""The ratio of two benchmark arms (e.g. work units with a feature on and off), with how
well the runs resolve it: a bootstrap 95 % interval and the Mann-Whitney p-value."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_ratio(on: Sequence[float], off: Sequence[float]) -> dict[str, float | None]:
    """Mean of ``on`` over mean of ``off``; ``low``/``high`` bound it (percentile bootstrap,
    seeded) and ``p`` is the two-sided Mann-Whitney p-value, where each arm has 2 runs."""
    if not on or not off or not statistics.mean(off):
        return {"ratio": None, "low": None, "high": None, "p": None}
    ratio = statistics.mean(on) / statistics.mean(off)
    if len(on) < 2 or len(off) < 2:
        return {"ratio": round(ratio, 4), "low": None, "high": None, "p": None}
    from scipy import stats

    boot = stats.bootstrap((list(on), list(off)), lambda a, b: a.mean() / b.mean(),
                           vectorized=False, paired=False, n_resamples=4000,
                           method="percentile", random_state=1)
    p = stats.mannwhitneyu(on, off, alternative="two-sided").pvalue
    return {"ratio": round(ratio, 4), "low": round(float(boot.confidence_interval.low), 4),
            "high": round(float(boot.confidence_interval.high), 4), "p": round(float(p), 4)}
