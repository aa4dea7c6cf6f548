"""Listening sockets, shared with a successor during an upgrade.

Every listener is bound with SO_REUSEPORT, so that ``edge serve --takeover``
(the new version) binds the same ports while the old process still accepts;
the old one then stops accepting and drains (SIGTERM). Without --takeover a
port another process holds is refused, as before: two edges started by
mistake do not silently share a port.
"""

from __future__ import annotations

import logging
import socket

from edge.config import Address
from edge.errors import StartupError

log = logging.getLogger(__name__)


def bind(address: Address, probe: bool = True, listen: bool = True) -> socket.socket:
    """A listening socket on ``address``, always with SO_REUSEPORT so that a
    successor (``edge serve --takeover``) can bind the same port before this
    process stops accepting: an upgrade refuses no connection. ``probe``:
    refuse a port another process holds (a second edge started by mistake).
    ``listen=False``: bound only, to hold the port and learn it (a supervisor's)."""
    if probe:
        check_free(address)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise _listen_error(address, exc) from None
    if listen:
        sock.listen(4096)
    sock.setblocking(False)
    return sock


def _listen_error(address: Address, exc: OSError) -> StartupError:
    hint = " (ports under 1024 need root or CAP_NET_BIND_SERVICE)" if address.port < 1024 else ""
    return StartupError(f"cannot listen on {address}: {exc.strerror}{hint}")


def check_free(address: Address) -> None:
    """StartupError when another process holds ``address`` (a bind without
    SO_REUSEPORT fails whenever any socket is bound to the port)."""
    if address.port == 0:
        return
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address.host, address.port))
        except OSError as exc:
            raise _listen_error(address, exc) from None


def warn_if_queues_are_dropped() -> None:
    """At a takeover: connections the old process has not accepted when it
    closes its listeners are reset unless the kernel moves them to ours
    (Linux >= 5.14). With TCP_DEFER_ACCEPT (edge.tls.acceptor) that is every
    client whose ClientHello is still in flight, about a round trip's worth of
    new connections: measured with clients 200 ms away, 9-17 resets per
    takeover without the sysctl, none with it (benchmarks/upgrade.py)."""
    try:
        migrate = open("/proc/sys/net/ipv4/tcp_migrate_req").read().strip()  # noqa: SIM115
    except OSError:
        migrate = "unknown"
    if migrate != "1":
        log.warning("net.ipv4.tcp_migrate_req is %s: connections the old process has not accepted yet when it "
                    "stops (queued, or waiting for their ClientHello) are reset; set it to 1 (sysctl) for "
                    "upgrades that reset none", migrate)


def listen_probe(takeover: bool, worker: bool) -> bool:
    """Whether ``bind`` must refuse a port another process holds: not for a
    worker (its supervisor checked) nor for a takeover (which warns, see above)."""
    if takeover and not worker:
        warn_if_queues_are_dropped()
    return not (takeover or worker)
