"""Prometheus metrics (SPEC §8), read from the counters the data path keeps.

The hot path bumps plain integers (``HandshakeStats``, ``ProxyStats``,
``ContextCache``, each with a ``counters()`` snapshot); this collector turns
them into metric families when ``/metrics`` is scraped. It reads a process
through ``Observed`` (which ``edge.server.Edge`` is), not the server itself.
No label takes per-domain values: certificates are counted by source, expiry
as counts per bucket and the nearest expiry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from edge.appmetrics import control_families
from edge.proxy.exchange import DURATION_BUCKETS
from edge.records import SOURCES
from edge.tls.stats import HANDSHAKE_BUCKETS

if TYPE_CHECKING:
    from edge.acme.manager import AcmeManager
    from edge.store.shared import SharedIndex

log = logging.getLogger(__name__)

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


Counters = dict[str, Any]  # name -> int, float, list of bucket counts, or {key (str or tuple): int}


class Observed(Protocol):
    """What /metrics reads of one edge process."""

    @property
    def index(self) -> SharedIndex: ...
    @property
    def store_loaded(self) -> bool:
        """The store follower's: the index holds the whole store (else names are read on demand)."""
        ...
    @property
    def acme(self) -> AcmeManager | None: ...
    @property
    def sync_lag(self) -> float: ...
    @property
    def stale_since(self) -> float | None:
        """Since when what is served may be behind the store (None: in step with it)."""
        ...
    def counters(self) -> Counters:
        """This process's traffic counters (the components' snapshots)."""
        ...


class EdgeCollector(Collector):
    def __init__(self, edge: Observed, metrics_dir: Path | None = None) -> None:
        self.edge = edge
        self.metrics_dir = metrics_dir  # where the other workers publish theirs (None: no workers)
        self._expiry: tuple[float, int, dict] = (0.0, -1, {})

    def _expiry_summary(self) -> dict:
        """Recomputed when the index changed, and at least every minute (days drift)."""
        taken, changes, summary = self._expiry
        now = time.time()
        index = self.edge.index
        # The walk costs ~1 us a certificate: at scale, not more than every few seconds.
        settle = 0.0 if len(index.certs) < 50_000 else 5.0
        if now - taken < _EXPIRY_CACHE_SECONDS and (changes == index.changes or now - taken < settle):
            return summary
        counts: dict[str, int] = {}
        nearest: dict[str, float] = {}
        within = {(s, d): 0 for s in SOURCES for d in EXPIRY_BUCKETS_DAYS}
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
        self._expiry = (now, self.edge.index.changes, summary)
        return summary

    def _store_gauges(self) -> Iterator[Metric]:
        """How this process stands with the store: sync lag, loading, a stale copy, damaged entries."""
        edge = self.edge
        yield GaugeMetricFamily("edge_store_sync_lag_seconds",
                                "Seconds from a store change being seen to it being applied (last change)",
                                value=edge.sync_lag)
        yield GaugeMetricFamily("edge_store_loading",
                                "1 while the store loads in the background after start (names fetched on demand)",
                                value=int(not edge.store_loaded))
        since = edge.stale_since
        yield GaugeMetricFamily("edge_store_stale_seconds",
                                "Seconds since what is served was last known in step with the store "
                                "(unreachable, or catching up from the local copy); 0 when following it",
                                value=0.0 if since is None else max(0.0, time.time() - since))
        yield GaugeMetricFamily("edge_store_entries_skipped", "Store entries that do not parse (see edge check)",
                                value=len(edge.index.errors))

    def collect(self) -> Iterator[Metric]:
        edge = self.edge
        # Traffic counters: this process's, plus the other workers' last snapshots.
        c = merge([edge.counters(), *peer_counters(self.metrics_dir, os.getpid())])
        family = CounterMetricFamily("edge_handshakes", "TLS handshakes by result, version and certificate source",
                                     labels=["result", "version", "source"])
        for (version, source), count in sorted(c["handshakes_ok"].items()):
            family.add_metric(["ok", version, source], count)
        for reason, count in sorted(c["handshakes_failed"].items()):
            family.add_metric([f"failed_{reason}", "", ""], count)
        family.add_metric(["refused_sni", "", ""], c["refused_sni"])
        family.add_metric(["not_tls", "", ""], c["not_tls"])
        yield family
        yield _histogram("edge_handshake_duration_seconds", "From accept to the end of the TLS handshake",
                         HANDSHAKE_BUCKETS, c["handshake_buckets"], c["handshake_sum"])
        yield CounterMetricFamily("edge_unknown_sni", "Handshakes naming a host no certificate covers",
                                  value=c["unknown_sni"])

        # What every worker holds alike (the same store): this process's view.
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

        requests = CounterMetricFamily("edge_requests", "HTTP requests answered, by status class", labels=["code"])
        for klass, count in enumerate(c["status_classes"]):
            if klass:
                requests.add_metric([f"{klass}xx"], count)
        yield requests
        by_protocol = CounterMetricFamily("edge_requests_by_protocol", "HTTP requests answered, by HTTP version",
                                          labels=["protocol"])
        for version in ("1.0", "1.1", "2"):
            by_protocol.add_metric([f"HTTP/{version}"], c.get("protocols", {}).get(version, 0))
        yield by_protocol
        yield _histogram("edge_request_duration_seconds", "From the first byte of a request to its last answer byte",
                         DURATION_BUCKETS, c["request_buckets"], c["request_sum"])
        upstream = CounterMetricFamily("edge_upstream_errors", "Backend failures, by kind", labels=["kind"])
        for kind in ("refused", "timeout", "reset", "protocol", "closed"):
            upstream.add_metric([kind], c["upstream_errors"].get(kind, 0))
        yield upstream
        yield GaugeMetricFamily("edge_open_connections", "Client connections open", value=c["open_connections"])
        yield GaugeMetricFamily("edge_tls_context_cache_size", "TLS contexts built and cached (all workers)",
                                value=c["cache_size"])
        yield CounterMetricFamily("edge_tls_context_cache_hits", "Handshakes whose context was cached",
                                  value=c["cache_hits"])
        yield CounterMetricFamily("edge_tls_context_cache_misses", "Contexts built on demand", value=c["cache_misses"])
        yield CounterMetricFamily("edge_reloads", "Full reloads of the store (start, SIGHUP, /v1/reload)",
                                  value=c["reloads"])
        yield from self._store_gauges()
        orders = CounterMetricFamily("edge_acme_orders", "ACME orders by result (this node's manager)",
                                     labels=["result"])
        if edge.acme is not None:
            for result, count in sorted(edge.acme.stats.orders.items()):
                orders.add_metric([result], count)
        yield orders
        if edge.acme is not None:
            yield from _acme_renewals(edge.acme.renewal_gauges())
        yield GaugeMetricFamily("edge_workers_reporting", "Processes whose counters are summed here",
                                value=c["processes"])
        yield from control_families(c)  # issue #14: accept-time controls, per-app series


