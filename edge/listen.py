"""Listening sockets: bound, or taken over from the edge running before.

``edge serve --takeover`` (the new version) receives the running edge's
listening sockets themselves (edge.takeover) and accepts from the same
queues while the old process still does; the old one then stops accepting
and drains (SIGTERM), and no connection is refused or reset. When no edge
offers them, the ports are bound beside the running one: every listener has
SO_REUSEPORT (also what spreads connections over workers, one socket each).
Without --takeover a port another process holds is refused: two edges
started by mistake do not silently share a port.
"""

from __future__ import annotations

import logging
import socket

from edge import takeover
from edge.config import Address, Config
from edge.errors import StartupError
from edge.takeover import Listener

log = logging.getLogger(__name__)


def bind(address: Address) -> socket.socket:
    """A listening socket on ``address``, with SO_REUSEPORT: the workers' one
    each, and a successor that no edge handed the sockets to binds beside."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise _listen_error(address, exc) from None
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
    """At a takeover where the running edge did not hand its sockets over (an
    older version, or its offer unreachable): connections the old process has
    not accepted when it closes its listeners are reset unless the kernel
    moves them to ours (Linux >= 5.14). With TCP_DEFER_ACCEPT (edge.tls.acceptor) that is every
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


def open_listeners(config: Config, per_address: int) -> list[Listener]:
    """``per_address`` listening sockets for each https and http address (one
    per worker; the kernel spreads connections over them): those the running
    edge hands over at a takeover, bound for the rest."""
    server = config.server
    offered = takeover.receive(takeover.offer_path(config)) if server.takeover else []
    out: list[Listener] = []
    try:
        for kind, addresses in (("https", server.https), ("http", server.http)):
            for address in addresses:
                mine = [item for item in offered if item.kind == kind and item.address == address and address.port]
                offered = [item for item in offered if item not in mine]
                out += mine + _bind_more(kind, address, len(mine), per_address, server.takeover)
    except BaseException:
        for item in out + offered:
            item.sock.close()
        raise
    for item in offered:  # an address the new configuration no longer has
        log.info("%s listener %s:%d is not in the configuration: the old process keeps it until it stops",
                 item.kind, item.address.host, item.address.port)
        item.sock.close()
    return out


def _bind_more(kind: str, address: Address, have: int, want: int, takeover: bool) -> list[Listener]:
    if have == 0:
        if not takeover:
            check_free(address)  # refused when held: not a silent second edge
        elif not _free(address):  # beside a running edge that did not hand its sockets over
            warn_if_queues_are_dropped()
    out: list[Listener] = []
    try:
        for _ in range(have, want):
            sock = bind(address)
            address = Address(address.host, sock.getsockname()[1])  # port 0: the others join the first's
            out.append(Listener(kind, address, sock))
    except BaseException:
        for item in out:
            item.sock.close()
        raise
    return out


def _free(address: Address) -> bool:
    try:
        check_free(address)
    except StartupError:
        return False
    return True


def for_worker(listeners: list[Listener], number: int, workers: int) -> list[Listener]:
    """Worker ``number``'s share: every ``workers``-th socket of each address
    (more than one when the edge taken over ran more workers)."""
    out: list[Listener] = []
    for kind, address in dict.fromkeys((item.kind, item.address) for item in listeners):
        same = [item for item in listeners if item.kind == kind and item.address == address]
        out += same[number::workers]
    return out

