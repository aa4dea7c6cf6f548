"""Per-request state, and what the data path shares across connections."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edge.config import Config, ProxyConfig
from edge.histogram import Histogram
from edge.limits import RateLimiter
from edge.proxy.appstats import DURATION_BUCKETS as DURATION_BUCKETS  # re-exported: metrics reads it here
from edge.proxy.appstats import AppStats
from edge.proxy.routing import Router
from edge.proxy.upstream import BackendConnection
from edge.records import App

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

    def request_done(self, status: int, seconds: float, version: str = "1.1") -> None:
        self.status_classes[status // 100 if 0 < status < 600 else 0] += 1
        self.protocols[version] = self.protocols.get(version, 0) + 1
        self.duration.observe(seconds)

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
    connections: set = field(default_factory=set)  # open HttpProxyProtocol objects
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


class Exchange:
    """One request and its response."""

    __slots__ = (
        "app",
        "backend",
        "body",
        "body_apart",
        "body_expected",
        "buffered",
        "chunked",
        "conn",
        "content_length",
        "content_length_out",
        "framing",
        "has_connection",
        "head_bytes",
        "headers",
        "host",
        "host_header",
        "host_headers",
        "keep_alive",
        "method",
        "request_done",
        "request_id",
        "responded",
        "response_bytes",
        "response_done",
        "retry_head",
        "started",
        "status",
        "t0",
        "target",
        "upgrade",
        "upgrade_to",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.content_length: int | None = None
        self.content_length_out: int | None = None  # the response's, as sent to the client
        self.body_expected = False
        # An Upgrade request: llhttp parses nothing after its head, so the
        # connection ends with this exchange, whether or not it switches.
        self.upgrade = False
        self.upgrade_to: bytes | None = None  # the Upgrade value forwarded; None: not an upgrade for edge
        self.body_apart = False  # a refused upgrade whose body is read by a parser of its own
        # Body pieces read before a backend connection is ready; None once streaming.
        self.body: list[bytes] | None = []
        self.buffered = 0
        self.request_done = False
        self.started = False
        self.conn: BackendConnection | None = None
        self.responded = False  # the response head went to the client
        self.response_done = False
        self.retry_head = b""  # the head to send again on a retry; empty: not retryable
        self.head_bytes = 0
        self.t0 = time.monotonic()
        self.status = 0
        self.response_bytes = 0
        self.host = ""
        self.app: App | None = None  # the app routed to, once known (per-app controls and series)
        self.backend = ""
        self.request_id = b""
        # Noted while the head is parsed, so the head is walked once.
        self.framing = False  # a Content-Length or Transfer-Encoding field came
        self.has_connection = False
        self.host_header: bytes | None = None
        self.host_headers = 0


def _request_header(exchange: Exchange, name: bytes) -> str:
    for n, value in exchange.headers:
        if n == name:
            return value.decode("latin-1")
    return ""


# Answers after which the request stream cannot be trusted: malformed (400), too
# slow (408), too long (414, 431). The connection closes with them.
CLOSING_STATUSES = frozenset({400, 408, 414, 431})


def keeps_alive(exchange: Exchange, draining: bool, status: int = 0) -> bool:
    """Whether the connection stays open after this exchange's answer: the one
    rule for every answer on an HTTP/1.x connection (forwarded, error, redirect,
    challenge). Not when the client or a shutdown says so, not after a request
    that asked to upgrade (its parser is spent), not after a status that ends
    trust in the stream, not while the request body is still unread (reading a
    body nobody wants costs more than a new connection)."""
    return (
        exchange.keep_alive
        and not draining
        and not exchange.upgrade
        and status not in CLOSING_STATUSES
        and (exchange.request_done or not exchange.body_expected)
    )


def log_access(exchange: Exchange, client_ip: bytes, tls_version: str, cert_source: str, fmt: str) -> None:
    """One line per request (SPEC §5); never bodies or keys, and of the
    headers only User-Agent and Referer (what log tools expect)."""
    if fmt == "combined":
        access_log.info(_combined(exchange, client_ip))
        return
    access_log.info(
        json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "client": client_ip.decode(),
                "host": exchange.host,
                "method": exchange.method.decode("latin-1"),
                "path": exchange.target.decode("latin-1"),
                "protocol": f"HTTP/{exchange.version}",
                "status": exchange.status,
                "bytes": exchange.response_bytes,
                "duration_ms": round((time.monotonic() - exchange.t0) * 1000, 3),
                "backend": exchange.backend,
                "tls": tls_version,
                "cert": cert_source,
                "request_id": exchange.request_id.decode("latin-1"),
                "user_agent": _request_header(exchange, b"user-agent"),
                "referer": _request_header(exchange, b"referer"),
            },
            separators=(",", ":"),
        )
    )


def _quoted(text: str) -> str:
    # As nginx does: a quote, backslash or control byte inside a quoted field
    # is written \xHH, so a client cannot forge the fields that follow.
    return "".join(f"\\x{ord(c):02X}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)


def _combined(exchange: Exchange, client_ip: bytes) -> str:
    """The combined log format: %h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"."""
    request = f"{exchange.method.decode('latin-1')} {exchange.target.decode('latin-1')} HTTP/{exchange.version}"
    when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
    referer = _quoted(_request_header(exchange, b"referer")) or "-"
    agent = _quoted(_request_header(exchange, b"user-agent")) or "-"
    return (f'{client_ip.decode()} - - [{when}] "{_quoted(request)}" {exchange.status} {exchange.response_bytes} '
            f'"{referer}" "{agent}"')
