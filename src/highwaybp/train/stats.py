"""Summaries over seeds shared by the experiments' reports."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of `values`: std 0.0 for one value, (nan, nan) for
    none."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
