"""Small statistics for the bench: a stopwatch, medians, percentiles and ratios.

Every figure the bench prints is a median over repeats (or a percentile, for the burst), and
every sample is kept in the JSON too, so a later run can be compared sample by sample and a
noisy median is visible as such. ``time.perf_counter`` is used throughout: it is monotonic and
has sub-microsecond resolution on Linux.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Stopwatch:
    """Seconds between entering and leaving a ``with stopwatch() as sw`` block."""

    started: float = 0.0
    seconds: float = 0.0


@contextmanager
def stopwatch():
    sw = Stopwatch(started=time.perf_counter())
    try:
        yield sw
    finally:
        sw.seconds = time.perf_counter() - sw.started


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else math.nan


def percentile(samples: list[float], p: float) -> float:
    """Linear-interpolated percentile (``p`` in 0-100), as numpy's default computes it.

    With three samples p99 is close to the maximum: the figure says "the worst we saw", which
    is all a handful of repeats can honestly say about a tail.
    """
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN rather than an exception when the denominator is 0."""
    if not denominator or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator


def ms(seconds: float) -> float:
    """Seconds to milliseconds, rounded for JSON (a microsecond is below the noise)."""
    return round(seconds * 1000, 3)


def ms_list(samples: list[float]) -> list[float]:
    return [ms(s) for s in samples]
