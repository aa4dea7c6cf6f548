"""What the TLS accept path tells the data path and the metrics module."""

from __future__ import annotations

from typing import Any, NamedTuple

from edge.histogram import Histogram
from edge.tls.gate import Peer
from edge.tls.selector import Source

HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class TlsInfo(NamedTuple):
    """What the data path learns of the handshake. (A NamedTuple: made on
    every connection, and cheaper to make than a frozen dataclass.)"""

    server_name: str | None  # canonical SNI name, None when absent or invalid
    source: Source
    alpn: tuple[bytes, ...]
    peer: Peer | None = None  # the client, when a control needed it known (edge.tls.gate)


class HandshakeStats:
    """Counters for the metrics module to read at scrape time; no label whose
    values grow with the number of names."""

    def __init__(self) -> None:
        self.completed: dict[tuple[str, str], int] = {}  # (TLS version, certificate source) -> count
        self.failed: dict[str, int] = {}
        self.refused_sni = 0
        self.unknown_sni = 0  # a name was sent that no certificate covers: served the default
        self.not_tls = 0
        self.duration = Histogram(HANDSHAKE_BUCKETS)

    def done(self, version: str, source: Source, seconds: float) -> None:
        key = (version, source._value_)  # not .value (a Python-level property) nor the member (its __hash__ is Python)
        self.completed[key] = self.completed.get(key, 0) + 1
        self.duration.observe(seconds)

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1

    def counters(self) -> dict[str, Any]:
        """A snapshot for edge.metrics (summed across workers key by key)."""
        return {
            "handshakes_ok": dict(self.completed),
            "handshakes_failed": dict(self.failed),
            "refused_sni": self.refused_sni,
            "not_tls": self.not_tls,
            "unknown_sni": self.unknown_sni,
            "handshake_buckets": list(self.duration.counts),
            "handshake_sum": self.duration.total,
        }
