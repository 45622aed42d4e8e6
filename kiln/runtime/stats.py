"""Summary statistics of latencies: mean and the percentiles every benchmark reports.

Its own module, free of torch and of the engine: ``kiln bench`` (kiln.runtime.bench) and the
HTTP client of ``kiln bench_serve`` (kiln.serve.bench) report with one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            return cls(math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(values)
        return cls(sum(ordered) / len(ordered), *(_percentile(ordered, q) for q in (50, 90, 99)))


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
