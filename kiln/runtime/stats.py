"""Summary statistics of latencies: mean and the percentiles every benchmark reports.

Its own module, free of torch and of the engine: ``kiln bench`` (kiln.runtime.bench) and the
HTTP client of ``kiln bench_serve`` (kiln.serve.bench) report with one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles; all None when there were no values (a TPOT of one-token outputs:
    JSON ``null``, ``-`` in a table; NaN is not JSON)."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            return cls(None, None, None, None)
        ordered = sorted(values)
        return cls(sum(ordered) / len(ordered), *(_percentile(ordered, q) for q in (50, 90, 99)))

    def cells(self) -> str:
        """mean, p50, p90, p99 as a table's columns, 10 wide, one decimal (``-``: none)."""
        return "".join(f"{'-':>10}" if v is None else f"{v:>10.1f}"
                       for v in (self.mean, self.p50, self.p90, self.p99))


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
