"""Per-request controls of issue #14, shared by HTTP/1.1 and HTTP/2.

Each is a small pure function the protocols call at one place: before
routing (requests per address), on a response head (HSTS), on an answer
edge makes itself (error pages, maintenance, Retry-After), when an exchange
fails (per-app series; a finished one is counted by ``ProxyStats.request_done``
with the process's series). With every control off each costs one attribute test.
"""

from __future__ import annotations

import math
import time

from edge.limits import RateLimiter
from edge.proxy.appstats import AppStats
from edge.records import App
from edge.tls.gate import Peer

HSTS = b"strict-transport-security"

MAINTENANCE_PAGE = (
    b"<html><head><title>503 Service Unavailable</title></head><body><h1>Down for maintenance</h1>"
    b"<p>This site is being worked on and will be back shortly.</p><hr><p>edge</p></body></html>\n"
)
# RFC 9110 §10.2.3: how long a 503 for maintenance should be waited out.
MAINTENANCE_RETRY_AFTER = 30


def rate_wait(rate: RateLimiter | None, peer: Peer | None, client_ip: bytes) -> int:
    """0 when the request may go on; else the Retry-After seconds of its 429
    (RFC 6585 §4). Trusted proxies are exempt: they speak for many clients."""
    if rate is None or (peer is not None and peer.trusted):
        return 0
    wait = rate.take(client_ip, time.monotonic())
    return math.ceil(wait) if wait else 0


def with_hsts(headers: list[tuple[bytes, bytes]], app: App | None) -> list[tuple[bytes, bytes]]:
    """``headers`` with the app's Strict-Transport-Security, unless the backend
    sent its own (RFC 6797 §8.1: one field; the app's choice wins). HTTPS only:
    RFC 6797 §7.2, a host must not send it over plain HTTP."""
    if app is None or not app.hsts:
        return headers
    for name, _value in headers:
        if name.lower() == HSTS:
            return headers
    return [*headers, (HSTS, app.hsts)]


def answer_page(app: App | None, status: int) -> tuple[bytes | None, int]:
    """(body replacing edge's own page or None, Retry-After seconds or 0) for
    an answer edge makes itself for ``app``."""
    if app is None:
        return None, 0
    page = app.error_page(status) if app.error_pages else None
    if status == 503 and app.maintenance:
        return page or MAINTENANCE_PAGE, MAINTENANCE_RETRY_AFTER
    return page, 0


def answer_head_fields(app: App | None, status: int, tls: bool, retry_after: int = 0) -> list[tuple[bytes, bytes]]:
    """Fields an edge-made answer carries besides its framing: HSTS on HTTPS, Retry-After."""
    fields: list[tuple[bytes, bytes]] = []
    if tls and app is not None and app.hsts:
        fields.append((HSTS, app.hsts))
    if retry_after:
        fields.append((b"retry-after", b"%d" % retry_after))
    return fields


def count_upstream_error(app: App | None, stats: AppStats, kind: str) -> None:
    if app is not None and stats.enabled:
        stats.of(app.name).upstream_error(kind)
