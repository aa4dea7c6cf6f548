"""Per-app request counters (``[metrics] per_app``, issue #14).

One small record per app that served a request, bumped on the hot path as
``ProxyStats`` is (list increments, no lock); the metrics module turns them
into ``edge_app_*`` families at scrape time. Label values are app names and
fixed sets (status class, error kind): the series count is bounded by the
number of apps, about 30 per app (6 codes, 15 histogram series, 5 error
kinds, plus sum and count), never by domains or clients. An app removed from
the store is dropped at the next scrape.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

# Request duration buckets, seconds (Prometheus histogram upper bounds), for
# edge_request_duration_seconds and its per-app twin.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UPSTREAM_KINDS = ("refused", "timeout", "reset", "protocol", "closed")


class AppCounters:
    """Bumped by ``ProxyStats.request_done`` (a finished exchange) and here (upstream errors)."""

    __slots__ = ("buckets", "classes", "errors", "seconds")

    def __init__(self) -> None:
        self.classes = [0] * 6  # index = status // 100
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.seconds = 0.0
        self.errors: dict[str, int] = {}

    def upstream_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class AppStats:
    """``AppCounters`` by app name; ``enabled`` False (``per_app = false``): nothing is kept."""

    __slots__ = ("apps", "enabled")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.apps: dict[str, AppCounters] = {}

    def of(self, app: str) -> AppCounters:
        counters = self.apps.get(app)
        if counters is None:
            counters = self.apps[app] = AppCounters()
        return counters

    def forget_except(self, live: Collection[str]) -> None:
        for name in [name for name in self.apps if name not in live]:
            del self.apps[name]

    def snapshot(self) -> dict[str, Any]:
        """Flat ``{"app|key": number}`` dicts, so that workers' snapshots add up key by key."""
        requests: dict[str, int] = {}
        duration: dict[str, float] = {}
        errors: dict[str, int] = {}
        for name, c in self.apps.items():
            for klass in range(1, 6):
                requests[f"{name}|{klass}xx"] = c.classes[klass]
            for i, count in enumerate(c.buckets):
                duration[f"{name}|{i}"] = count
            duration[f"{name}|sum"] = c.seconds
            for kind, count in c.errors.items():
                errors[f"{name}|{kind}"] = count
        return {"app_requests": requests, "app_duration": duration, "app_upstream_errors": errors}
