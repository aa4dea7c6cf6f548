"""Who the client is: ``[server] trusted_proxies`` and ``proxy_protocol``.

A connection's client address is its TCP peer, unless a PROXY header (sent by
a trusted proxy, HAProxy doc/proxy-protocol.txt §1) names another one. A
*trusted* address may speak for others: its PROXY header is believed, its
X-Forwarded-For is appended to rather than replaced, and it is exempt from
per-address limits (a load balancer carries many clients).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    networks: tuple[Network, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: str | bytes) -> bool:
        """Whether ``address`` (text, as a socket or PROXY header gives it) is trusted.

        An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, a dual-stack
        listener's view of an IPv4 peer, RFC 4291 §2.5.5.2) counts as its IPv4
        address."""
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.decode() if isinstance(address, bytes) else address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.networks)


def parse_trusted(values: Any) -> TrustedProxies:
    """A list of CIDR blocks (or single addresses); ValueError saying what is wrong."""
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f'expected a list of CIDR blocks (e.g. ["10.0.0.0/8", "fd00::/8"]), got {values!r}')
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a CIDR block ({exc})") from None
    return TrustedProxies(tuple(networks))


def trusted_key(table: Any) -> TrustedProxies:
    """``[server] trusted_proxies`` from a ``config._Table``."""
    try:
        return parse_trusted(table.get("trusted_proxies", list, []))
    except ValueError as exc:
        raise table.fail("trusted_proxies", str(exc)) from None