def _acme_renewals(gauges: dict[str, float]) -> Iterator[GaugeMetricFamily]:
    """Planned ACME renewals as aggregates (SPEC §8: no label per domain)."""
    if "next" in gauges:
        yield GaugeMetricFamily("edge_acme_next_renewal_seconds",
                                "Seconds until the soonest planned ACME renewal or retry (negative: late)",
                                value=gauges["next"])
    yield GaugeMetricFamily("edge_acme_renewals_overdue",
                            "ACME certificates whose planned renewal passed over an hour ago, not renewed",
                            value=gauges["overdue"])
    planned = GaugeMetricFamily("edge_acme_planned_renewals",
                                "Domains by the reason of their next planned ACME renewal "
                                "(ari: the CA's window, RFC 9773; lifetime: 2/3 of it; retry: after a failure)",
                                labels=["reason"])
    for key, value in sorted(gauges.items()):
        if key.startswith("reason_"):
            planned.add_metric([key[len("reason_"):]], value)
    yield planned
    by_ca = GaugeMetricFamily("edge_acme_domains_by_ca",
                              "Domains by where their ACME certificates come from (fallback: one of them "
                              "from a CA of [acme] fallback_directories; the next renewal asks the primary)",
                              labels=["ca"])
    for ca in ("primary", "fallback"):
        by_ca.add_metric([ca], gauges.get(f"ca_{ca}", 0))
    yield by_ca


# --- counters across workers -----------------------------------------------------------
# With workers > 1 each worker writes its counters to the supervisor's metrics
# directory every second; the worker serving /metrics sums them with its own live ones.
_STALE_SECONDS = 10.0


def merge(snapshots: list[Counters]) -> Counters:
    total = snapshots[0]
    for other in snapshots[1:]:
        for key, value in other.items():
            mine = total.get(key)
            if isinstance(value, dict):
                merged = dict(mine or {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
                total[key] = merged
            elif isinstance(value, list):
                total[key] = [a + b for a, b in zip(mine, value, strict=True)] if mine else list(value)
            else:
                total[key] = (mine or 0) + value
    return total


def encode(snapshot: Counters) -> bytes:
    """JSON for a snapshot: JSON objects key on strings only, so the labelled
    counters (keys a string or a tuple of them) travel as [key, count] pairs."""
    plain = {k: v for k, v in snapshot.items() if not isinstance(v, dict)}
    labelled = {k: [[list(key) if isinstance(key, tuple) else key, n] for key, n in v.items()]
                for k, v in snapshot.items() if isinstance(v, dict)}
    return json.dumps({"plain": plain, "labelled": labelled}).encode()


def decode(data: bytes) -> Counters:
    raw = json.loads(data)
    labelled = {k: {tuple(key) if isinstance(key, list) else key: n for key, n in pairs}
                for k, pairs in raw["labelled"].items()}
    return {**raw["plain"], **labelled}


def peer_counters(directory: Path | None, own_pid: int) -> list[Counters]:
    if directory is None:
        return []
    out = []
    now = time.time()
    for path in directory.glob("worker-*.json"):
        if path.name == f"worker-{own_pid}.json":
            continue
        try:
            if now - path.stat().st_mtime > _STALE_SECONDS:
                continue  # a worker that died: the supervisor has replaced it
            out.append(decode(path.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


async def publish_counters(counters: Callable[[], Counters], directory: Path, interval: float = 1.0) -> None:
    """Worker side: write this process's counters for the /metrics worker to sum."""
    path = directory / f"worker-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    while True:
        try:
            tmp.write_bytes(encode(counters()))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot publish metrics to %s: %s", directory, exc.strerror)
        await asyncio.sleep(interval)


def registry_for(edge: Observed, metrics_dir: Path | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(edge, metrics_dir))
    return registry
