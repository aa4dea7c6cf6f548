"""``[limits]``: connections per address and per process, requests per address.

Memory stays bounded whatever the number of distinct addresses:

* open connections are counted per address in a dict whose entries go when
  their count drops to zero: at most one entry per open connection;
* request rates are token buckets kept in an LRU of at most
  ``MAX_TRACKED`` addresses (~300 bytes each, 19 MiB full, measured). An address
  pushed out restarts with a full bucket: it gets ``burst`` requests early,
  never more than that at once (the cost of the bound; a client needs a
  fresh source address per ``MAX_TRACKED`` others to use it).

With every limit at 0 (the default) nothing here runs on the data path.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_TRACKED = 65536


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    connections_per_ip: int = 0  # 0: off
    requests_per_ip_per_second: float = 0.0  # 0: off
    burst: int = 0  # requests allowed at once above the rate; 0: the rate, rounded up
    max_connections: int = 0  # whole process; 0: off

    @property
    def bucket_size(self) -> int:
        return self.burst or max(1, math.ceil(self.requests_per_ip_per_second))


def parse_limits(table: Any) -> LimitsConfig:
    """Read ``[limits]`` from a ``config._Table``."""
    values: dict[str, Any] = {}
    for key in ("connections_per_ip", "burst", "max_connections"):
        value = table.get(key, int, 0)
        if value < 0:
            raise table.fail(key, "must be 0 (off) or a positive number")
        values[key] = value
    rate = table.get("requests_per_ip_per_second", float, 0.0)
    if rate < 0 or math.isinf(rate) or math.isnan(rate):
        raise table.fail("requests_per_ip_per_second", "must be 0 (off) or a positive number")
    return LimitsConfig(requests_per_ip_per_second=rate, **values)


class ConnectionLimits:
    """Open connections, per address and for the process; shared by every listener."""

    def __init__(self, per_ip: int, max_connections: int) -> None:
        self.per_ip = per_ip
        self.max = max_connections
        self.open = 0
        self.by_ip: dict[str, int] = {}
        self.refused = 0  # connections closed at accept for their address's count
        self.full_pauses = 0  # times accepting paused at max_connections
        self._waiting: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        return bool(self.per_ip or self.max)

    def full(self) -> bool:
        return 0 < self.max <= self.open

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when a connection closes below ``max_connections``."""
        self.full_pauses += 1
        self._waiting.append(callback)

    def slot(self) -> Slot:
        self.open += 1
        return Slot(self)

    def _freed(self, ip: str | None) -> None:
        self.open -= 1
        if ip is not None:
            left = self.by_ip[ip] - 1
            if left:
                self.by_ip[ip] = left
            else:
                del self.by_ip[ip]
        if self._waiting and not self.full():
            waiting, self._waiting = self._waiting, []
            for callback in waiting:
                callback()


class Slot:
    """One admitted connection. Released by ``release()`` or, whatever path
    closed the connection, when the last reference to it goes."""

    __slots__ = ("ip", "limits")

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits: ConnectionLimits | None = limits
        self.ip: str | None = None

    def assign(self, ip: str) -> bool:
        """Count this connection against ``ip``; False (nothing counted) past ``connections_per_ip``."""
        limits = self.limits
        if limits is None or not limits.per_ip or self.ip is not None:
            return True
        count = limits.by_ip.get(ip, 0)
        if count >= limits.per_ip:
            limits.refused += 1
            return False
        limits.by_ip[ip] = count + 1
        self.ip = ip
        return True

    def release(self) -> None:
        limits, self.limits = self.limits, None
        if limits is not None:
            limits._freed(self.ip)

    def __del__(self) -> None:
        self.release()


class RateLimiter:
    """Token buckets per address (``requests_per_ip_per_second``, ``burst``)."""

    __slots__ = ("buckets", "limited", "rate", "size")

    def __init__(self, rate: float, size: int) -> None:
        self.rate = rate
        self.size = float(size)
        self.buckets: OrderedDict[bytes, list[float]] = OrderedDict()
        self.limited = 0

    @classmethod
    def from_config(cls, config: LimitsConfig) -> RateLimiter | None:
        rate = config.requests_per_ip_per_second
        return cls(rate, config.bucket_size) if rate else None

    def take(self, ip: bytes, now: float) -> float:
        """0.0 when ``ip`` may make a request now, else the seconds until it may."""
        buckets = self.buckets
        bucket = buckets.get(ip)
        if bucket is None:
            if len(buckets) >= MAX_TRACKED:
                buckets.popitem(last=False)
            buckets[ip] = [self.size - 1.0, now]
            return 0.0
        buckets.move_to_end(ip)
        tokens = min(self.size, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        self.limited += 1
        return (1.0 - tokens) / self.rate
