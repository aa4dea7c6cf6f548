"""Prometheus metrics (SPEC §8), read from the counters the data path keeps.

The hot path bumps plain integers (``HandshakeStats``, ``ProxyStats``,
``ContextCache``); this collector turns them into metric families when
``/metrics`` is scraped. No label takes per-domain values: certificates are
counted by source, expiry as counts per bucket and the nearest expiry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from edge.proxy.exchange import DURATION_BUCKETS
from edge.tls.acceptor import HANDSHAKE_BUCKETS

if TYPE_CHECKING:
    from edge.server import Edge

EXPIRY_BUCKETS_DAYS = (0, 7, 14, 30)  # certificates expiring within N days ("0": already expired)
_EXPIRY_CACHE_SECONDS = 60.0  # the expiry summary walks every certificate: not on every scrape


def _histogram(name: str, doc: str, bounds: tuple[float, ...], counts: list[int], total: float,
               labels: dict[str, str] | None = None) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels or {}))
    cumulative, buckets = 0, []
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    family.add_metric(list((labels or {}).values()), buckets, total)
    return family


class EdgeCollector(Collector):
    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self._expiry: tuple[float, dict] = (0.0, {})

    def _expiry_summary(self) -> dict:
        taken, summary = self._expiry
        now = time.time()
        if now - taken < _EXPIRY_CACHE_SECONDS:
            return summary
        counts: dict[str, int] = {}
        nearest: dict[str, float] = {}
        within = {(s, d): 0 for s in ("custom", "acme") for d in EXPIRY_BUCKETS_DAYS}
        for held in list(self.edge.index.certs.values()):
            for meta in held:
                source = meta.source
                counts[source] = counts.get(source, 0) + 1
                days = (meta.not_after - now) / 86400
                nearest[source] = min(nearest.get(source, days), days)
                for limit in EXPIRY_BUCKETS_DAYS:
                    if days <= limit:
                        within[(source, limit)] = within.get((source, limit), 0) + 1
        summary = {"counts": counts, "nearest": nearest, "within": within}
        self._expiry = (now, summary)
        return summary

    def collect(self) -> Iterator[object]:
        edge = self.edge
        hs = edge.acceptor.stats
        family = CounterMetricFamily("edge_handshakes", "TLS handshakes by result, version and certificate source",
                                     labels=["result", "version", "source"])
        for (version, source), count in sorted(hs.completed.items()):
            family.add_metric(["ok", version, source], count)
        for reason, count in sorted(hs.failed.items()):
            family.add_metric([f"failed_{reason}", "", ""], count)
        family.add_metric(["refused_sni", "", ""], hs.refused_sni)
        family.add_metric(["not_tls", "", ""], hs.not_tls)
        yield family
        yield _histogram("edge_handshake_duration_seconds", "From accept to the end of the TLS handshake",
                         HANDSHAKE_BUCKETS, hs.duration_buckets, hs.duration_sum)
        yield CounterMetricFamily("edge_unknown_sni", "Handshakes naming a host no certificate covers",
                                  value=hs.unknown_sni)

        summary = self._expiry_summary()
        held = GaugeMetricFamily("edge_certificates", "Certificates held, by source", labels=["source"])
        for source, count in sorted(summary["counts"].items()):
            held.add_metric([source], count)
        held.add_metric(["platform"], 1)
        yield held
        nearest = GaugeMetricFamily("edge_certificate_nearest_expiry_days",
                                    "Days to the nearest expiry, by source (negative: expired)", labels=["source"])
        for source, days in sorted(summary["nearest"].items()):
            nearest.add_metric([source], days)
        yield nearest
        within = GaugeMetricFamily("edge_certificates_expiring", "Certificates expiring within N days",
                                   labels=["source", "within_days"])
        for (source, limit), count in sorted(summary["within"].items()):
            within.add_metric([source, str(limit)], count)
        yield within

        stats = edge.proxy.stats
        requests = CounterMetricFamily("edge_requests", "HTTP requests answered, by status class", labels=["code"])
        for klass, count in enumerate(stats.status_classes):
            if klass:
                requests.add_metric([f"{klass}xx"], count)
        yield requests
        yield _histogram("edge_request_duration_seconds", "From the first byte of a request to its last answer byte",
                         DURATION_BUCKETS, stats.duration_buckets, stats.duration_sum)
        upstream = CounterMetricFamily("edge_upstream_errors", "Backend failures, by kind", labels=["kind"])
        for kind in ("refused", "timeout", "reset", "protocol", "closed"):
            upstream.add_metric([kind], stats.upstream_errors.get(kind, 0))
        yield upstream
        yield GaugeMetricFamily("edge_open_connections", "Client connections open", value=len(edge.proxy.connections))

        cache = edge.cache
        yield GaugeMetricFamily("edge_tls_context_cache_size", "TLS contexts built and cached", value=len(cache))
        yield CounterMetricFamily("edge_tls_context_cache_hits", "Handshakes whose context was cached",
                                  value=cache.hits)
        yield CounterMetricFamily("edge_tls_context_cache_misses", "Contexts built on demand", value=cache.misses)
        yield CounterMetricFamily("edge_reloads", "Full reloads of the store (start, SIGHUP, /v1/reload)",
                                  value=edge.reloads)
        yield GaugeMetricFamily("edge_store_sync_lag_seconds",
                                "Seconds from a store change being seen to it being applied (last change)",
                                value=edge.sync_lag)
        yield GaugeMetricFamily("edge_store_entries_skipped", "Store entries that do not parse (see edge check)",
                                value=len(edge.index.errors))


def registry_for(edge: Edge) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(edge))
    return registry
