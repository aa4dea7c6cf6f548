"""Metric families of issue #14: per-app series and the accept-time controls.

Read from summed counter snapshots (``metrics.counters`` + other workers'),
as every edge family is. Kept apart from ``metrics`` so that each stays short.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from edge.proxy.appstats import UPSTREAM_KINDS
from edge.proxy.exchange import DURATION_BUCKETS

if TYPE_CHECKING:
    from edge.proxy.exchange import ProxyContext
    from edge.tls.gate import Gate


def control_counters(gate: Gate, proxy: ProxyContext, live_apps: Collection[str]) -> dict[str, Any]:
    """This process's counters for the families below (``Edge.counters`` adds them)."""
    out: dict[str, Any] = {"connections_refused": dict(gate.refused), "proxy_local": gate.local,
                           "accept_full_pauses": gate.limits.full_pauses if gate.limits is not None else 0,
                           "rate_limited": proxy.rate.limited if proxy.rate is not None else 0}
    app_stats = proxy.app_stats
    if app_stats.enabled:
        app_stats.forget_except(live_apps)
        out.update(app_stats.snapshot())
    return out


def control_families(c: dict[str, Any]) -> Iterator[Any]:
    refused = CounterMetricFamily(
        "edge_connections_refused", "Connections closed before TLS or HTTP: PROXY header untrusted, missing, "
        "malformed, late (timeout) or cut (closed); connections_per_ip", labels=["reason"])
    for reason in ("untrusted", "missing", "malformed", "timeout", "closed", "connections_per_ip"):
        refused.add_metric([reason], c.get("connections_refused", {}).get(reason, 0))
    yield refused
    yield CounterMetricFamily("edge_proxy_protocol_local", "PROXY v2 LOCAL connections (the proxy's own checks)",
                              value=c.get("proxy_local", 0))
    yield CounterMetricFamily("edge_accept_paused_max_connections", "Times accepting paused at [limits] "
                              "max_connections", value=c.get("accept_full_pauses", 0))
    yield CounterMetricFamily("edge_requests_rate_limited", "Requests answered 429 ([limits] "
                              "requests_per_ip_per_second)", value=c.get("rate_limited", 0))
    if "app_requests" in c:
        yield from _per_app(c)


def _per_app(c: dict[str, Any]) -> Iterator[Any]:
    requests = CounterMetricFamily("edge_app_requests", "HTTP requests answered, by app and status class",
                                   labels=["app", "code"])
    for key, count in sorted(c["app_requests"].items()):
        app, code = key.rsplit("|", 1)
        requests.add_metric([app, code], count)
    yield requests
    duration = HistogramMetricFamily("edge_app_request_duration_seconds",
                                     "From the first byte of a request to its last answer byte, by app", labels=["app"])
    raw = c["app_duration"]
    for app in sorted({key.rsplit("|", 1)[0] for key in raw}):
        cumulative, buckets = 0, []
        for i, bound in enumerate((*DURATION_BUCKETS, float("inf"))):
            cumulative += int(raw.get(f"{app}|{i}", 0))
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        duration.add_metric([app], buckets, raw.get(f"{app}|sum", 0.0))
    yield duration
    errors = CounterMetricFamily("edge_app_upstream_errors", "Backend failures, by app and kind",
                                 labels=["app", "reason"])
    for key, count in sorted(c["app_upstream_errors"].items()):
        app, reason = key.rsplit("|", 1)
        if reason in UPSTREAM_KINDS:
            errors.add_metric([app, reason], count)
    yield errors
    yield GaugeMetricFamily("edge_apps_reporting", "Apps with per-app series (bounds the series count)",
                            value=len({key.rsplit("|", 1)[0] for key in c["app_requests"]}))
