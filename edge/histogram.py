"""A Prometheus-style histogram the hot path can bump without a lock.

The TLS accept path (handshake times) and the data path (request times) keep
one each; the metrics module reads ``counts`` and ``total`` at scrape time.
"""

from __future__ import annotations

import bisect


class Histogram:
    """Counts per upper bound (the last slot is +Inf) and the sum observed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
