"""What the data path shares across connections (the proxy context, its
counters, the listener), and the access log line of a request."""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge.config import Config, ProxyConfig
from edge.histogram import Histogram
from edge.limits import RateLimiter
from edge.proxy.appstats import DURATION_BUCKETS as DURATION_BUCKETS  # re-exported: metrics reads it here
from edge.proxy.appstats import AppCounters, AppStats
from edge.proxy.routing import Router

if TYPE_CHECKING:
    from edge.proxy.request import Request

access_log = logging.getLogger("edge.access")


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    scheme: bytes  # b"https" or b"http"
    port: bytes  # the listener's port, for X-Forwarded-Port
    https_port: int  # where redirects to https point


class ProxyStats:
    """Plain counters the hot path bumps; the metrics module reads them at
    scrape time, so a request costs an index increment, not a lock."""

    def __init__(self) -> None:
        self.status_classes = [0] * 6  # index = status // 100
        self.duration = Histogram(DURATION_BUCKETS)
        self.upstream_errors: dict[str, int] = {}
        self.protocols: dict[str, int] = {}  # requests by HTTP version: "1.0", "1.1", "2"

    def request_done(self, status: int, seconds: float, version: str = "1.1", app: AppCounters | None = None) -> None:
        """One finished exchange; ``app``: its app's counters too ([metrics] per_app),
        bumped here so the bucket is looked up once for both (one call per request)."""
        klass = status // 100 if 0 < status < 600 else 0
        self.status_classes[klass] += 1
        protocols = self.protocols
        protocols[version] = protocols.get(version, 0) + 1
        bucket = bisect_left(DURATION_BUCKETS, seconds)
        duration = self.duration
        duration.counts[bucket] += 1
        duration.total += seconds
        if app is not None:
            app.classes[klass] += 1
            app.buckets[bucket] += 1
            app.seconds += seconds

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    def counters(self) -> dict[str, Any]:
        """A snapshot for edge.metrics (summed across workers key by key)."""
        return {
            "status_classes": list(self.status_classes),
            "request_buckets": list(self.duration.counts),
            "request_sum": self.duration.total,
            "upstream_errors": dict(self.upstream_errors),
            "protocols": dict(self.protocols),
        }


@dataclass(eq=False)
class ProxyContext:
    """What every client connection of one edge process shares."""

    router: Router
    config: ProxyConfig
    access_log: bool = False
    access_format: str = "json"  # [log] access_format: "json" or "combined"
    # Looks up an ACME HTTP-01 key authorization by token (RFC 8555 §8.3).
    challenge: Callable[[str], Awaitable[bytes | None]] | None = None
    stats: ProxyStats = field(default_factory=ProxyStats)
    connections: set = field(default_factory=set)  # open client connections (HTTP/1.1 and HTTP/2)
    tasks: set = field(default_factory=set)  # forwarding tasks in flight (strong references)
    draining: bool = False  # shutting down: finish what is in flight, take nothing new
    # Issue #14: per-app series ([metrics] per_app) and requests per address ([limits]); None: off.
    app_stats: AppStats = field(default_factory=AppStats)
    rate: RateLimiter | None = None

    def reconfigure(self, config: Config) -> None:
        """A reload: new connections take the new timeouts and limits."""
        self.config = config.proxy
        self.access_log = config.log.access_log
        self.access_format = config.log.access_format
        self.app_stats.enabled = config.metrics_per_app


def _request_header(req: Request, name: bytes) -> str:
    for n, value in req.headers:
        if n == name:
            return value.decode("latin-1")
    return ""


def log_access(req: Request, client_ip: bytes, tls_version: str, cert_source: str, fmt: str) -> None:
    """One line per request (SPEC §5); never bodies or keys, and of the
    headers only User-Agent and Referer (what log tools expect)."""
    if fmt == "combined":
        access_log.info(_combined(req, client_ip))
        return
    access_log.info(
        json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "client": client_ip.decode(),
                "host": req.host,
                "method": req.method.decode("latin-1"),
                "path": req.target.decode("latin-1"),
                "protocol": f"HTTP/{req.version}",
                "status": req.status,
                "bytes": req.response_bytes,
                "duration_ms": round((time.monotonic() - req.t0) * 1000, 3),
                "backend": req.backend,
                "tls": tls_version,
                "cert": cert_source,
                "request_id": req.request_id.decode("latin-1"),
                "user_agent": _request_header(req, b"user-agent"),
                "referer": _request_header(req, b"referer"),
            },
            separators=(",", ":"),
        )
    )


def _quoted(text: str) -> str:
    # As nginx does: a quote, backslash or control byte inside a quoted field
    # is written \xHH, so a client cannot forge the fields that follow.
    return "".join(f"\\x{ord(c):02X}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)


def _combined(req: Request, client_ip: bytes) -> str:
    """The combined log format: %h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"."""
    request = f"{req.method.decode('latin-1')} {req.target.decode('latin-1')} HTTP/{req.version}"
    when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
    referer = _quoted(_request_header(req, b"referer")) or "-"
    agent = _quoted(_request_header(req, b"user-agent")) or "-"
    return (f'{client_ip.decode()} - - [{when}] "{_quoted(request)}" {req.status} {req.response_bytes} '
            f'"{referer}" "{agent}"')
