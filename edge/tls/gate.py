"""Between accept and the first protocol byte: who the client is, and whether it may come in.

For each accepted socket, before any TLS or HTTP work:

1. with ``[server] proxy_protocol``, the peer must be in ``trusted_proxies``
   and its first bytes a PROXY v1 or v2 header (``proxyproto``), read within
   the handshake timeout; the header's source address becomes the client
   (HAProxy doc/proxy-protocol.txt §1: "the receiver ... must not try to
   guess"; a missing or malformed header closes the connection, §2);
2. ``[limits] connections_per_ip``: a connection past the count of its
   client address is closed at once. Trusted proxies are exempt, unless a
   PROXY header named the client: then the client is counted.

The header is peeked, with SO_RCVLOWAT (socket(7)) set to the bytes still
needed (as ``HelloReader`` waits for a ClientHello), so a trickling sender
costs a wake-up per piece at most; then exactly its bytes are consumed, and
what follows (the ClientHello, the request) stays in the kernel.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge.limits import ConnectionLimits, Slot
from edge.tls import proxyproto
from edge.trust import TrustedProxies

if TYPE_CHECKING:
    from edge.config import Config

log = logging.getLogger(__name__)

_PEEK = 512  # a v1 header (107 bytes) or a v2 one with IPv6 addresses and some TLVs, in one peek


class Peer:
    """The client of one connection, as the data path is to see it."""

    __slots__ = ("ip", "named", "slot", "trusted")

    def __init__(self, ip: str, trusted: bool, named: bool = False, slot: Slot | None = None) -> None:
        self.ip = ip.encode()  # the client address (bytes: X-Forwarded-For, logs, rate limits)
        self.trusted = trusted  # may speak for others (its X-Forwarded-For is appended to)
        self.named = named  # a PROXY header named this client
        self.slot = slot  # its place in [limits], released when the connection goes

    @property
    def limited(self) -> bool:
        """Subject to per-address limits: not a trusted proxy speaking for many."""
        return not self.trusted


OnReady = Callable[[socket.socket, Peer | None, float | None], None]


class Gate:
    """Admit accepted sockets and hand them on with their ``Peer``.

    ``on_ready(sock, peer, deadline)``: ``peer`` is None when no control is on
    (the data path then reads the socket's own peer, as before); ``deadline``
    is the end of the time budget started at accept, when one was."""

    def __init__(self, *, proxy_protocol: bool, trusted: TrustedProxies, limits: ConnectionLimits | None,
                 timeout: float) -> None:
        self.proxy_protocol = proxy_protocol
        self.trusted = trusted
        self.limits = limits if limits is not None and limits.active else None
        self.timeout = timeout
        self.active = bool(proxy_protocol or trusted or self.limits)
        self.refused: dict[str, int] = {}  # reason -> connections closed here
        self.local = 0  # PROXY v2 LOCAL connections (the proxy's health checks)
        self._loop: asyncio.AbstractEventLoop | None = None  # the running one, from the first connection
        self._pending: dict[int, _Waiting] = {}

    @classmethod
    def from_config(cls, config: Config) -> Gate:
        limits = config.limits
        return cls(proxy_protocol=config.server.proxy_protocol, trusted=config.server.trusted_proxies,
                   limits=ConnectionLimits(limits.connections_per_ip, limits.max_connections),
                   timeout=config.proxy.handshake_timeout)

    def admit(self, sock: socket.socket, address: tuple, on_ready: OnReady) -> None:
        if not self.active:
            on_ready(sock, None, None)
            return
        ip = _ip(address)
        trusted = ip in self.trusted
        slot = self.limits.slot() if self.limits is not None else None
        if not self.proxy_protocol:
            if slot is not None and not trusted and not slot.assign(ip):
                self._refuse(sock, "connections_per_ip")
                return
            on_ready(sock, Peer(ip, trusted, False, slot), None)
            return
        if not trusted:
            # §1: only addresses known to be proxies may claim to speak for others.
            self._refuse(sock, "untrusted")
            return
        loop = self._loop = self._loop or asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        fd = sock.fileno()
        timer = loop.call_at(deadline, self._expired, fd)
        self._pending[fd] = _Waiting(sock, ip, slot, deadline, on_ready, timer)
        self._try(fd)

    def close_all(self) -> None:
        for fd in list(self._pending):
            self._forget(fd).sock.close()

    def __len__(self) -> int:
        return len(self._pending)

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.debug("connection refused before TLS/HTTP: %s", reason)
        try:
            # An abortive close (RST) that frees the socket at once: nothing
            # is owed to a connection refused before its protocol started.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        sock.close()

    def _forget(self, fd: int) -> _Waiting:
        waiting = self._pending.pop(fd)
        waiting.timer.cancel()
        if waiting.reading and self._loop is not None:
            self._loop.remove_reader(fd)
        return waiting

    def _expired(self, fd: int) -> None:
        if fd in self._pending:
            self._refuse(self._forget(fd).sock, "timeout")

    def _try(self, fd: int) -> None:
        waiting = self._pending.get(fd)
        if waiting is None:
            return
        sock = waiting.sock
        try:
            data = sock.recv(max(_PEEK, waiting.lowat), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._wait(fd, waiting, waiting.lowat)
            return
        except OSError:
            self._refuse(self._forget(fd).sock, "closed")
            return
        if not data or (waiting.reading and len(data) < waiting.lowat):
            self._refuse(self._forget(fd).sock, "closed")  # end of stream (see HelloReader._try)
            return
        try:
            header = proxyproto.parse(data)
        except proxyproto.NeedMore as more:
            self._wait(fd, waiting, more.need)  # at most V2_MAX: a v2 length is 16 bits
            return
        except proxyproto.Invalid as exc:
            log.debug("PROXY header refused: %s", exc)
            self._refuse(self._forget(fd).sock, "malformed" if data[:1] in (b"P", b"\r") else "missing")
            return
        self._forget(fd)
        self._accepted(waiting, header)

    def _accepted(self, waiting: _Waiting, header: proxyproto.Header) -> None:
        sock = waiting.sock
        try:
            sock.recv(header.length)  # exactly the header: it was peeked whole, it is all there
            if waiting.lowat != 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            self._refuse(sock, "closed")
            return
        if header.source is None:
            # v2 LOCAL (§2.2) or v1 UNKNOWN: the proxy itself, e.g. a health check.
            self.local += 1
            peer = Peer(waiting.ip, True, False, waiting.slot)
        else:
            client = header.source[0]
            if client.startswith("::ffff:") and "." in client:
                client = client[7:]  # RFC 4291 §2.5.5.2: an IPv4 client seen through IPv6
            trusted = client in self.trusted
            slot = waiting.slot
            if slot is not None and not trusted and not slot.assign(client):
                self._refuse(sock, "connections_per_ip")
                return
            peer = Peer(client, trusted, True, slot)
        waiting.on_ready(sock, peer, waiting.deadline)

    def _wait(self, fd: int, waiting: _Waiting, need: int) -> None:
        if need != waiting.lowat:
            waiting.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            waiting.lowat = need
        if not waiting.reading and self._loop is not None:
            self._loop.add_reader(fd, self._try, fd)
            waiting.reading = True


class _Waiting:
    __slots__ = ("deadline", "ip", "lowat", "on_ready", "reading", "slot", "sock", "timer")

    def __init__(self, sock: socket.socket, ip: str, slot: Slot | None, deadline: float, on_ready: OnReady,
                 timer: asyncio.TimerHandle) -> None:
        self.sock, self.ip, self.slot, self.deadline, self.on_ready, self.timer = (
            sock, ip, slot, deadline, on_ready, timer)
        self.lowat = 1
        self.reading = False


def _ip(address: tuple | str) -> str:
    ip = address[0] if isinstance(address, tuple) else ""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]  # a dual-stack listener's view of an IPv4 peer (RFC 4291 §2.5.5.2)
    return ip
